"""Config loader: YAML → typed dataclasses, `--set` overrides, and an error naming key and file for every mistake."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Literal

import pytest
import yaml

from tulu_jax.config import dump_config, from_dict, load_config
from tulu_jax.errors import ConfigError


@dataclasses.dataclass
class Optim:
    lr: float
    weight_decay: float = 0.0
    schedule: Literal["linear", "cosine"] = "linear"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Data:
    paths: list[str] = dataclasses.field(default_factory=list)
    mixture: dict[str, float] = dataclasses.field(default_factory=dict)
    max_length: int = 4096
    cache_dir: pathlib.Path | None = None


@dataclasses.dataclass
class Run:
    name: str
    optim: Optim
    data: Data = dataclasses.field(default_factory=Data)
    seed: int = 0
    bf16: bool = True
    eval_optim: Optim | None = None
    tags: tuple[str, ...] = ()


GOOD = """
name: tulu3-8b-sft
optim:
  lr: 5e-6          # PyYAML (YAML 1.1) reads this as the string '5e-6'
  weight_decay: 0   # an int for a float field
  schedule: cosine
  betas: [0.9, 0.95]
data:
  paths: [a.jsonl, b.jsonl]
  mixture: {tulu: 0.75, flan: 0.25}
  cache_dir: /tmp/cache
seed: 3
bf16: false
tags: [sft, 8b]
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "run.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_types_and_values(tmp_path):
    cfg = load_config(Run, write(tmp_path, GOOD))
    assert cfg == Run(
        name="tulu3-8b-sft",
        optim=Optim(lr=5e-6, weight_decay=0.0, schedule="cosine", betas=(0.9, 0.95)),
        data=Data(
            paths=["a.jsonl", "b.jsonl"], mixture={"tulu": 0.75, "flan": 0.25}, cache_dir=pathlib.Path("/tmp/cache")
        ),
        seed=3,
        bf16=False,
        tags=("sft", "8b"),
    )
    # the YAML-1.1 string really is converted, and ints really become floats
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.weight_decay, float)
    assert yaml.safe_load("lr: 5e-6")["lr"] == "5e-6"


def test_round_trip_through_dump(tmp_path):
    cfg = load_config(Run, write(tmp_path, GOOD), ["eval_optim.lr=1e-7"])
    dumped = dump_config(cfg)
    # plain YAML data only: safe_dump refuses tuples, Paths and dataclasses
    text = yaml.safe_dump(dumped, sort_keys=False)
    again = load_config(Run, write(tmp_path, text, "dumped.yaml"))
    assert again == cfg
    assert dumped["data"]["cache_dir"] == "/tmp/cache" and dumped["optim"]["betas"] == [0.9, 0.95]


def test_defaults_and_from_dict():
    cfg = from_dict(Run, {"name": "x", "optim": {"lr": 1}})
    assert cfg == Run(name="x", optim=Optim(lr=1.0))
    assert cfg.data == Data() and cfg.eval_optim is None


def test_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(
        Run,
        path,
        [
            "optim.lr=1e-5",
            "data.max_length=2048",
            "data.mixture.tulu=0.5",  # a dict entry
            "data.paths=[c.jsonl]",  # a YAML flow list
            "eval_optim.lr=3",  # reaches into an Optional sub-config that the file leaves out
            "name=other",
            "seed=7",
            "bf16=true",
            "data.cache_dir=null",
        ],
    )
    assert cfg.optim.lr == 1e-5 and cfg.optim.schedule == "cosine"  # untouched siblings stay
    assert cfg.data.max_length == 2048 and cfg.data.paths == ["c.jsonl"]
    assert cfg.data.mixture == {"tulu": 0.5, "flan": 0.25}
    assert cfg.eval_optim == Optim(lr=3.0)
    assert (cfg.name, cfg.seed, cfg.bf16, cfg.data.cache_dir) == ("other", 7, True, None)


def test_required_field_from_override_only(tmp_path):
    cfg = load_config(Run, write(tmp_path, "optim: {lr: 1.0e-6}\n"), ["name=from-cli"])
    assert cfg.name == "from-cli"
    cfg = load_config(Run, None, ["name=a", "optim.lr=2e-6"])
    assert cfg == Run(name="a", optim=Optim(lr=2e-6))


def test_later_override_wins_and_whole_subconfig(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(Run, path, ["optim={lr: 1.0, schedule: linear}", "optim.weight_decay=0.1", "seed=1", "seed=2"])
    assert cfg.optim == Optim(lr=1.0, weight_decay=0.1, schedule="linear") and cfg.seed == 2


def raises(match: str):
    return pytest.raises(ConfigError, match=re.escape(match))


def test_unknown_key_in_file_names_path_file_and_suggestion(tmp_path):
    path = write(tmp_path, GOOD.replace("  lr: 5e-6", "  lrr: 5e-6"))
    with raises(f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"):
        load_config(Run, path)
    path = write(tmp_path, GOOD + "sede: 1\n")
    with raises(f"{path}: unknown key 'sede' (did you mean 'seed'?)"):
        load_config(Run, path)
    path = write(tmp_path, GOOD + "zzzz: 1\n")  # nothing close: list the valid keys instead
    with raises("unknown key 'zzzz' (valid keys: name, optim, data, seed, bf16, eval_optim, tags)"):
        load_config(Run, path)


def test_unknown_key_in_override(tmp_path):
    path = write(tmp_path, GOOD)
    with raises("--set optim.lrr: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"):
        load_config(Run, path, ["optim.lrr=1e-5"])
    with raises("--set data.max_len: unknown key 'data.max_len' (did you mean 'data.max_length'?)"):
        load_config(Run, path, ["data.max_len=8"])
    with raises("--set seed.x: key 'seed' (int) has no sub-key 'x'"):
        load_config(Run, path, ["seed.x=1"])


def test_wrong_types_in_file(tmp_path):
    cases = [
        ("cache_dir: /tmp/cache", "cache_dir: /tmp/cache\n  max_length: lots",
         "key 'data.max_length' expects int, got str 'lots'"),
        ("seed: 3", "seed: true", "key 'seed' expects int, got bool True"),  # a bool is not an int
        ("bf16: false", "bf16: 1", "key 'bf16' expects bool, got int 1"),
        ("  lr: 5e-6", "  lr: fast", "key 'optim.lr' expects float, got str 'fast'"),
        ("paths: [a.jsonl, b.jsonl]", "paths: [a.jsonl, 3]", "key 'data.paths[1]' expects str, got int 3"),
        ("paths: [a.jsonl, b.jsonl]", "paths: a.jsonl", "key 'data.paths' expects list[str], got str 'a.jsonl'"),
        ("flan: 0.25", "flan: many", "key 'data.mixture.flan' expects float, got str 'many'"),
        ("schedule: cosine", "schedule: cosin", "key 'optim.schedule' must be one of 'linear', 'cosine', got 'cosin'"),
        ("betas: [0.9, 0.95]", "betas: [0.9]", "key 'optim.betas' expects 2 items, got 1"),
        ("name: tulu3-8b-sft", "name: 8", "key 'name' expects str, got int 8"),
    ]
    for old, new, message in cases:
        assert old in GOOD
        path = write(tmp_path, GOOD.replace(old, new, 1))
        with raises(f"{path}: {message}"):
            load_config(Run, path)


def test_wrong_type_for_subconfig():
    with raises("mem: key 'optim' expects Optim, got int 3"):
        from_dict(Run, {"name": "x", "optim": 3}, source="mem")
    with raises("mem: key 'eval_optim.schedule' must be one of 'linear', 'cosine', got 'x'"):
        # inside an Optional sub-config the precise error survives (not just "expects Optim | null")
        from_dict(Run, {"name": "x", "optim": {"lr": 1}, "eval_optim": {"lr": 1, "schedule": "x"}}, source="mem")


def test_wrong_types_in_override(tmp_path):
    path = write(tmp_path, GOOD)
    with raises("--set bf16: key 'bf16' expects bool, got int 3"):
        load_config(Run, path, ["bf16=3"])
    with raises("--set optim.schedule: key 'optim.schedule' must be one of 'linear', 'cosine', got 'step'"):
        load_config(Run, path, ["optim.schedule=step"])
    with raises("--set eval_optim.lr: key 'eval_optim.lr' expects float, got str 'x'"):
        load_config(Run, path, ["eval_optim.lr=x"])
    with raises("--set 'seed': expected KEY=VALUE"):
        load_config(Run, path, ["seed"])
    with raises("--set tags: cannot parse value"):
        load_config(Run, path, ["tags=[a, b"])


def test_missing_required(tmp_path):
    path = write(tmp_path, GOOD.replace("name: tulu3-8b-sft\n", ""))
    with raises(f"{path}: missing required key 'name'"):
        load_config(Run, path)
    path = write(tmp_path, GOOD.replace("  lr: 5e-6", "  weight_decay: 0.1"))
    with pytest.raises(ConfigError) as err:
        load_config(Run, path)
    assert "duplicate key 'weight_decay'" in str(err.value)  # the loader refuses keys written twice
    path = write(tmp_path, "name: x\noptim: {schedule: linear}\n")
    with raises(f"{path}: missing required key 'optim.lr'"):
        load_config(Run, path)
    with raises("<defaults>: missing required key 'name'"):
        load_config(Run, None)


def test_file_level_errors(tmp_path):
    with raises(f"{tmp_path / 'nope.yaml'}: cannot read config file"):
        load_config(Run, tmp_path / "nope.yaml")
    path = write(tmp_path, "name: x\noptim: {lr: [1, 2}\n")
    with raises(f"{path}:2: invalid YAML"):
        load_config(Run, path)
    path = write(tmp_path, "- a\n- b\n")
    with raises(f"{path}: the top level must be a mapping of keys, got list"):
        load_config(Run, path)
    path = write(tmp_path, "name: x\nname: y\noptim: {lr: 1.0}\n")
    with raises(f"{path}:2: invalid YAML: duplicate key 'name'"):
        load_config(Run, path)


@dataclasses.dataclass
class Checked:
    size: int

    def __post_init__(self) -> None:
        if self.size % 2:
            raise ValueError(f"size must be even, got {self.size}")


@dataclasses.dataclass
class Outer:
    inner: Checked


def test_post_init_errors_name_file_and_key(tmp_path):
    path = write(tmp_path, "inner: {size: 3}\n")
    with raises(f"{path}: in 'inner': size must be even, got 3"):
        load_config(Outer, path)
