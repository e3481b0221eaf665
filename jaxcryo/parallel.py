"""Data parallelism over the devices JAX sees: the 1-D device mesh and the sharded epoch step.

One minibatch step of :func:`jaxcryo.fit.make_step` is run on ``D`` devices as follows:

* the devices form a 1-D :class:`jax.sharding.Mesh` with the axis :data:`AXIS` (``"data"``,
  :func:`make_mesh`);
* the minibatch (every leaf of the :class:`~jaxcryo.batch.RawBatch`) is split along its leading axis,
  ``NamedSharding(mesh, P("data"))`` (:func:`shard_batch`); the global batch is padded with masked entries to
  a multiple of ``D`` (:func:`padded_batch_size`), so each device holds ``B / D`` images;
* the volume and the optimiser state are replicated, ``NamedSharding(mesh, P())``;
* the step body runs under :func:`jax.shard_map`, once per device on its shard. The objective sums its
  shard's data term and real-image count and reduces both with ``psum`` over :data:`AXIS` (the ``axis_name``
  argument of :func:`jaxcryo.loss.objective`), so the value, the gradient (the transpose of the replicated
  volume's broadcast is a ``psum``: each device backprojects its own images into a full-size grid, then one
  all-reduce), Hutchinson's probe products ``z * Hz`` (the HVP of that objective) and line-search trials are
  the global minibatch's; the exact batch diagonal reduces its backprojection the same way
  (:func:`jaxcryo.optim.minibatch_diagonal` with ``axis_name``). The optimiser update then runs identically on
  every device. ``check_vma`` (JAX's replication check) is on: a transformation that let a per-shard value
  reach the replicated state would fail to trace rather than silently diverge between devices;
* NUFFT slices work as the issue prescribes: inside ``shard_map`` each device calls jax-finufft's type-2
  transform on its own points with the replicated grid, and the adjoint (type 1) gives a per-device grid that
  the ``psum`` above reduces. A plain ``jit`` with shardings would instead gather the points onto every
  device, since XLA cannot partition a custom call.

So ``--batch-size`` is the global batch and a run on ``D`` devices takes the same steps on the same images as
on one; only the order of the floating-point reductions differs (measured: a 4-device and a 1-device PSGD run
agree to about 1e-6 relative, ``tests/test_parallel.py``).

Not sharded yet: the one-pass estimate (:func:`jaxcryo.hessian.wiener_backprojection`, the default
``backproject``, and the spectral prior's half-map estimate), CG's normal equations, the preparation of a
minibatch run (step-size power iteration, exact full-data diagonal), refinement's pose scoring, and anything
across hosts (the mesh is built from :func:`jax.local_devices`).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import InputError

#: The name of the mesh axis the batch is split along (the ``axis_name`` of the reductions).
AXIS = "data"


def local_device_count() -> int:
    """The number of devices of this process's default backend."""
    return len(jax.local_devices())


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh (axis :data:`AXIS`) over the first ``n_devices`` local devices (default: all).

    Raises :class:`~jaxcryo.errors.InputError` (parameter ``devices``) when fewer are visible; on CPU the
    message says how to get more (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set
    before JAX is imported).
    """
    devs = jax.local_devices()
    n = len(devs) if n_devices is None else int(n_devices)
    if n < 1:
        raise InputError(f"{{param}} {n}: expected at least 1", param="devices")
    if n > len(devs):
        hint = ""
        if devs[0].platform == "cpu":
            hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts "
                    "(forced host devices share the machine's cores)")
        raise InputError(f"{{param}} {n}: JAX sees {len(devs)} {devs[0].platform} device(s){hint}", param="devices")
    return Mesh(np.array(devs[:n]), (AXIS,))


def resolve_mesh(devices: "int | Mesh | None" = None) -> Mesh | None:
    """The mesh a run uses: ``None`` (the plain single-device path) for one device, else :func:`make_mesh`.

    ``devices``: a count, a :class:`~jax.sharding.Mesh` (used as is), or ``None`` for all local devices.
    """
    if isinstance(devices, Mesh):
        return devices if devices.size > 1 else None
    n = local_device_count() if devices is None else int(devices)
    mesh = make_mesh(n)  # validates the count
    return mesh if n > 1 else None


def mesh_size(mesh: Mesh | None) -> int:
    """Devices in ``mesh`` (1 for ``None``)."""
    return 1 if mesh is None else int(mesh.size)


def padded_batch_size(batch_size: int, mesh: "Mesh | int | None") -> int:
    """The smallest multiple of the device count that holds ``batch_size`` images (the static batch shape;
    the padding is masked out)."""
    d = mesh if isinstance(mesh, int) else mesh_size(mesh)
    return -(-int(batch_size) // d) * d


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh: the sharding of every batch leaf."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh: the volume and the optimiser state."""
    return NamedSharding(mesh, P())


def shard_batch(raw, mesh: Mesh | None):
    """``raw`` (a :class:`~jaxcryo.batch.RawBatch` or any pytree of arrays with the batch as leading axis) put
    on the devices, split along that axis (``mesh=None``: on the default device, as is)."""
    if mesh is None:
        return jax.device_put(raw)
    n = jax.tree_util.tree_leaves(raw)[0].shape[0]
    if n % mesh.size:
        raise ValueError(f"batch of {n} does not split over {mesh.size} devices; pad it to a multiple "
                         "(jaxcryo.batch.epoch_batches(..., multiple=...))")
    return jax.device_put(raw, batch_sharding(mesh))


def replicate(tree, mesh: Mesh | None):
    """``tree`` (volume, optimiser state) copied to every device of ``mesh`` (``None``: unchanged)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


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


def shardings(tree) -> list:
    """The ``.sharding`` of every array leaf of ``tree`` (what a test inspects around a step)."""
    return [x.sharding for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]


class ShardedStep:
    """The jitted data-parallel step ``(volume_f, opt_state, raw_batch) -> (volume_f, opt_state, loss)``.

    ``body(volume_f, opt_state, raw_batch)`` runs under :func:`jax.shard_map` on each device's shard of the
    batch (its reductions over :data:`AXIS` make the outputs replicated); the call is jitted with the batch
    sharded and everything else replicated, donating the volume and the state when ``donate``.

    ``local_batch_shapes``: the leading dimension of the batch each device's body was traced with (one
    entry per trace: ``B / D`` when the step really is sharded); ``in_shardings``: the shardings the jitted
    call places its arguments with.
    """

    def __init__(self, body: Callable, mesh: Mesh, donate: bool = True):
        self.mesh = mesh
        self.local_batch_shapes: list[int] = []

        def per_device(vol_f, opt_state, raw):
            self.local_batch_shapes.append(int(jax.tree_util.tree_leaves(raw)[0].shape[0]))
            return body(vol_f, opt_state, raw)

        sm = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P(), P()))
        rep, data = replicated(mesh), batch_sharding(mesh)
        self.in_shardings = (rep, rep, data)
        self._jit = jax.jit(sm, in_shardings=self.in_shardings, out_shardings=(rep, rep, rep),
                            donate_argnums=(0, 1) if donate else ())

    @property
    def n_devices(self) -> int:
        return int(self.mesh.size)

    def __call__(self, vol_f, opt_state, raw):
        return self._jit(vol_f, opt_state, raw)

    def lower(self, *args):
        """``jax.jit(...).lower``: for inspecting the compiled step (its all-reduces)."""
        return self._jit.lower(*args)
