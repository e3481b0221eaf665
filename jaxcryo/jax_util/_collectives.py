"""Collective-typing helpers for code that may run under :func:`jax.shard_map`: typed reductions and marks of
which values vary between devices. A leaf: the forward model and the objective use these without depending on
the mesh machinery in :mod:`jaxcryo.parallel`."""

from __future__ import annotations

import jax

#: The name of the mesh axis the batch is split along (the ``axis_name`` of the reductions).
AXIS = "data"

def varying_axes(x) -> frozenset:
    """The mesh axes along which ``x`` differs between devices (its type's ``vma``; empty outside
    ``shard_map``)."""
    return frozenset(getattr(jax.typeof(x), "vma", frozenset()))

def psum(tree, axis_name: str | None):
    """Sum the per-device values of ``tree``'s leaves over ``axis_name`` (``None``: ``tree`` as is).

    Only leaves that vary along the axis are reduced: a leaf typed as replicated is already the same
    everywhere, e.g. the output of ``jax.linear_transpose`` (or ``jax.grad``) with respect to a replicated
    volume inside ``shard_map``, whose transpose of the volume's broadcast to the devices already is a
    ``psum``; summing it again would multiply it by the device count.
    """
    if axis_name is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.lax.psum(x, axis_name) if axis_name in varying_axes(x) else x,
                                  tree)

def vary_like(x, *others):
    """``x`` marked as varying along every mesh axis along which any of ``others`` varies (``jax.lax.pvary``;
    a no-op outside ``shard_map``).

    For custom calls whose output takes the type of one input: jax-finufft's type-2 transform types its
    output like the grid, so a replicated grid read at per-device points must be marked per-device first.
    Then the output is per-device, and the adjoint's type-1 grids are ``psum``-reduced by the transpose of
    this mark, as the issue prescribes (points sharded, grid replicated; ``psum`` of the type-1 grid).
    """
    missing = frozenset().union(*(varying_axes(o) for o in others)) - varying_axes(x)
    return jax.lax.pvary(x, tuple(sorted(missing))) if missing else x

def primal_like(shape, dtype, *others):
    """The primal of a ``jax.linear_transpose`` (a backprojection's volume) typed as varying along every mesh
    axis along which any of ``others`` (the images, points, weights) varies.

    Inside ``shard_map``, a transpose with respect to a replicated primal includes the ``psum`` of the
    broadcast's transpose: every call all-reduces a full grid. Typed per device, the transpose is this
    device's partial sum, which the caller reduces once (e.g. after accumulating many batches,
    :func:`jaxcryo.solvers.wiener_backprojection`). Per device, the primal is a zero array marked varying
    (``jax.lax.pvary``; only its type is used); outside ``shard_map``, a plain ``ShapeDtypeStruct``.
    """
    vma = frozenset().union(*(varying_axes(o) for o in others))
    if not vma:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.lax.pvary(jax.numpy.zeros(shape, dtype), tuple(sorted(vma)))

