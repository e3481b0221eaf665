"""Data parallelism over the devices JAX sees: the 1-D device mesh and the sharded epoch step.

One minibatch step of :func:`jaxcryo.solvers.make_step` is run on ``D`` devices as follows:

* the devices form a 1-D :class:`jax.sharding.Mesh` with the axis :data:`AXIS` (``"data"``,
  :func:`make_mesh`);
* the minibatch (every leaf of the :class:`~jaxcryo.data.RawBatch`) is split along its leading axis,
  ``NamedSharding(mesh, P("data"))`` (:func:`shard_batch`); the global batch is padded with masked entries to
  a multiple of ``D`` (:func:`padded_batch_size`), so each device holds ``B / D`` images;
* the volume and the optimiser state are replicated, ``NamedSharding(mesh, P())``;
* the step body runs under :func:`jax.shard_map`, once per device on its shard. The objective sums its
  shard's data term and real-image count and reduces both with ``psum`` over :data:`AXIS` (the ``axis_name``
  argument of :func:`jaxcryo.leastsq.objective`), so the value, the gradient (the transpose of the replicated
  volume's broadcast is a ``psum``: each device backprojects its own images into a full-size grid, then one
  all-reduce), Hutchinson's probe products ``z * Hz`` (the HVP of that objective) and line-search trials are
  the global minibatch's; the exact batch diagonal reduces its backprojection the same way
  (:func:`jaxcryo.solvers.minibatch_diagonal` with ``axis_name``). The optimiser update then runs identically on
  every device. ``check_vma`` (JAX's replication check) is on: a transformation that let a per-shard value
  reach the replicated state would fail to trace rather than silently diverge between devices;
* NUFFT slices work as the issue prescribes: inside ``shard_map`` each device calls jax-finufft's type-2
  transform on its own points with the replicated grid, and the adjoint (type 1) gives a per-device grid that
  the ``psum`` above reduces. A plain ``jit`` with shardings would instead gather the points onto every
  device, since XLA cannot partition a custom call.

So ``--batch-size`` is the global batch and a run on ``D`` devices takes the same steps on the same images as
on one; only the order of the floating-point reductions differs (measured: a 4-device and a 1-device PSGD run
agree to about 1e-6 relative, ``tests/test_parallel.py``).

Several processes (hosts; :mod:`jaxcryo.parallel`): after :func:`jaxcryo.parallel.initialize` the mesh
is built over the global devices (:func:`jax.devices`), ordered by process, each process contributing the same
number of its own devices. The same step then runs in every process: each reads only its contiguous block of
every global batch (:func:`load_sharded`, :func:`jaxcryo.parallel.process_share`) and the blocks form one
global array (:func:`jax.make_array_from_process_local_data`); the ``psum`` crosses processes (``gloo`` over
TCP on CPU). Every process draws the same batches (same seed) and holds the replicated volume, which
:func:`to_local` copies back to a plain array on its own default device. Code that reads whole batches and
calls :func:`shard_batch` also works across processes (each keeps its block of the batch it read); the
one-pass :func:`jaxcryo.solvers.wiener_backprojection` reads through :func:`load_sharded`, so each process
reads only its block. Measured: two processes on localhost give the one-process map to about 2e-7 relative,
PSGD and the one-pass estimate (``tests/test_multihost.py``).

Also sharded: the one-pass estimate (each device accumulates its images into its own partial sums, typed
per device with :func:`primal_like` so no all-reduce runs per batch; one ``psum`` at the end) and
``refine``'s pose scoring (per image, no reduction; :func:`jaxcryo.poses.refine_iteration`).

Not sharded yet: CG's normal equations, the preparation of a minibatch run (step-size power iteration,
exact full-data diagonal) and ``abinitio``; with several processes the first two run whole in every process,
on its default device, and ``refine``/``abinitio`` run in one process.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..errors import InputError
from ._distributed import process_share

from ..jax_util._collectives import AXIS, primal_like, psum, vary_like, varying_axes


def local_device_count() -> int:
    """The number of devices of this process's default backend."""
    return len(jax.local_devices())


def device_count() -> int:
    """The number of devices of the run: this process's, or with several processes all of theirs."""
    return len(jax.devices())


def _global_mesh(n_devices: int | None) -> Mesh:
    """The mesh of a multi-process run: ``n_devices`` (default all) global devices, the same number from
    each process, ordered by process (so each process holds one contiguous block of a batch)."""
    procs = jax.process_count()
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    by_proc = [[d for d in devs if d.process_index == p] for p in range(procs)]
    fewest = min(len(d) for d in by_proc)
    n = fewest * procs if n_devices is None else int(n_devices)
    if n < procs or n % procs:
        raise InputError(f"{{param}} {n}: with {procs} processes the device count is the total over all of "
                         f"them, a multiple of {procs} (each process contributes the same number)", param="devices")
    if n // procs > fewest:
        raise InputError(f"{{param}} {n}: JAX sees {len(devs)} {devs[0].platform} device(s) over {procs} "
                         f"processes, at most {fewest} in one of them (at most {fewest * procs} in all)",
                         param="devices")
    return Mesh(np.array([d for p in by_proc for d in p[: n // procs]]), (AXIS,))


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh (axis :data:`AXIS`) over the first ``n_devices`` local devices (default: all).

    With several processes (:func:`jaxcryo.parallel.initialize`), ``n_devices`` counts the devices of all
    processes (default: all), ``n_devices / P`` from each, ordered by process.

    Raises :class:`~jaxcryo.errors.InputError` (parameter ``devices``) when fewer are visible; on CPU the
    message says how to get more (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set
    before JAX is imported).
    """
    if jax.process_count() > 1:
        return _global_mesh(n_devices)
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

    ``devices``: a count, a :class:`~jax.sharding.Mesh` (used as is), or ``None`` for all devices (with
    several processes: of all processes, :func:`make_mesh`).
    """
    if isinstance(devices, Mesh):
        return devices if devices.size > 1 else None
    mesh = make_mesh(None if devices is None else int(devices))  # validates the count
    return mesh if mesh.size > 1 else None


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


def is_multiprocess(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` spans the devices of several processes (:mod:`jaxcryo.parallel`)."""
    return mesh is not None and bool(mesh.is_multi_process)


def _check_split(n: int, mesh: Mesh) -> None:
    if n % mesh.size:
        raise ValueError(f"batch of {n} does not split over {mesh.size} devices; pad it to a multiple "
                         "(jaxcryo.data.epoch_batches(..., multiple=...))")


def shard_batch(raw, mesh: Mesh | None):
    """``raw`` (a :class:`~jaxcryo.data.RawBatch` or any pytree of arrays with the batch as leading axis) put
    on the devices, split along that axis (``mesh=None``: on the default device, as is).

    On a multi-process mesh ``raw`` is the whole global batch (the same in every process) and each process
    places only its own block (:func:`jaxcryo.parallel.process_share`); :func:`load_sharded` reads only
    that block instead."""
    if mesh is None:
        return jax.device_put(raw)
    n = jax.tree_util.tree_leaves(raw)[0].shape[0]
    _check_split(n, mesh)
    if is_multiprocess(mesh):

        share = process_share(n, mesh)
        return from_process_blocks(jax.tree_util.tree_map(lambda x: np.asarray(x)[share], raw), mesh, n)
    return jax.device_put(raw, batch_sharding(mesh))


def from_process_blocks(local, mesh: Mesh, n: int):
    """The global batch of ``n`` split over ``mesh`` from this process's block ``local`` (rows
    :func:`jaxcryo.parallel.process_share` of it, every leaf), through
    :func:`jax.make_array_from_process_local_data`: every process calls it with its own block."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (n,) + np.shape(x)[1:]), local)


def load_sharded(source, idx, mask, mesh: Mesh | None):
    """Particles ``idx`` (padding ``mask``) of ``source`` read as one batch split over ``mesh``
    (:func:`jaxcryo.data.load_batch` then :func:`shard_batch`). On a multi-process mesh each process reads
    only its own block of the batch from ``source`` (:func:`jaxcryo.parallel.process_share`)."""
    from ..data._batch import load_batch

    if not is_multiprocess(mesh):
        return shard_batch(load_batch(source, idx, mask), mesh)

    idx, mask = np.asarray(idx), np.asarray(mask)
    _check_split(len(idx), mesh)
    share = process_share(len(idx), mesh)
    return from_process_blocks(load_batch(source, idx[share], mask[share]), mesh, len(idx))


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _replicate_global(x, sharding: NamedSharding):
    """One leaf as a global array, a full copy on every device of a multi-process mesh (from this process's
    value, the same in every process)."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if _is_key(x):
        return jax.random.wrap_key_data(_replicate_global(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh | None):
    """``tree`` (volume, optimiser state) copied to every device of ``mesh`` (``None``: unchanged). On a
    multi-process mesh each process gives its own copy, which must be the same everywhere."""
    if mesh is None:
        return tree
    if is_multiprocess(mesh):
        rep = replicated(mesh)
        return jax.tree_util.tree_map(lambda x: _replicate_global(x, rep), tree)
    return jax.device_put(tree, replicated(mesh))


def _local_copy(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if _is_key(x):
        return jax.random.wrap_key_data(_local_copy(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if not x.is_fully_replicated:
        raise ValueError(f"a {x.shape} array split over processes ({x.sharding}) has no local copy")
    return jax.numpy.asarray(np.array(x.addressable_data(0)))  # a new buffer: the step donates ``x``


def to_local(tree, mesh: Mesh | None = None):
    """``tree``'s replicated global arrays (a multi-process step's volume, state, loss) as plain arrays on this
    process's default device (copies: the next step may donate the originals); anything else as is.

    A no-op unless ``mesh`` spans several processes (``mesh=None``: converts any global array)."""
    if mesh is not None and not is_multiprocess(mesh):
        return tree
    return jax.tree_util.tree_map(_local_copy, tree)


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

