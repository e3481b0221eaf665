"""Hessian-diagonal estimators and diagonal scaling as optax gradient transformations.

Each a small ``optax.GradientTransformationExtraArgs`` with NamedTuple state and pure ``init``/``update``:

* :func:`hutchinson_diagonal`: estimates ``diag(H)`` of the objective passed as the ``obj_fn`` extra argument
  (the protocol of ``optax.contrib``'s Sophia) with ``K`` Rademacher probes, vmapped, by forward-over-reverse
  HVPs; carries its running average and PRNG key. Its ``update`` *returns the diagonal estimate*.
* :func:`batch_diagonal`: the exact diagonal of each minibatch's Hessian
  (:func:`jaxcryo.leastsq.minibatch_diagonal`: slice operators with a local stencil, one adjoint pass, no
  probe noise), from the ``batch`` extra argument, optionally EMA-averaged.
* :func:`fixed_diagonal`: a precomputed diagonal (e.g. :func:`jaxcryo.leastsq.exact_diagonal`, the
  "precomputed" preconditioner of the paper) in the same protocol.
* :func:`scale_by_diagonal`: divides the updates by ``max(|D|, threshold)`` with ``D`` from one of the above.

The line search and the optimiser presets that chain these are in :mod:`._optim`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..forward._operators import local_stencil_operator
from ..ndimage._fourier import shell_index
from ..leastsq._hessian import minibatch_diagonal
from ..leastsq._loss import gradient
from ..leastsq._linalg import default_threshold


Averaging = Literal["paper", "ema", "mean"]


def _real(x):
    return jnp.real(x)


# --------------------------------------------------------------------------------------------------
# Hutchinson estimator of the Hessian diagonal
# --------------------------------------------------------------------------------------------------
class HutchinsonState(NamedTuple):
    """``count``: steps seen; ``key``: PRNG key; ``mean``: running mean of ``z * Hz`` (the paper's d-bar);
    ``diag``: the current estimate ``D`` (real, shaped like the parameters); ``n_updates``: estimates made."""

    count: jax.Array
    key: jax.Array
    mean: Any
    diag: Any
    n_updates: jax.Array


def rademacher_probes(key, params, n_probes: int):
    """``n_probes`` Rademacher (+-1) probes shaped like ``params`` (real values in the params' dtype)."""
    rdt = jnp.real(params).dtype
    z = jax.random.rademacher(key, (n_probes,) + params.shape, dtype=rdt)
    return z.astype(params.dtype)


def hutchinson_samples(obj_fn: Callable, params, key, n_probes: int = 1):
    """``n_probes`` single-probe samples ``Re(z_k * H z_k)`` ``(K, ...)``, HVPs vmapped over the probes."""
    zs = rademacher_probes(key, params, n_probes)
    g = gradient(obj_fn)
    hz = jax.vmap(lambda z: jax.jvp(g, (params,), (z,))[1])(zs)
    return _real(jnp.conj(zs) * hz)


def hutchinson_estimate(obj_fn: Callable, params, key, n_probes: int = 1):
    """One Hutchinson estimate ``mean_k Re(z_k * H z_k)`` of ``diag(H)`` with ``n_probes`` vmapped probes."""
    return jnp.mean(hutchinson_samples(obj_fn, params, key, n_probes), axis=0)


def _refresh(state, update_every: int, compute):
    """``compute(state)`` every ``update_every``-th step (else the state unchanged); then count the step.
    Shared by the diagonal estimators, whose states have ``count``, ``diag`` and ``n_updates``."""
    if update_every == 1:
        st = compute(state)
    else:
        st = jax.lax.cond(state.count % update_every == 0, compute, lambda s: s, state)
    return st._replace(count=state.count + 1)


def _debias(state, beta: float):
    """The state's EMA ``diag`` with Adam's bias correction ``/ (1 - beta^k)`` (``beta = 0``: as is)."""
    if not beta:
        return state.diag
    return state.diag / (1 - beta ** jnp.maximum(state.n_updates, 1).astype(state.diag.dtype))


def hutchinson_diagonal(
    seed: int | jax.Array = 0,
    n_probes: int = 1,
    averaging: Averaging = "paper",
    beta: float = 0.9,
    update_every: int = 1,
    init_value: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Hutchinson estimator of ``diag(H)`` of ``obj_fn`` (an extra argument of ``update``).

    Args:
        seed: PRNG seed (int) or key for the probes.
        n_probes: probes per estimate (``K``), vmapped in one call.
        averaging: ``"paper"`` (Algorithm 1 of Toader et al. 2025: running mean ``d-bar_k`` of the estimates,
            then ``D_k = beta D_{k-1} + (1 - beta) d-bar_k``, ``D_0 = init_value``), ``"ema"``
            (``D_k = beta D_{k-1} + (1 - beta) est_k``) or ``"mean"`` (``D_k = d-bar_k``).
        beta: EMA factor.
        update_every: estimate only every ``m``-th step (the others reuse ``D``).
        init_value: ``D_0``. The paper uses 1; with jaxcryo's loss normalisation (mean over the batch,
            CTF <= 1) the diagonal lies in [lam, ~1], so ``D_0 = 1`` over-estimates it and, with few steps per
            epoch, keeps the steps small for tens of steps (measured: 31 epochs instead of 6 at box 32, batch
            n/4). The default ``None`` starts from ``D_0 = 0`` with Adam's bias correction
            (``/ (1 - beta^k)``). Its weakness, small batches where a voxel first hit at step k gets ``D`` far
            below its curvature, is handled by the shell floor of :func:`scale_by_diagonal`.

    ``update(updates, state, params, obj_fn)`` returns ``(D, new_state)``: the diagonal, not an update.
    """
    if averaging not in ("paper", "ema", "mean"):
        raise ValueError(f"averaging must be 'paper', 'ema' or 'mean', got {averaging!r}")
    if n_probes < 1 or update_every < 1:
        raise ValueError("n_probes and update_every must be positive")

    def init_fn(params):
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        rdt = jnp.real(params).dtype
        return HutchinsonState(
            count=jnp.zeros([], jnp.int32), key=key, mean=jnp.zeros(params.shape, rdt),
            diag=jnp.full(params.shape, 0.0 if init_value is None else init_value, rdt),
            n_updates=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, obj_fn=None, **extra):
        del updates, extra
        if params is None or obj_fn is None:
            raise ValueError("hutchinson_diagonal.update needs params= and obj_fn=")

        def estimate(st):
            key, sub = jax.random.split(st.key)
            est = hutchinson_estimate(obj_fn, params, sub, n_probes).astype(st.mean.dtype)
            k = (st.n_updates + 1).astype(st.mean.dtype)
            mean = st.mean * ((k - 1) / k) + est / k
            if averaging == "paper":
                diag = beta * st.diag + (1 - beta) * mean
            elif averaging == "ema":
                diag = beta * st.diag + (1 - beta) * est
            else:
                diag = mean
            return HutchinsonState(st.count, key, mean, diag, st.n_updates + 1)

        st = _refresh(state, update_every, estimate)
        return _debias(st, beta if init_value is None and averaging != "mean" else 0.0), st

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class FixedDiagonalState(NamedTuple):
    diag: Any


def fixed_diagonal(diag) -> optax.GradientTransformationExtraArgs:
    """A precomputed Hessian diagonal in the protocol of :func:`hutchinson_diagonal` (returns ``diag``)."""

    def init_fn(params):
        del params
        return FixedDiagonalState(jnp.array(diag, copy=True))  # own buffer: steps donate the state

    def update_fn(updates, state, params=None, **extra):
        del updates, params, extra
        return state.diag, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class BatchDiagonalState(NamedTuple):
    """``count``: steps seen; ``diag``: the (EMA of the) minibatch diagonals; ``n_updates``: diagonals made."""

    count: jax.Array
    diag: Any
    n_updates: jax.Array


def batch_diagonal(projector, lam=0.0, beta: float = 0.0, update_every: int = 1
                   ) -> optax.GradientTransformationExtraArgs:
    """The exact diagonal of each minibatch's Hessian (:func:`minibatch_diagonal`) in the protocol of
    :func:`hutchinson_diagonal`: ``update(updates, state, params, batch=...)`` returns ``(D, new_state)``.

    Args:
        projector: the forward model of the objective (its operator must have a local stencil).
        lam: the objective's Tikhonov weight or :class:`~jaxcryo.leastsq.Prior` (added to the diagonal).
        beta: EMA across steps, ``D_k = beta D_{k-1} + (1 - beta) d_k`` from ``D_0 = 0``, returned with Adam's
            bias correction ``/ (1 - beta^k)``; ``0`` (default) uses each batch's own diagonal.
        update_every: compute the diagonal only every ``m``-th step (the others reuse ``D``).

    ``batch`` is the minibatch :class:`~jaxcryo.data.Batch` and ``filters`` (optional) its
    :func:`jaxcryo.leastsq.batch_filters` (:func:`jaxcryo.solvers.make_step` passes both); in a data-parallel step
    ``make_step`` also passes ``axis_name``, over which the shards' diagonals are reduced.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if update_every < 1:
        raise ValueError("update_every must be positive")
    local_stencil_operator(projector.operator)  # NotImplementedError naming the operator

    def init_fn(params):
        rdt = jnp.real(params).dtype
        return BatchDiagonalState(jnp.zeros([], jnp.int32), jnp.zeros(params.shape, rdt), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, batch=None, filters=None, axis_name=None, **extra):
        del updates, params, extra
        if batch is None:
            raise ValueError("batch_diagonal.update needs batch= (the minibatch; jaxcryo.solvers.make_step passes it)")

        def compute(st):
            d = minibatch_diagonal(projector, batch, lam, filters, axis_name).astype(st.diag.dtype)
            return BatchDiagonalState(st.count, beta * st.diag + (1 - beta) * d, st.n_updates + 1)

        st = _refresh(state, update_every, compute)
        return _debias(st, beta), st

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# Diagonal preconditioning
# --------------------------------------------------------------------------------------------------
class ScaleByDiagonalState(NamedTuple):
    """``diag_state``: the inner estimator's state; ``threshold``: the floor on ``|D|``."""

    diag_state: Any
    threshold: jax.Array


def shell_mean(d, shells: np.ndarray):
    """Mean of ``d`` over each Fourier shell, broadcast back to the voxels (``shells`` from ``shell_index``)."""
    nsh = int(shells.max()) + 1
    # The voxel counts are known on the host: counting them in the graph (a segment_sum of ones over the
    # constant shell index) made XLA constant-fold a scatter of N^3 elements (45 s of compilation at box 256).
    cnt = np.maximum(np.bincount(shells.ravel(), minlength=nsh), 1).astype(np.float32)
    sh = jnp.asarray(shells.ravel())
    tot = jax.ops.segment_sum(d.ravel(), sh, nsh)
    return (tot / jnp.asarray(cnt, tot.dtype))[sh].reshape(d.shape)


def scale_by_diagonal(
    diagonal: optax.GradientTransformation | optax.GradientTransformationExtraArgs,
    threshold: float | None = None,
    shell_floor: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Divide updates by ``D-hat = max(|D|, threshold, shell_floor * <|D|>_shell)``, ``D`` from ``diagonal``
    (Hutchinson or fixed).

    ``threshold`` defaults to :func:`default_threshold` of the parameters' box (the paper's ``alpha``).
    ``shell_floor`` (e.g. 0.5) also floors each voxel at that fraction of the mean of ``|D|`` over its
    Fourier shell: the true diagonal varies slowly within a shell (it falls like 1/|k|), while an early
    running-mean estimate of a rarely sampled voxel can be far too small, which makes the step overshoot.
    Extra arguments (``obj_fn``) are passed through to ``diagonal``.
    """
    diagonal = optax.with_extra_args_support(diagonal)
    shells_cache: dict = {}

    def init_fn(params):
        thr = default_threshold(params.shape[-1]) if threshold is None else float(threshold)
        return ScaleByDiagonalState(diagonal.init(params), jnp.asarray(thr, jnp.real(params).dtype))

    def update_fn(updates, state, params=None, **extra):
        d, dstate = diagonal.update(updates, state.diag_state, params, **extra)
        dhat = jnp.maximum(jnp.abs(d), state.threshold)
        if shell_floor:
            n = d.shape[-1]
            if n not in shells_cache:
                shells_cache[n] = shell_index(n, d.ndim)
            dhat = jnp.maximum(dhat, shell_floor * shell_mean(jnp.abs(d), shells_cache[n]))
        return updates / dhat.astype(jnp.real(updates).dtype), ScaleByDiagonalState(dstate, state.threshold)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
