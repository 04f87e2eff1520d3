"""Multi-process start-up: `jax.distributed` from flags or environment variables, or a Cloud TPU's metadata."""

from __future__ import annotations

import os

import jax

from tulu_jax.errors import ConfigError
from tulu_jax.platform import has_tpu_chips


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start jax.distributed when this is a multi-process run; returns whether it is (False: single process).

    Settings come from the arguments, else TULU_JAX_COORDINATOR / TULU_JAX_NUM_PROCESSES / TULU_JAX_PROCESS_ID,
    else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with none of them, a host with TPU chips
    lets JAX detect the pod slice itself. Call it before any other JAX computation. On CPU, cross-process
    collectives use gloo (JAX's default, selected explicitly so a changed default cannot break multi-host CPU runs).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("TULU_JAX_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("TULU_JAX_NUM_PROCESSES")
        num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("TULU_JAX_PROCESS_ID")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if not any(v is not None for v in given.values()):
        if not has_tpu_chips():
            return False
        jax.distributed.initialize()  # Cloud TPU: coordinator, process count and id come from the TPU metadata
        return True
    if num_processes == 1:
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(
            f"a multi-process run needs coordinator, num_processes and process_id; missing {', '.join(missing)} "
            "(flags, or TULU_JAX_COORDINATOR / TULU_JAX_NUM_PROCESSES / TULU_JAX_PROCESS_ID)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id {process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
