"""Explicit resume: a run directory that already holds a run is continued only on request, with the same config.

Every command that writes a run directory calls `check_resume` before it writes anything there:

- the directory holds no run (no checkpoint, no finished stage): go on;
- it holds one and `--resume` was not given: refused, with one line saying how to continue it or start elsewhere;
- `--resume` with a config that differs from the saved one in anything but the run-length and logging keys
  (RESUMABLE_KEYS): refused, listing each differing key with its saved and new value;
- `--resume --allow-config-change`: goes on and appends the change to `config_changes.jsonl` in the run directory,
  so the run keeps a record of which steps ran under which settings.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from tulu_jax.errors import ConfigError

CHANGES_FILE = "config_changes.jsonl"
# Keys a resumed run may change: how long it runs, how it logs and checkpoints, what it writes at the end. A new
# length rebuilds the learning-rate schedule for the new total (the steps already taken keep the rates they had).
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.epochs",
    "output.run_dir", "output.save_every", "output.keep_last", "output.log_every", "output.progress",
    "output.export_hf", "output.export_dtype", "output.tensorboard", "output.resume", "output.allow_config_change",
    "output.strict_resume",
})
_ABSENT = "(absent)"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two configs: key → (saved, new); a missing key is "(absent)"."""
    old_flat, new_flat = flatten(saved), flatten(new)
    return {
        key: (old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT))
        for key in sorted(old_flat.keys() | new_flat.keys())
        if old_flat.get(key, _ABSENT) != new_flat.get(key, _ABSENT)
    }


def is_resumable(key: str) -> bool:
    """Whether a resumed run may change `key`; nested configs (the pipeline's `sft.train.epochs`) match by suffix."""
    return any(key == k or key.endswith(f".{k}") for k in RESUMABLE_KEYS)


def checkpoint_steps(directory: pathlib.Path) -> list[int]:
    """The finalized checkpoint steps in `directory`, ascending (orbax renames a finished save to its step number)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def parts_state(run_dir: pathlib.Path, parts: Sequence[str], kind: str, marker: str) -> tuple[list[str], str | None]:
    """A run directory of several parts in `run_dir/<part>` (pipeline stages, comparison arms): the parts finished
    (holding `marker`) and what run_dir holds, for `check_resume`'s `existing` (None when nothing)."""
    finished = [p for p in parts if (run_dir / p / marker).is_file()]
    started = [p for p in parts if p not in finished and checkpoint_steps(run_dir / p / "checkpoints")]
    existing = ", ".join([*(f"{kind} {p} finished" for p in finished), *(f"{kind} {p} checkpointed" for p in started)])
    return finished, existing or None


def check_stage_resume(output: Any, config: Mapping[str, Any], *, write: bool) -> None:
    """`check_resume` for a training stage: `output` is its OutputSection (run_dir, resume, allow_config_change),
    `config` its resolved config as plain data; the run exists once run_dir/checkpoints holds a checkpoint."""
    run_dir = pathlib.Path(output.run_dir)
    steps = checkpoint_steps(run_dir / "checkpoints")
    check_resume(run_dir, "config.yaml", config, existing=f"a checkpoint at step {steps[-1]}" if steps else None,
                 resume=output.resume, allow_config_change=output.allow_config_change, write=write)


def check_resume(
    run_dir: pathlib.Path,
    config_file: str,
    config: Mapping[str, Any],
    *,
    existing: str | None,
    resume: bool,
    allow_config_change: bool,
    write: bool = True,
) -> None:
    """Refuse to touch a run directory unless the rules of this module allow it (see the module docstring).

    `config_file`: the saved config's name in run_dir (e.g. config.yaml); `config`: the new config as plain data;
    `existing`: what run_dir already holds (e.g. "a checkpoint at step 30"), None when nothing; `write`: whether this
    process records an allowed change (process 0 of a multi-host run). Raises ConfigError.
    """
    if existing is None:
        return
    if not resume:
        raise ConfigError(f"{run_dir} already holds a run ({existing}): pass --resume to continue it, or choose "
                          "another run directory")
    saved_path = run_dir / config_file
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} holds {existing} but no {config_file}: cannot check that --resume continues "
                          "the same run; choose another run directory")
    changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, config)
    refused = {key: change for key, change in changes.items() if not is_resumable(key)}
    if refused and not allow_config_change:
        listed = "; ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in refused.items())
        raise ConfigError(f"--resume: the config differs from {saved_path} in {listed} (only run-length and logging "
                          "keys may change): use the saved values, another run directory, or --allow-config-change")
    if refused and write:
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "resumed_from": existing, "changes": {key: list(change) for key, change in changes.items()}}
        with open(run_dir / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"tulu-jax: --allow-config-change: {', '.join(refused)} changed; recorded in {run_dir / CHANGES_FILE}",
              file=sys.stderr)
