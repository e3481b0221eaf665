"""Diagonally preconditioned SGD as optax gradient transformations.

The pieces, each a small ``optax.GradientTransformationExtraArgs`` with NamedTuple state and pure
``init``/``update``:

* :func:`hutchinson_diagonal`: estimates ``diag(H)`` of the objective passed as the ``obj_fn`` extra argument
  (the protocol of ``optax.contrib``'s Sophia) with ``K`` Rademacher probes, vmapped, by forward-over-reverse
  HVPs; carries its running average and PRNG key. Its ``update`` *returns the diagonal estimate*.
* :func:`batch_diagonal`: the exact diagonal of each minibatch's Hessian (slice operators with a local
  stencil: one adjoint pass, no probe noise), from the ``batch`` extra argument, optionally EMA-averaged.
* :func:`fixed_diagonal`: a precomputed diagonal (e.g. :func:`jaxcryo.leastsq.exact_diagonal`, the
  "precomputed" preconditioner of the paper) in the same protocol.
* :func:`scale_by_diagonal`: divides the updates by ``max(|D|, threshold)`` with ``D`` from one of the above.
* :func:`armijo_linesearch`: the paper's preconditioned Armijo backtracking (step grown by 1.2 before each
  step, halved on failure, reset every epoch), taking ``obj_fn`` too.
* :func:`preconditioned_sgd`: the chain of the above, composing with optax schedules and momentum.

Gradients are the steepest-ascent directions of :mod:`jaxcryo.loss` (already conjugated for complex
volumes), so a transformation's output ``u`` is applied as ``v + u``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..ndimage._fourier import shell_index
from ..leastsq._loss import batch_filters, gradient
from ..jax_util import psum
from ..leastsq._linalg import default_threshold
from ..leastsq._priors import prior_diagonal
from ..forward._projection import slice_points

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


# --------------------------------------------------------------------------------------------------
# Exact diagonal of the minibatch Hessian (operators with a local stencil)
# --------------------------------------------------------------------------------------------------
def minibatch_diagonal(projector, batch, lam=0.0, filters=None, axis_name=None):
    """The exact diagonal of the minibatch Hessian ``(1/|B|) sum_i w_i diag(S_i^H M S_i) + lambda`` (real
    ``(n, n, n)``), for a slice operator with a local stencil (nearest, trilinear without oversampling).

    One adjoint pass and no probe noise: the squared-weight backprojection of ``w_i mask_i M CTF_i^2``
    (:func:`jaxcryo.leastsq.batch_diagonal_sum` divided by the real images of the batch, plus ``lam``, a float
    or a :class:`~jaxcryo.leastsq.Prior`). ``M CTF^2`` is read as ``|filter|^2`` of the batch's
    :func:`jaxcryo.leastsq.batch_filters` (``filters`` if given: :func:`jaxcryo.solvers.make_step` passes the ones
    its objective uses, so a step evaluates the CTF once), equal to ``batch_diagonal_sum`` to rounding
    (``|exp(i phi)|^2 = 1``). ``axis_name``: ``batch`` is one device's shard of a data-parallel step
    (:mod:`jaxcryo.parallel`); the backprojection and the image count are ``psum``-reduced over that axis.
    """
    op = projector.operator
    if not op.has_local_stencil:
        op.squared_weight_slice(None, None)  # raises NotImplementedError naming the operator
    n = projector.n
    rdt = jnp.real(batch.images_f).dtype
    f = batch_filters(batch, projector) if filters is None else filters
    w = jnp.real(f * jnp.conj(f)) * (batch.weights * batch.mask)[:, None, None]
    pts = slice_points(batch.rotations, n, rdt)
    (d,) = jax.linear_transpose(lambda v: op.squared_weight_slice(v, pts), jax.ShapeDtypeStruct((n,) * 3, rdt))(w)
    d, count = psum((d, jnp.sum(batch.mask)), axis_name)  # d: already reduced by the transpose (see psum)
    return d / jnp.maximum(count, 1.0) + prior_diagonal(lam, n, rdt)


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
    if not projector.operator.has_local_stencil:
        projector.operator.squared_weight_slice(None, None)  # NotImplementedError naming the operator

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


# --------------------------------------------------------------------------------------------------
# Preconditioned Armijo backtracking line search
# --------------------------------------------------------------------------------------------------
class ArmijoState(NamedTuple):
    count: jax.Array
    learning_rate: jax.Array
    n_evals: jax.Array


def armijo_linesearch(
    init_learning_rate: float = 10.0,
    c: float = 1e-4,
    increase: float = 1.2,
    decrease: float = 0.5,
    max_backtracking: int = 30,
    reset_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Backtracking Armijo search along ``-updates`` (the preconditioned ascent direction ``p``).

    Per step: ``eta <- increase * eta``; while ``f(v - eta p) > f(v) - c * eta * Re<g, p>`` halve ``eta``
    (at most ``max_backtracking`` times); return ``-eta p``. ``eta`` is reset to ``init_learning_rate``
    every ``reset_every`` steps (one epoch). Needs the extra arguments ``obj_fn`` and ``grad`` (the raw
    gradient ``g``; with ``grad=None`` the updates are taken as the gradient, i.e. no preconditioning).
    The value ``f(v)`` can be passed as ``value`` to save an evaluation.
    """

    def init_fn(params):
        rdt = jnp.real(params).dtype
        return ArmijoState(jnp.zeros([], jnp.int32), jnp.asarray(init_learning_rate / increase, rdt),
                           jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, obj_fn=None, grad=None, value=None, **extra):
        del extra
        if params is None or obj_fn is None:
            raise ValueError("armijo_linesearch.update needs params= and obj_fn=")
        g = updates if grad is None else grad
        f0 = obj_fn(params) if value is None else value
        slope = jnp.real(jnp.vdot(g, updates))  # Re<g, p> >= 0 for a positive preconditioner
        lr0 = state.learning_rate
        if reset_every is not None:
            lr0 = jnp.where(state.count % reset_every == 0, init_learning_rate / increase, lr0)
        lr0 = lr0 * increase

        def cond(c_):
            lr, i, fnew = c_
            bad = (fnew > f0 - c * lr * slope) | ~jnp.isfinite(fnew)
            return bad & (i < max_backtracking)

        def body(c_):
            lr, i, _ = c_
            lr = lr * decrease
            return lr, i + 1, obj_fn(params - lr * updates)

        lr, i, _ = jax.lax.while_loop(cond, body, (lr0, jnp.zeros([], jnp.int32), obj_fn(params - lr0 * updates)))
        new = ArmijoState(state.count + 1, lr, state.n_evals + i + 1)
        return (-lr * updates).astype(updates.dtype), new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------------
def preconditioned_sgd(
    learning_rate: float | optax.Schedule | None = 1.0,
    diagonal=None,
    n_probes: int = 1,
    seed: int = 0,
    averaging: Averaging = "paper",
    beta: float = 0.9,
    update_every: int = 1,
    init_value: float | None = None,
    threshold: float | None = None,
    shell_floor: float | None = 0.5,
    momentum: float | None = None,
    linesearch: bool = False,
    steps_per_epoch: int | None = None,
    init_learning_rate: float = 10.0,
    projector=None,
    lam=0.0,
    armijo_c: float = 1e-4,
    increase: float = 1.2,
) -> optax.GradientTransformationExtraArgs:
    """SGD with a diagonal preconditioner: ``v <- v - eta * D-hat^{-1} g``.

    Args:
        learning_rate: constant or optax schedule (ignored with ``linesearch=True``).
        diagonal: where ``D`` comes from:

            * ``None`` or ``"hutchinson"``: Hutchinson's estimate from HVPs of ``obj_fn``
              (:func:`hutchinson_diagonal`; any model);
            * ``"batch"``: the exact diagonal of each minibatch's Hessian (:func:`batch_diagonal`: one adjoint
              pass, no probe noise; slice operators with a local stencil); needs ``projector`` (and ``lam``)
              and the ``batch`` extra argument, which :func:`jaxcryo.solvers.make_step` passes;
            * an array: a fixed diagonal (e.g. :func:`jaxcryo.leastsq.exact_diagonal`).
        n_probes, seed, averaging, init_value: Hutchinson options (see :func:`hutchinson_diagonal`).
        beta: EMA factor of the Hutchinson averaging, and of ``"batch"`` (which averages the minibatch
            diagonals with bias correction; 0 uses each batch's own).
        update_every: refresh the Hutchinson or batch diagonal every ``m`` steps (the others reuse it).
        threshold: floor on ``|D|`` (default :func:`default_threshold`).
        shell_floor: for the Hutchinson and batch diagonals, floor ``|D|`` at this fraction of its shell mean
            (see :func:`scale_by_diagonal`); not applied to a fixed (exact) diagonal.
        momentum: optional heavy-ball momentum (``optax.trace``).
        linesearch: use :func:`armijo_linesearch` (reset every ``steps_per_epoch``) instead of a fixed step.
        init_learning_rate, armijo_c, increase: the line search's ``eta_0``, sufficient-decrease constant
            ``c`` and growth factor before each step (Algorithm 1 of the paper: 10, 0.99, 1.2).
        projector, lam: the objective's forward model and Tikhonov weight (or prior), for ``"batch"``.

    ``update(grads, state, params, obj_fn=..., grad=grads, batch=...)``: ``obj_fn`` is the minibatch
    objective (:func:`jaxcryo.leastsq.objective`); ``grad`` is needed by the line search, ``batch`` by
    ``diagonal="batch"``.
    """
    kind = diagonal if isinstance(diagonal, str) else ("hutchinson" if diagonal is None else "fixed")
    if kind == "hutchinson":
        diag_tx = hutchinson_diagonal(seed, n_probes, averaging, beta, update_every, init_value)
    elif kind == "batch":
        if projector is None:
            raise ValueError("preconditioned_sgd(diagonal='batch') needs projector= (the objective's forward model)")
        diag_tx = batch_diagonal(projector, lam, beta, update_every)
    elif kind == "fixed":
        diag_tx = fixed_diagonal(diagonal)
    else:
        raise ValueError(f"diagonal must be None, 'hutchinson', 'batch' or an array, got {diagonal!r}")
    parts: list = [scale_by_diagonal(diag_tx, threshold, None if kind == "fixed" else shell_floor)]
    if momentum:
        parts.append(optax.trace(decay=momentum))
    if linesearch:
        parts.append(armijo_linesearch(init_learning_rate, c=armijo_c, increase=increase,
                                       reset_every=steps_per_epoch))
    else:
        parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def sgd(learning_rate: float | optax.Schedule = 1.0, momentum: float | None = None,
        linesearch: bool = False, steps_per_epoch: int | None = None,
        init_learning_rate: float = 1.0, armijo_c: float = 1e-4, increase: float = 2.0
        ) -> optax.GradientTransformationExtraArgs:
    """Plain SGD in the same protocol (``optax.sgd``, or the Armijo search without preconditioner: the
    paper's plain SGD grows the step by ``increase = 2`` before each step from ``eta_0 = 1``)."""
    if linesearch:
        parts = [optax.trace(decay=momentum)] if momentum else []
        return optax.chain(*parts, armijo_linesearch(init_learning_rate, c=armijo_c, increase=increase,
                                                     reset_every=steps_per_epoch))
    return optax.with_extra_args_support(optax.sgd(learning_rate, momentum=momentum))


def paper_sgd(steps_per_epoch: int, armijo_c: float = 0.99) -> optax.GradientTransformationExtraArgs:
    """Plain SGD as Toader, Brubaker & Lederman (2025) ran it: Armijo backtracking from ``eta_0 = 1``, the step
    doubled before each step, halved on failure, reset every epoch (sufficient-decrease ``c = 0.99``, as
    their Algorithm 1). Use with :func:`jaxcryo.solvers.fit`, which passes the ``obj_fn`` it needs."""
    return sgd(linesearch=True, steps_per_epoch=steps_per_epoch, init_learning_rate=1.0, armijo_c=armijo_c,
               increase=2.0)


def paper_psgd(steps_per_epoch: int, seed: int = 0, diagonal=None, update_every: int = 1,
               projector=None, lam=0.0) -> optax.GradientTransformationExtraArgs:
    """Algorithm 1 of Toader, Brubaker & Lederman (2025) as published: one Rademacher probe per step, the
    running mean of ``z * H_B z`` then ``D_k = 0.9 D_{k-1} + 0.1 d-bar_k`` from ``D_0 = 1``, ``D-hat =
    max(|D|, 1 / voxels in the outermost shell)``, and the preconditioned Armijo search (``c = 0.99``, step
    x1.2 before each step, halved on failure, reset every epoch to ``eta_0 = 10``).

    ``diagonal``: ``None`` (Hutchinson, the algorithm), ``"batch"`` (the exact minibatch diagonal instead:
    needs ``projector`` and ``lam``) or an array (the paper's "precomputed" preconditioner); the line search
    and threshold stay the same. ``update_every``: refresh the Hutchinson or batch diagonal every m steps.
    """
    kw = dict(linesearch=True, steps_per_epoch=steps_per_epoch, init_learning_rate=10.0, armijo_c=0.99,
              increase=1.2, shell_floor=None, update_every=update_every)
    if diagonal is None:
        return preconditioned_sgd(diagonal="hutchinson", n_probes=1, averaging="paper", beta=0.9, init_value=1.0,
                                  seed=seed, **kw)
    return preconditioned_sgd(diagonal=diagonal, projector=projector, lam=lam, **kw)


def harmonic_schedule(init_value: float, steps_per_epoch: int) -> optax.Schedule:
    """``eta_k = init_value / (1 + k / steps_per_epoch)``: the step decays like 1/epoch.

    With a preconditioner close to the Hessian diagonal a constant step leaves an error floor proportional
    to the step (minibatch noise at poorly sampled high frequencies); decaying like 1/epoch averages the
    minibatches out, as the running mean of the data does for ``nearest`` slices.
    """
    return lambda k: init_value / (1.0 + k / steps_per_epoch)
