"""Reconstruction strategies: each owns its optax transformation (or solver) and its step-size policy.

A strategy is a small :class:`equinox.Module` chosen by value (``PSGD(probes=1)``) or by registry name
(``make_strategy("psgd", probes=1)``, what ``--optimizer`` takes). Two kinds:

* :class:`MinibatchStrategy` (``psgd``, ``sgd``, ``adam``): an optax transformation run by
  :func:`jaxcryo.solvers.fit` epoch after epoch. :meth:`~MinibatchStrategy.prepare` measures what the run needs
  once (a fixed preconditioner, the initial step size) and returns a :class:`Plan` (plain numbers and arrays,
  checkpointed with the run); :meth:`~MinibatchStrategy.transformation` builds the optimiser from a plan;
* :class:`OnePassStrategy` (``cg``, ``backproject``): a full-batch solver, :meth:`~OnePassStrategy.solve`.

The step-size policies are public (:func:`initial_step_size`) so that ``reconstruct``, the benchmarks and
the notebooks all use the same numbers:

* ``psgd``: ``eta_0 = 1 / lambda_max(D^-1 H_B)`` by power iteration on the first batch, ``D`` the exact
  full-data diagonal (``probes=0``) or a 16-batch Hutchinson estimate floored at half its shell mean;
  the step decays like ``eta_0 / (1 + epoch)``;
* ``sgd``: constant ``1 / lambda_max(H_B)``;
* ``adam``: ``0.02 x`` the RMS (in the Fourier ball) of the Wiener backprojection of the first batch.

``lr`` overrides any of them. Adding a strategy is one class and one registry line.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float

from ..data._batch import RawBatch, epoch_batches, iterate_batches, load_batch, to_batch
from ..errors import InputError
from ..ndimage._fourier import ball_mask, shell_index
from ..leastsq._hessian import exact_diagonal, normal_equations
from ._wiener import wiener_backprojection
from ..leastsq._linalg import conjugate_gradient, preconditioned_max_eigenvalue
from ..leastsq._loss import objective
from ._fit import make_step
from ._diagonals import hutchinson_estimate, shell_mean
from ._optim import harmonic_schedule, preconditioned_sgd, sgd
from ..leastsq._hessian import minibatch_diagonal
from ..forward._operators import NUFFT
from ..leastsq._priors import Prior, prior_diagonal
from ..leastsq._toeplitz import toeplitz_normal_equations
from ..forward._projection import Projector


@dataclass(frozen=True)
class Problem:
    """One known-pose least-squares problem: particles ``indices`` of ``source``, the forward model, the
    Tikhonov weight ``lam``, the minibatch size and the seed."""

    source: Any
    projector: Projector
    indices: np.ndarray
    lam: "float | Prior" = 0.0
    batch_size: int = 256
    seed: int = 0
    mesh: Any = None  # a device mesh for the one-pass estimate (jaxcryo.parallel); the epoch steps get theirs from fit

    @property
    def steps_per_epoch(self) -> int:
        return int(np.ceil(len(self.indices) / self.batch_size))

    def batches(self, max_batches: int | None = None):
        """Device batches over the problem's particles in order (padded), at most ``max_batches``."""
        for i, raw in enumerate(iterate_batches(self.source, self.batch_size, self.indices)):
            if max_batches is not None and i >= max_batches:
                return
            yield to_batch(raw)

    def first_batch(self):
        """The :class:`~jaxcryo.data.RawBatch` of the first ``batch_size`` particles (step-size probes)."""
        return load_batch(self.source, self.indices[: self.batch_size])

    def zeros(self):
        return jnp.zeros((self.projector.n,) * 3, jnp.complex64)


class Plan(NamedTuple):
    """What a minibatch run measured before its first step: ``eta`` (initial step size) and ``diag`` (a
    fixed preconditioner, or ``None``)."""

    eta: float
    diag: Any = None


def _lambda_max(projector: Projector, lam: "float | Prior", raw: RawBatch, diag: Array | None = None,
                own_diagonal: bool = False) -> float:
    """``lambda_max(D^-1 H_B)`` of the batch ``raw`` by the jitted power iteration: ``D`` = ``diag``, or the
    batch's own exact diagonal (:func:`jaxcryo.solvers.minibatch_diagonal`) with ``own_diagonal``, or none
    (``lambda_max(H_B)``)."""

    @jax.jit
    def f(raw, d):
        batch = to_batch(raw)
        if own_diagonal:
            d = minibatch_diagonal(projector, batch, lam)
        zeros = jnp.zeros((projector.n,) * 3, jnp.complex64)
        return preconditioned_max_eigenvalue(objective(batch, projector, lam), zeros, d)

    return float(f(raw, diag))


def batch_step_size(projector: Projector, lam: "float | Prior", raw: RawBatch) -> float:
    """``1 / lambda_max(D_B^-1 H_B)`` of one batch with its own exact diagonal ``D_B`` (at most 1): the
    step of a PSGD whose preconditioner is each minibatch's own diagonal (:class:`PSGD` with
    ``batch_diagonal``), measured on that batch (as ab initio does on its first minibatch)."""
    return float(1.0 / max(_lambda_max(projector, lam, raw, own_diagonal=True), 1.0))


def hutchinson_full_estimate(problem: Problem, max_batches: int = 16, probes: int = 4):
    """Hutchinson estimate of the full-data Hessian diagonal from up to ``max_batches`` batches (``probes``
    each), floored at half its shell mean as the optimiser does; used to choose the initial PSGD step."""
    projector, lam, n = problem.projector, problem.lam, problem.projector.n
    est = jax.jit(lambda raw, key: hutchinson_estimate(objective(to_batch(raw), projector, lam), problem.zeros(),
                                                       key, probes))
    total, count = 0.0, 0
    for i, (idx, mask) in enumerate(epoch_batches(problem.indices, problem.batch_size)[:max_batches]):
        total = total + est(load_batch(problem.source, idx, mask), jax.random.PRNGKey(problem.seed + 100 + i))
        count += 1
    d = jnp.abs(total / count)
    return jnp.maximum(d, 0.5 * shell_mean(d, shell_index(n, 3)))


def exact_problem_diagonal(problem: Problem) -> Float[Array, "n n n"] | None:
    """The exact full-data Hessian diagonal of ``problem`` (operators with a local stencil), else ``None``."""
    if not problem.projector.operator.has_local_stencil:
        return None
    return exact_diagonal(problem.projector, problem.batches(), problem.lam)


class Strategy(eqx.Module):
    """Abstract reconstruction strategy."""

    #: runs epochs of minibatch steps through :func:`jaxcryo.solvers.fit` (else :meth:`OnePassStrategy.solve`).
    minibatch: eqx.AbstractClassVar[bool]

    @property
    def name(self) -> str:
        return strategy_name(self)


class MinibatchStrategy(Strategy):
    """A strategy run as an optax transformation; ``lr`` overrides the measured initial step; ``support`` (a
    real-space ``(n, n, n)`` mask, or ``None``) multiplies the map after every step (a support constraint)."""

    minibatch: ClassVar[bool] = True  # pyright: ignore[reportIncompatibleVariableOverride]  (eqx.AbstractClassVar)
    lr: eqx.AbstractVar[float | None]
    support: eqx.AbstractVar[Float[ArrayLike, "n n n"] | None]

    @abc.abstractmethod
    def fixed_diagonal(self, problem: Problem) -> Array | None:
        """A fixed preconditioner measured once per run, or ``None``."""

    @abc.abstractmethod
    def initial_step_size(self, problem: Problem, diag: Array | None = None) -> float:
        """The step-size policy: the initial step on ``problem`` (``diag``: :meth:`fixed_diagonal`'s)."""

    @abc.abstractmethod
    def transformation(self, problem: Problem, plan: Plan) -> optax.GradientTransformationExtraArgs:
        """The optimiser of a run from its :class:`Plan`."""

    def prepare(self, problem: Problem) -> Plan:
        """Measure the run's fixed preconditioner and initial step (``lr`` if given)."""
        diag = self.fixed_diagonal(problem)
        eta = float(self.lr) if self.lr is not None else self.initial_step_size(problem, diag)
        return Plan(eta, diag)

    def make_step(self, problem: Problem, plan: Plan, mesh=None, donate: bool = True) -> Callable:
        """The jitted step of :func:`jaxcryo.solvers.make_step` for this strategy on ``problem`` (its
        transformation, Tikhonov weight and support), split over ``mesh`` when given."""
        return make_step(self.transformation(problem, plan), problem.projector, problem.lam, support=self.support,
                         donate=donate, mesh=mesh)


class ShellScheduleState(NamedTuple):
    step: Array


def scale_by_shell_schedule(rates: Float[ArrayLike, "steps shells"], n: int) -> optax.GradientTransformation:
    """Multiply step ``t``'s update voxel-wise by ``rates[t, s]``, ``s`` the voxel's Fourier shell (clipped to
    the table's last column; the table's last row is kept beyond its end): a per-shell learning-rate
    schedule for centred Fourier volumes of box ``n``."""
    table = jnp.asarray(rates, jnp.float32)
    shells = jnp.asarray(np.minimum(shell_index(n, 3), table.shape[1] - 1))

    def init(params):
        return ShellScheduleState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        rate = table[jnp.minimum(state.step, table.shape[0] - 1)]
        return rate[shells].astype(jnp.real(updates).dtype) * updates, ShellScheduleState(state.step + 1)

    return optax.GradientTransformation(init, update)


class PSGD(MinibatchStrategy):
    """SGD preconditioned by the Hessian diagonal: Hutchinson with ``probes`` probes per step, or the exact
    full-data diagonal with ``probes=0`` (operators with a local stencil). Step ``eta_0 / (1 + epoch)``,
    ``eta_0 = 1 / lambda_max(D^-1 H_B)`` (``D`` the full-data diagonal: exact, or a Hutchinson estimate).

    Options: ``batch_diagonal`` preconditions each step by its minibatch's own exact diagonal (averaged with
    factor ``beta``; local-stencil operators) instead; ``shell_rates`` ``(steps, shells)`` replaces the
    harmonic decay by a per-shell schedule (:func:`scale_by_shell_schedule`, the step size itself: ``lr``
    and the measured ``eta_0`` are not applied on top); ``support`` as :class:`MinibatchStrategy`."""

    lr: float | None = eqx.field(static=True, default=None)
    probes: int = eqx.field(static=True, default=1)
    batch_diagonal: bool = eqx.field(static=True, default=False)
    beta: float = eqx.field(static=True, default=0.9)
    shell_rates: Float[ArrayLike, "steps shells"] | None = None
    support: Float[ArrayLike, "n n n"] | None = None

    def __check_init__(self):
        if self.probes < 0:
            raise InputError(f"{{param}} {self.probes}: expected 0 (exact diagonal) or more", param="probes")

    def fixed_diagonal(self, problem: Problem) -> Array | None:
        if self.probes != 0:
            return None
        d = exact_problem_diagonal(problem)
        if d is None:
            raise InputError(f"{{param}} 0 (exact diagonal) is not available for interp {problem.projector.interp}",
                             param="probes")
        return d

    def initial_step_size(self, problem: Problem, diag: Array | None = None) -> float:
        # The step is 1/lambda_max(D^-1 H_B) for a D close to the *full-data* diagonal the optimiser converges
        # to; the first batch's own diagonal would give eta ~ 1, far too large for small batches (a voxel hit
        # by one image of a batch has H_B,jj >> H_jj): measured divergence at box 32, batch 20.
        d0 = diag if diag is not None else hutchinson_full_estimate(problem)
        return 1.0 / _lambda_max(problem.projector, problem.lam, problem.first_batch(), d0)

    def transformation(self, problem: Problem, plan: Plan) -> optax.GradientTransformationExtraArgs:
        if self.shell_rates is None:
            lr: float | optax.Schedule = harmonic_schedule(plan.eta, problem.steps_per_epoch)
        else:
            lr = 1.0
        if self.batch_diagonal:
            tx = preconditioned_sgd(lr, diagonal="batch", projector=problem.projector, lam=problem.lam,
                                    seed=problem.seed, beta=self.beta)
        else:
            tx = preconditioned_sgd(lr, diagonal=plan.diag if self.probes == 0 else None,
                                    n_probes=max(self.probes, 1), seed=problem.seed, beta=self.beta)
        if self.shell_rates is None:
            return tx
        return optax.chain(tx, scale_by_shell_schedule(self.shell_rates, problem.projector.n))


class SGD(MinibatchStrategy):
    """Plain SGD with the constant step ``1 / lambda_max(H_B)`` (``harmonic``: decaying like
    ``eta_0 / (1 + epoch)``, as :class:`PSGD`'s)."""

    lr: float | None = eqx.field(static=True, default=None)
    harmonic: bool = eqx.field(static=True, default=False)
    support: Float[ArrayLike, "n n n"] | None = None

    def fixed_diagonal(self, problem: Problem) -> Array | None:
        return None

    def initial_step_size(self, problem: Problem, diag: Array | None = None) -> float:
        return 1.0 / _lambda_max(problem.projector, problem.lam, problem.first_batch())

    def transformation(self, problem: Problem, plan: Plan) -> optax.GradientTransformationExtraArgs:
        return sgd(harmonic_schedule(plan.eta, problem.steps_per_epoch) if self.harmonic else plan.eta)


class Adam(MinibatchStrategy):
    """``optax.adam`` (the ML default), step ``0.02 x`` the RMS of the first batch's backprojection."""

    lr: float | None = eqx.field(static=True, default=None)
    support: Float[ArrayLike, "n n n"] | None = None

    def fixed_diagonal(self, problem: Problem) -> Array | None:
        return None

    def initial_step_size(self, problem: Problem, diag: Array | None = None) -> float:
        v, _ = wiener_backprojection(problem.projector, problem.source, lam=problem.lam,
                                     batch_size=problem.batch_size, indices=problem.indices[: problem.batch_size])
        m = jnp.asarray(ball_mask(problem.projector.n))
        return 0.02 * float(jnp.sqrt(jnp.mean(jnp.abs(jnp.where(m, v, 0)) ** 2)))

    def transformation(self, problem: Problem, plan: Plan) -> optax.GradientTransformationExtraArgs:
        return optax.with_extra_args_support(optax.adam(plan.eta))


class Solution(NamedTuple):
    """A one-pass solver's answer: the centred Fourier volume, the Hessian diagonal it implies (for
    combining half maps; ``None`` if unknown), and extra history fields."""

    volume_f: Any
    diag: Any
    info: dict


class OnePassStrategy(Strategy):
    """A full-batch solver of the same objective."""

    minibatch: ClassVar[bool] = False  # pyright: ignore[reportIncompatibleVariableOverride]  (eqx.AbstractClassVar)
    #: its data passes split each batch over ``problem.mesh`` (:mod:`jaxcryo.parallel`)
    sharded: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def data_passes(self, iterations: int) -> int:
        """Passes over the data that :meth:`solve` makes for ``iterations``."""

    @abc.abstractmethod
    def solve(self, problem: Problem, iterations: int, wiener=None) -> Solution:
        """Solve ``problem``; ``wiener`` may hold a one-pass estimate of the same particles
        ``(volume, weights, lam)`` that the solver can reuse instead of a data pass."""


class CG(OnePassStrategy):
    """Conjugate gradient on the normal equations; one data pass per iteration (``iterations`` = epochs)."""

    sharded: ClassVar[bool] = False  # pyright: ignore[reportIncompatibleVariableOverride]  (eqx.AbstractClassVar)
    tol: float = eqx.field(static=True, default=1e-6)

    def data_passes(self, iterations: int) -> int:
        return iterations

    def solve(self, problem: Problem, iterations: int, wiener=None) -> Solution:
        # NUFFT: the normal operator is a convolution on the 2N grid (one kernel pass, then FFTs per iteration)
        build = toeplitz_normal_equations if isinstance(problem.projector.operator, NUFFT) else normal_equations
        ne = build(problem.projector, problem.source, problem.batch_size, problem.lam, problem.indices)
        res = conjugate_gradient(ne.matvec, ne.rhs, None, tol=self.tol, maxiter=iterations)
        return Solution(res.x, exact_problem_diagonal(problem), {"relative_residual": float(res.residuals[-1])})


class Backproject(OnePassStrategy):
    """One-pass Wiener-filter backprojection (exact for ``nearest`` slices)."""

    sharded: ClassVar[bool] = True  # pyright: ignore[reportIncompatibleVariableOverride]  (eqx.AbstractClassVar)

    def data_passes(self, iterations: int) -> int:
        return 1

    def solve(self, problem: Problem, iterations: int, wiener=None) -> Solution:
        lam = prior_diagonal(problem.lam, problem.projector.n)
        if wiener is not None:  # the same sums with another regulariser: no data pass
            v0, den, lam0 = wiener
            safe0, safe = den + lam0, den + lam
            v = jnp.where(safe > 0, v0 * safe0 / jnp.where(safe > 0, safe, 1), 0)
            return Solution(v, safe, {})
        v, den = wiener_backprojection(problem.projector, problem.source, lam=problem.lam,
                                       batch_size=problem.batch_size, indices=problem.indices, mesh=problem.mesh)
        return Solution(v, den + lam, {})


#: The strategies by user-facing name (``--optimizer``). Adding one: a class and a line here.
STRATEGIES: dict[str, type[Strategy]] = {
    "psgd": PSGD,
    "sgd": SGD,
    "adam": Adam,
    "cg": CG,
    "backproject": Backproject,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def make_strategy(name: "str | Strategy", **options) -> Strategy:
    """The strategy registered as ``name``, given the ``options`` its class takes (others are ignored, so
    callers may pass e.g. ``probes`` and ``lr`` for any strategy). Raises :class:`InputError` (parameter
    ``optimizer``) for an unknown name."""
    if isinstance(name, Strategy):
        return name
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise InputError(f"{{param}} {name!r}: expected one of {', '.join(STRATEGY_NAMES)}",
                         param="optimizer") from None
    fields = {f.name for f in cls.__dataclass_fields__.values()}
    return cls(**{k: v for k, v in options.items() if k in fields})


def strategy_name(strategy: Strategy) -> str:
    for name, cls in STRATEGIES.items():
        if type(strategy) is cls:
            return name
    return type(strategy).__name__


def initial_step_size(strategy: "str | MinibatchStrategy", problem: Problem, **options) -> float:
    """The initial step size ``strategy`` would use on ``problem`` (its :meth:`~MinibatchStrategy.prepare`)."""
    s = make_strategy(strategy, **options)
    if not isinstance(s, MinibatchStrategy):
        raise InputError(f"{{param}} {strategy_name(s)!r} has no step size", param="optimizer")
    return s.prepare(problem).eta
