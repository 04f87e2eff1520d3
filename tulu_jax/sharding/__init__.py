"""Where a run goes: a `sharding/*.yaml` file → device mesh, logical axis rules → NamedSharding, sharded init,
multi-process start-up, and ahead-of-time compilation for a TPU topology from any host.

- `spec`: the file's schema, DEFAULT_RULES, the mesh, logical names → PartitionSpec / NamedSharding;
- `layout`: shardings of an nnx State from its Variables' logical names, sharded init;
- `distributed`: jax.distributed start-up;
- `aot`: compile for a TPU topology, memory report against HBM.
"""

from tulu_jax.sharding.aot import HBM_BYTES, HbmExhaustedError, compile_for_topology, memory_report, tpu_topology_mesh
from tulu_jax.sharding.distributed import initialize_distributed
from tulu_jax.sharding.layout import init_sharded, state_shardings
from tulu_jax.sharding.spec import (
    DEFAULT_RULES,
    Rules,
    ShardingSpec,
    batch_sharding,
    load_sharding,
    logical_to_spec,
    make_mesh,
    named_sharding,
    topology_chip_count,
)

__all__ = [
    "DEFAULT_RULES",
    "HBM_BYTES",
    "HbmExhaustedError",
    "Rules",
    "ShardingSpec",
    "batch_sharding",
    "compile_for_topology",
    "init_sharded",
    "initialize_distributed",
    "load_sharding",
    "logical_to_spec",
    "make_mesh",
    "memory_report",
    "named_sharding",
    "state_shardings",
    "topology_chip_count",
    "tpu_topology_mesh",
]
