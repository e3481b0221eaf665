"""JAX utilities below every layer: typed collectives for code that runs under ``shard_map``."""

from ._collectives import (
    AXIS as AXIS, primal_like as primal_like, psum as psum, vary_like as vary_like, varying_axes as varying_axes,
)
