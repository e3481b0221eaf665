"""The epoch loop: one jitted, buffer-donating step per minibatch, for any optax transformation.

Usable from Python and notebooks::

    opt = jaxcryo.solvers.preconditioned_sgd(learning_rate=1.0)
    result = fit(dataset, opt, projector, epochs=10, batch_size=250)
    result.volume_f, result.history

Each step computes the minibatch objective, its (conjugate-corrected) gradient and the optimiser update
(which may evaluate HVPs or line-search values through the ``obj_fn`` extra argument) in one jitted
function. Batches have a static shape: the ragged last batch is padded and masked (see
:func:`jaxcryo.data.epoch_batches`), so every image is used exactly once per epoch.

Data parallelism: with a ``mesh`` (:func:`jaxcryo.parallel.make_mesh`) the step splits each minibatch over
the mesh's devices and reduces the gradient and the preconditioner's diagonal inside the one jitted step
(:mod:`jaxcryo.parallel`); ``batch_size`` stays the global batch. The next batch is read by a background
thread while the current step runs (``prefetch``; the batches and their order are unchanged).
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import ArrayLike, Complex, Float, Int
from tqdm.auto import tqdm

from .. import parallel
from ..data._batch import (RawBatch, check_batch_inputs, complex_dtype, epoch_batches, load_batch,
                           prefetch as prefetch_iter, to_batch)
from ..errors import DivergenceError
from ..leastsq._loss import batch_filters, objective, value_and_grad
from ..ndimage._metrics import fsc as fsc_fn
from ..forward._projection import Projector, fourier_to_volume, volume_to_fourier
from ..leastsq._priors import Prior


def _read(source, idx, mask, mesh, to_device: bool) -> RawBatch:
    """One batch read for a step: on a mesh, split over its devices; with ``to_device`` (prefetching), put on
    the default device already, so the transfer also overlaps the running step. On a mesh over several
    processes each reads only its own block of the batch (:func:`jaxcryo.parallel.load_sharded`)."""
    if mesh is not None:
        return parallel.load_sharded(source, idx, mask, mesh)
    raw = load_batch(source, idx, mask)
    return jax.device_put(raw) if to_device else raw


@dataclass
class FitState:
    """Everything needed to continue a run: volume, optimiser state, epoch, data-order RNG state."""

    volume_f: Any
    opt_state: Any
    epoch: int
    rng_state: Mapping[str, Any]
    history: list = field(default_factory=list)


@dataclass
class FitResult:
    volume_f: jax.Array
    history: list
    state: FitState


def make_step(optimizer: optax.GradientTransformation, projector: Projector, lam: "float | Prior" = 0.0,
              vol_mask: Float[ArrayLike, "n n n"] | None = None, dtype=jnp.float32, donate: bool = True, mesh=None,
              support: Float[ArrayLike, "n n n"] | None = None) -> Callable:
    """The jitted step ``(volume_f, opt_state, raw_batch) -> (volume_f, opt_state, loss)``.

    ``support``: a real-space ``(n, n, n)`` mask multiplied into the map after every update (a support
    constraint, e.g. a soft sphere of the particle's diameter); ``vol_mask`` is the objective's own (see
    :func:`jaxcryo.leastsq.objective`).

    The optimiser's ``update`` receives the extra arguments ``obj_fn`` (the minibatch objective), ``grad``
    (the gradient), ``value`` (the loss), ``batch`` (the minibatch :class:`~jaxcryo.data.Batch`) and
    ``filters`` (its :func:`~jaxcryo.leastsq.batch_filters`, computed once per step and shared with ``obj_fn``),
    so Hutchinson estimators, line searches and the exact batch diagonal can use them.

    ``mesh``: a 1-D device mesh (:func:`jaxcryo.parallel.make_mesh`) of more than one device makes the step
    data-parallel (a :class:`jaxcryo.parallel.ShardedStep`): the batch (its size a multiple of the device
    count) is split over the devices, the volume and optimiser state are replicated, and ``obj_fn``, ``value``
    and ``grad`` are those of the whole batch (reduced over the mesh); ``batch`` and ``filters`` are the
    device's shard, with the extra argument ``axis_name`` (:data:`jaxcryo.parallel.AXIS`) over which to
    reduce anything computed from them (as :func:`jaxcryo.solvers.batch_diagonal` does).
    """
    opt = optax.with_extra_args_support(optimizer)
    axis = parallel.AXIS if parallel.mesh_size(mesh) > 1 else None
    mask = None if support is None else jnp.asarray(support, jnp.float32)

    def step(vol_f, opt_state, raw: RawBatch):
        batch = to_batch(raw, dtype)
        filters = batch_filters(batch, projector)
        fn = objective(batch, projector, lam, vol_mask, filters, axis_name=axis)
        val, g = value_and_grad(fn)(vol_f)
        extra: dict[str, Any] = dict(obj_fn=fn, grad=g, value=val, batch=batch, filters=filters)
        if axis is not None:
            extra["axis_name"] = axis
        updates, opt_state = opt.update(g, opt_state, vol_f, **extra)
        vol_f = cast(jax.Array, optax.apply_updates(vol_f, updates))
        if mask is not None:
            vol_f = volume_to_fourier(fourier_to_volume(vol_f) * mask)
        return vol_f, opt_state, val

    if axis is None or mesh is None:
        return jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return parallel.ShardedStep(step, mesh, donate)


def fit(
    source,
    optimizer: optax.GradientTransformation,
    projector: Projector,
    epochs: int = 10,
    batch_size: int = 256,
    lam: "float | Prior" = 0.0,
    indices: Int[ArrayLike, " m"] | None = None,
    init: Complex[ArrayLike, "n n n"] | None = None,
    seed: int = 0,
    vol_mask: Float[ArrayLike, "n n n"] | None = None,
    dtype=jnp.float32,
    callback: Callable[[dict, Any], None] | None = None,
    reference_f: Complex[ArrayLike, "n n n"] | None = None,
    pixel_size: float | None = None,
    progress: bool = False,
    state: FitState | None = None,
    on_epoch_end: Callable[[FitState], None] | None = None,
    divergence_factor: float = 1e4,
    step_fn: Callable | None = None,
    desc: str = "fit",
    mesh=None,
    prefetch: int = 1,
) -> FitResult:
    """Run ``epochs`` epochs of minibatch optimisation of the least-squares objective.

    Args:
        source: :class:`~jaxcryo.data.ParticleSource` (e.g. ``ArrayDataset``, ``ParticleDataset``).
        optimizer: an optax transformation (e.g. :func:`jaxcryo.solvers.preconditioned_sgd`).
        projector: the forward model (box and pixel size of the images).
        epochs, batch_size, lam: as named; ``lam`` is the Tikhonov weight.
        indices: the particles to use (default all).
        init: initial centred Fourier volume (default zeros).
        seed: seeds the data order (the optimiser has its own seed).
        callback: ``callback(record, volume_f)`` after every epoch.
        reference_f: optional centred Fourier reference; adds ``fsc_ref``/``resolution_05_ref`` to history.
        state: a :class:`FitState` to resume from (from a checkpoint).
        on_epoch_end: called with the :class:`FitState` after each epoch (checkpointing).
        divergence_factor: raise :class:`DivergenceError` if the loss becomes non-finite or exceeds this
            multiple of the first loss.
        step_fn: a step from :func:`make_step` (built here if not given, with ``mesh``; a sharded step brings
            its own mesh).
        mesh: a device mesh (:func:`jaxcryo.parallel.make_mesh`) to split each batch over (``None`` or one
            device: the single-device step). The batches are padded (masked) to a multiple of its size.
        prefetch: batches read ahead by a background thread (:func:`jaxcryo.data.prefetch`; 0: read each
            batch when its step starts). The result does not depend on it.

    Returns:
        :class:`FitResult` with the final volume and a history (one dict per epoch: ``epoch``, ``loss``
        (mean minibatch loss of the epoch), ``seconds`` (cumulative), ``images_per_s``,
        ``resolution_05_ref``, ``fsc_ref``).
    """
    n = projector.n
    cdt = complex_dtype(dtype)
    if indices is None:
        indices = np.arange(len(source.metadata))
    indices = np.asarray(indices)
    if mesh is None and isinstance(step_fn, parallel.ShardedStep):
        mesh = step_fn.mesh  # a sharded step needs its batches padded and split for its mesh
    if parallel.mesh_size(mesh) <= 1:
        mesh = None
    if state is None:
        # a copy: the steps donate their volume buffer, and the caller keeps ``init``
        vol = jnp.zeros((n,) * 3, cdt) if init is None else jnp.array(init, cdt, copy=True)
        rng = np.random.default_rng(seed)
        state = FitState(vol, optimizer.init(vol), 0, rng.bit_generator.state, [])
    step = step_fn or make_step(optimizer, projector, lam, vol_mask, dtype, mesh=mesh)
    multiple = parallel.mesh_size(mesh)
    # on a mesh: a replicated copy of the volume and state (a no-op when they already are)
    vol, opt_state = parallel.replicate((state.volume_f, state.opt_state), mesh)
    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng_state
    history = list(state.history)
    t_total = history[-1]["seconds"] if history else 0.0
    first_loss = history[0]["loss"] if history else None
    bar = tqdm(total=(epochs - state.epoch) * int(np.ceil(len(indices) / batch_size)), desc=desc,
               unit="batch", leave=False, disable=not progress)
    for epoch in range(state.epoch, epochs):
        t0 = time.perf_counter()
        losses = []
        batches = epoch_batches(indices, batch_size, rng, multiple)
        reads = (_read(source, idx, mask, mesh, prefetch > 0) for idx, mask in batches)
        with closing(prefetch_iter(reads, prefetch)) as raws:
            for k, raw in enumerate(raws):
                vol, opt_state, val = step(vol, opt_state, raw)
                val = float(val)
                if first_loss is None:
                    first_loss = abs(val) if val != 0 else 1.0
                if not np.isfinite(val) or abs(val) > divergence_factor * first_loss:
                    # a non-finite input (image, pose, CTF, starting volume) is named before the step size
                    check_batch_inputs(raw, batches[k][0], source.metadata, init if epoch == 0 else None)
                    raise DivergenceError(
                        f"loss diverged at epoch {epoch + 1} ({val:.3g}, first loss {first_loss:.3g}); "
                        "lower the learning rate ({param}) or use the line search", param="lr"
                    )
                losses.append(val)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{val:.4g}")
        jax.block_until_ready(vol)
        dt = time.perf_counter() - t0
        # several processes: the replicated global volume and state copied to this process's default device
        local_vol, local_opt = parallel.to_local((vol, opt_state), mesh)
        t_total += dt
        rec = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": t_total,
            "images_per_s": len(indices) / dt,
            "resolution_05_ref": None,
            "fsc_ref": None,
        }
        if reference_f is not None:
            r = fsc_fn(np.asarray(local_vol), np.asarray(reference_f), pixel_size=pixel_size or projector.pixel_size,
                       fourier=True)
            rec["resolution_05_ref"] = float(r.resolution_05)
            rec["fsc_ref"] = [float(x) for x in r.fsc]
        history.append(rec)
        state = FitState(local_vol, local_opt, epoch + 1, rng.bit_generator.state, history)
        if callback is not None:
            callback(rec, local_vol)
        if on_epoch_end is not None:
            on_epoch_end(state)
    bar.close()
    return FitResult(state.volume_f if parallel.is_multiprocess(mesh) else vol, history, state)
