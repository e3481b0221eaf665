"""Device meshes, sharded batches and multi-process runs."""

from ..jax_util import AXIS as AXIS

from ._distributed import (
    ENV as ENV, PARAMS as PARAMS, WHAT as WHAT, AUTO as AUTO, Settings as Settings, resolve as resolve,
    is_initialized as is_initialized, initialize as initialize, process_count as process_count,
    process_index as process_index, is_main_process as is_main_process, process_share as process_share,
    FLAGS as FLAGS, settings_from_argv as settings_from_argv,
)
from ._mesh import (
    local_device_count as local_device_count, device_count as device_count, make_mesh as make_mesh,
    resolve_mesh as resolve_mesh, mesh_size as mesh_size, padded_batch_size as padded_batch_size,
    batch_sharding as batch_sharding, replicated as replicated, is_multiprocess as is_multiprocess,
    shard_batch as shard_batch, from_process_blocks as from_process_blocks, load_sharded as load_sharded,
    replicate as replicate, to_local as to_local, shardings as shardings, ShardedStep as ShardedStep,
)
