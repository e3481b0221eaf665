"""Diagonally preconditioned SGD as optax gradient transformations: the line search and the presets.

The Hessian-diagonal estimators (:func:`hutchinson_diagonal`, :func:`batch_diagonal`, :func:`fixed_diagonal`)
and :func:`scale_by_diagonal` are in :mod:`._diagonals`; here:

* :func:`armijo_linesearch`: the paper's preconditioned Armijo backtracking (step grown by 1.2 before each
  step, halved on failure, reset every epoch), taking ``obj_fn`` too.
* :func:`preconditioned_sgd`: the chain of the above, composing with optax schedules and momentum.

Gradients are the steepest-ascent directions of :mod:`jaxcryo.loss` (already conjugated for complex
volumes), so a transformation's output ``u`` is applied as ``v + u``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..leastsq._linalg import default_threshold
from ..leastsq._loss import gradient
from ._diagonals import Averaging, batch_diagonal, fixed_diagonal, hutchinson_diagonal, scale_by_diagonal


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
    kw: dict[str, Any] = dict(linesearch=True, steps_per_epoch=steps_per_epoch, init_learning_rate=10.0, armijo_c=0.99,
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
