"""IFEval scoring: strict and loose modes (official ``evaluation_lib.py``) and the ground-truth forms of RLVR rows.

A ground truth is detected by content:

- ``{"instruction_id": [...], "kwargs": [...]}`` (open-instruct's ``IFEvalVerifier``; also as a one-element list,
  a JSON string or a Python-literal string of either) or the official row form with ``instruction_id_list``:
  scored as the fraction of instructions followed.
- ``{"func_name": ..., ...}`` (Tülu 3 RLVR's JSON constraints): 1.0 or 0.0, see ``tulu.py``.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tulu_jax.rl.verifiers.ifeval import instructions, tulu


def loose_variants(response: str) -> list[str]:
    """The eight responses the loose mode tries: with/without first and last line, with/without ``*``."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def _follow(response: str, checks: Sequence[instructions.Check], loose: bool) -> list[bool]:
    variants = loose_variants(response) if loose else [response]
    variants = [v for v in variants if v.strip()]  # an empty response follows nothing
    return [any(check(v) for v in variants) for check in checks]


def follow_instructions(
    response: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None], *, loose: bool = False
) -> list[bool]:
    """Per instruction, whether ``response`` follows it (official strict or loose mode)."""
    if len(instruction_ids) != len(kwargs):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    return _follow(response, [instructions.build(i, k) for i, k in zip(instruction_ids, kwargs)], loose)


@dataclass(frozen=True)
class Instructions:
    """A parsed ground truth of the instruction-list form."""

    instruction_ids: tuple[str, ...]
    checks: tuple[instructions.Check, ...]


def _load(ground_truth: Any) -> Any:
    if not isinstance(ground_truth, str):
        return ground_truth
    try:
        return json.loads(ground_truth)
    except ValueError:
        pass
    try:
        return ast.literal_eval(ground_truth)  # open-instruct stores repr() of a Python list
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"IFEval ground truth is neither JSON nor a Python literal: {ground_truth[:200]!r}") from None


def parse_ground_truth(ground_truth: Any) -> Instructions | tulu.Constraint:
    """Parse any supported IFEval ground truth, validating every instruction and argument (ValueError if bad)."""
    value = _load(ground_truth)
    if isinstance(value, list) and len(value) == 1:
        value = _load(value[0])
    if not isinstance(value, dict):
        raise ValueError(f"IFEval ground truth must be an object, got {type(value).__name__}")
    if "func_name" in value:
        return tulu.parse(value)
    ids = value.get("instruction_id", value.get("instruction_id_list"))
    kwargs = value.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError("IFEval ground truth needs 'func_name' or a non-empty list 'instruction_id'")
    if kwargs is None:
        kwargs = [None] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"IFEval ground truth: 'kwargs' must be a list of {len(ids)} objects, got {kwargs!r}")
    return Instructions(tuple(ids), tuple(instructions.build(i, k) for i, k in zip(ids, kwargs)))


def score(response: str, ground_truth: Any, *, loose: bool = False) -> float:
    """Fraction of the ground truth's instructions that ``response`` follows (strict mode unless ``loose``)."""
    parsed = parse_ground_truth(ground_truth)
    if isinstance(parsed, tulu.Constraint):
        return float(parsed.check(response))
    followed = _follow(response, parsed.checks, loose)
    return sum(followed) / len(followed)
