"""Typed configs: nested dataclasses loaded from YAML, with `--set a.b=c` command-line overrides.

Every key is checked against the dataclass schema before anything compiles: an unknown key, a value of the wrong
type or a missing required field raises `ConfigError` naming the key's dotted path and where it came from (the
YAML file, or `--set` for an override), and for unknown keys the closest valid key.

Supported field types: int, float, str, bool, pathlib.Path, Optional / unions, Literal, list[...], tuple[..., ...],
dict[str, ...], nested dataclasses and Any. Ints are accepted for float fields, and so are strings that parse as a
float: PyYAML (YAML 1.1) reads `1e-5` as a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from tulu_jax.errors import ConfigError

T = TypeVar("T")

__all__ = ["load_config", "from_dict", "dump_config", "read_yaml"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a mapping key written twice (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (an empty file gives {}); errors name the file and line."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Load dataclass `cls` from the YAML file at `path` (None: defaults only), then apply `overrides`.

    Each override is `dotted.key=value` (the argument of `--set`); the value is parsed as a YAML scalar or flow
    collection and type-checked against the field. Raises ConfigError on any unknown key, wrong type or missing field.
    """
    source = str(path) if path is not None else "<defaults>"
    data = read_yaml(path) if path is not None else {}
    hints = _field_types(cls)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-5")
        where = f"--set {key}"
        try:
            raw = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: cannot parse value {text!r}: {getattr(e, 'problem', e)}") from None
        target = _override_target_type(cls, hints, key.split("."), where)
        _insert(data, key.split("."), _convert(raw, target, key, where), where)
    return from_dict(cls, data, source=source)


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build dataclass `cls` from a plain mapping, with the same checks and messages as `load_config`."""
    return _convert(data, cls, "", source)


def dump_config(obj: Any) -> Any:
    """A resolved config as plain YAML-safe data (dicts, lists, scalars) that `load_config` reads back unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump_config(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): dump_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump_config(v) for v in obj]
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    return obj


# --- internals -------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass `cls` (string annotations included)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:  # a schema bug, not a user error: say which class
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {e}") from None
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(key: str, path: str, valid: Sequence[str], source: str) -> ConfigError:
    full = _join(path, key)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{_join(path, close[0])}'?" if close else f"valid keys: {', '.join(valid) or 'none'}"
    return ConfigError(f"{source}: unknown key '{full}' ({hint})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(value: Any, tp: Any, path: str, source: str) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ConfigError(
        f"{source}: key '{path or '<top level>'}' expects {_type_name(tp)}, got {type(value).__name__} {shown}"
    )


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check `value` against type `tp` and return it converted (float from int/str, tuple from list, ...)."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, path, source)
    if origin is typing.Literal:
        # `True == 1` in Python: compare types too, so that a bool never passes for an int literal
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(
            f"{source}: key '{path}' must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
        )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # a mapping or list can only be meant for the one option of that shape: report its own error (unknown key...)
        shaped = [a for a in options if _same_shape(value, a)]
        if len(options) == 1 or len(shaped) == 1:
            return _convert(value, (shaped or options)[0], path, source)
        for arg in options:
            try:
                return _convert(value, arg, path, source)
            except ConfigError:
                continue
        raise _wrong_type(value, tp, path, source)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(value, tp, path, source)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{source}: key '{path}' expects {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong_type(value, tp, path, source)
        key_t, val_t = args if args else (Any, Any)
        return {
            _convert(k, key_t, path, source): _convert(v, val_t, _join(path, str(k)), source) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is pathlib.Path:
        if isinstance(value, (str, pathlib.PurePath)):
            return pathlib.Path(value)
    else:
        raise TypeError(f"config field '{path}' has unsupported type {tp!r}")
    raise _wrong_type(value, tp, path, source)


def _convert_dataclass(value: Any, cls: type, path: str, source: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _wrong_type(value, cls, path, source)
    hints = _field_types(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in hints:
            raise _unknown_key(str(key), path, list(hints), source)
        kwargs[key] = _convert(item, hints[key], _join(path, key), source)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in kwargs:
            raise ConfigError(f"{source}: missing required key '{_join(path, f.name)}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, ConfigError) as e:  # a __post_init__ check of the schema itself
        raise ConfigError(f"{source}: {f'in {path!r}: ' if path else ''}{e}") from None


def _same_shape(value: Any, tp: Any) -> bool:
    """Whether `value` is a container and `tp` a container type of the same kind (mapping or sequence)."""
    origin = typing.get_origin(tp)
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(tp) or origin in (dict, Mapping)
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple, Sequence)
    return False


def _strip_optional(tp: Any) -> Any:
    """`X | None` → X, so that overrides can reach into an optional nested dataclass or dict."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _override_target_type(cls: type, hints: dict[str, Any], keys: list[str], where: str) -> Any:
    """The declared type at dotted path `keys`, walking dataclass fields and dict values; unknown → ConfigError."""
    tp: Any = cls
    for depth, key in enumerate(keys):
        path = ".".join(keys[:depth])
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            fields = hints if tp is cls else _field_types(tp)
            if key not in fields:
                raise _unknown_key(key, path, list(fields), where)
            tp = fields[key]
        elif typing.get_origin(tp) in (dict, Mapping):
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            return Any
        else:
            raise ConfigError(f"{where}: key '{path}' ({_type_name(tp)}) has no sub-key '{key}'")
    return tp


def _insert(data: dict[str, Any], keys: list[str], value: Any, where: str) -> None:
    """Set data[k0][k1]...[kn] = value, creating missing intermediate mappings."""
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif dataclasses.is_dataclass(child):  # an earlier override set the whole sub-config
            child = node[key] = dump_config(child)
        elif not isinstance(child, dict):
            raise ConfigError(f"{where}: key '{'.'.join(keys[: depth + 1])}' is not a mapping in the config file")
        node = child
    node[keys[-1]] = value
