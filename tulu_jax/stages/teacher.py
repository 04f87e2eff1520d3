"""The distillation teacher: a frozen model on the student's mesh, laid out by the same logical rules, passed to the
step as a jit argument (`frozen["teacher"]`). Built from HF weights (streamed into their shardings), from a preset
(a sharded init: toy runs and tests), or as sharded ShapeDtypeStructs (compile-check), and checked against the
student's vocabulary (sizes and tokenizer numbering) before anything runs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from tulu_jax.data.vocab import check_same_vocabulary
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.decoder import Decoder
from tulu_jax.sharding import ShardingSpec, init_sharded
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.sections import ModelSection
from tulu_jax.stages.setup import resolve_model_config, variable_shardings
from tulu_jax.train import FrozenModel, with_shardings
from tulu_jax.train.state import split_model

TEACHER = "teacher"  # the teacher's name in a step's `frozen` mapping
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def teacher_tokenizer_path(section: ModelSection, explicit: str | None) -> str | None:
    """The teacher's tokenizer directory: `explicit` (distill.teacher_tokenizer), else teacher.path when it holds
    tokenizer files, else None (a preset teacher shares the student's tokenizer by construction)."""
    if explicit is not None:
        return str(resolve_path(explicit))
    if section.path is not None:
        path = resolve_path(section.path)
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            return str(path)
    return None


def build_teacher(
    section: ModelSection, tokenizer: Any, mesh: Mesh, spec: ShardingSpec, *, abstract: bool, seed: int = 0
) -> tuple[ModelConfig, FrozenModel]:
    """(teacher ModelConfig, FrozenModel in the mesh's shardings). `abstract`: ShapeDtypeStructs, nothing loaded."""
    config = resolve_model_config(section, tokenizer, allow_preset_fallback=abstract)
    shard_fn = variable_shardings(mesh, spec)
    make = lambda: Decoder(config, rngs=nnx.Rngs(seed))  # noqa: E731
    if abstract:
        with nnx.use_eager_sharding(False):
            graphdef, params, model_state = split_model(nnx.eval_shape(make))
        shardings = shard_fn(params), shard_fn(model_state)
        params, model_state = (with_shardings(tree, s) for tree, s in zip((params, model_state), shardings))
        return config, FrozenModel(graphdef, params, model_state)
    if section.path is None or not (resolve_path(section.path) / "config.json").is_file():
        model = init_sharded(make, mesh, spec)
    else:
        from tulu_jax.models.hf_io import load_hf_checkpoint

        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(make)
        fields = dict(section.overrides, param_dtype=config.param_dtype, compute_dtype=config.compute_dtype,
                      remat=config.remat, attention=config.attention)
        model = load_hf_checkpoint(resolve_path(section.path), shardings=shard_fn(nnx.state(abstract_model)),
                                   overrides=fields)
    graphdef, params, model_state = split_model(model)
    return config, FrozenModel(graphdef, params, model_state)


def check_teacher_vocabulary(
    student: ModelConfig, teacher: ModelConfig, student_tokenizer: Any, teacher_tokenizer: str | None
) -> None:
    """ConfigError unless the teacher's vocabulary is the student's (sizes; tokenizer numbering when both are
    known)."""
    check_same_vocabulary(student.vocab_size, teacher.vocab_size,
                          student_tokenizer=student_tokenizer if teacher_tokenizer is not None else None,
                          teacher_tokenizer=teacher_tokenizer)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard per leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total
