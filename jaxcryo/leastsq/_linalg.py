"""Linear algebra on volumes: the power iteration, Lanczos, condition numbers and conjugate gradient.

One of each, for any linear operator given as a matvec ``z -> A z`` on ``(N, N, N)`` arrays:

* :func:`power_iteration`: the largest eigenvalue. With ``traced=True`` it is a ``jax.lax.fori_loop`` over a
  JAX matvec, usable inside ``jax.jit`` (e.g. :func:`preconditioned_max_eigenvalue`, ``lambda_max`` of
  ``D^-1 H_B`` by Hessian-vector products); otherwise a Python loop, so the matvec may stream data from a
  source (:func:`jaxcryo.leastsq.normal_equations`) or run on the host in NumPy float64
  (:class:`jaxcryo.leastsq.HessianOperator`).
* :func:`lanczos_extreme_eigs` and :func:`condition_number`: both ends of the spectrum of a Hermitian
  operator restricted to a voxel mask, on the host in float64 (see :mod:`jaxcryo.leastsq` for the
  conventions of the report).
* :func:`conjugate_gradient`: CG for a Hermitian positive (semi)definite operator, one matvec per iteration.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Num

from ..ndimage._fourier import ball_mask, shell_index
from ._loss import hvp

#: Default maximum number of Lanczos iterations per operator (each run stops earlier once converged).
LANCZOS_ITERS = 500
#: Default Lanczos stopping tolerance (relative residual of the extreme Ritz pairs).
LANCZOS_RTOL = 1e-2


def default_threshold(n: int) -> float:
    """The paper's floor on the diagonal: ``1 / (number of voxels in the outermost Fourier shell n//2)``."""
    return 1.0 / float(np.sum(shell_index(n, 3) == n // 2))


def _rng(key) -> np.random.Generator:
    """A NumPy generator from an int seed or a JAX PRNG key."""
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
                      else key).ravel()
    return np.random.default_rng([int(x) for x in data])


def _random_vector(rng, shape, complex_: bool) -> np.ndarray:
    x = rng.standard_normal(shape)
    if complex_:
        x = x + 1j * rng.standard_normal(shape)
    return x


# --------------------------------------------------------------------------------------------------
# Power iteration
# --------------------------------------------------------------------------------------------------
def power_iteration(matvec: Callable, start: Num[ArrayLike, "*d"], key=0, iters: int = 100,
                    mask: Bool[ArrayLike, "*d"] | None = None, *, rayleigh: bool = True,
                    traced: bool = False):
    """Largest eigenvalue of ``P A P`` (``A = matvec``, ``P`` the restriction to ``mask`` if given).

    Args:
        matvec: ``z -> A z``.
        start: the start vector (used as given), or a shape: then a random complex normal vector from
            ``key`` (int seed or JAX key), masked and normalised, in NumPy complex128.
        iters: iterations ``y = A x``, ``x <- y / ||y||``.
        rayleigh: estimate by the Rayleigh quotient ``Re<x, y> / <x, x>`` (Hermitian ``A``); ``False``: by
            the growth ``||y|| / ||x||`` (e.g. ``D^-1 H``, similar to a Hermitian operator but not itself one).
        traced: run as a ``jax.lax.fori_loop`` (``matvec`` must be a traceable JAX function); the result is
            a JAX scalar and the call can sit inside ``jax.jit``. Otherwise a Python loop in the array library
            of ``start`` (NumPy or JAX), returning a float.

    Returns:
        the last estimate.
    """
    if isinstance(start, (tuple, list)):
        x = _random_vector(_rng(key), tuple(start), True)
        if mask is not None:
            x = x * np.asarray(mask, bool)
        start = x / np.linalg.norm(x)
    host = isinstance(start, np.ndarray) and not traced
    xp = np if host else jnp
    m = None if mask is None else (np.asarray(mask, bool) if host else jnp.asarray(mask, bool))

    def step(x):
        y = np.asarray(matvec(x), x.dtype) if host else matvec(x)
        if m is not None:
            y = y * m
        if rayleigh:
            lam = xp.real(xp.vdot(x, y)) / xp.real(xp.vdot(x, x))
        else:
            lam = xp.linalg.norm(y) / xp.linalg.norm(x)
        return y / xp.linalg.norm(y), lam

    if traced:
        lam0 = jnp.zeros([], jnp.real(start).dtype)
        _, lam = jax.lax.fori_loop(0, iters, lambda _, c: step(c[0]), (start, lam0))
        return lam
    x, lam = start, 0.0
    for _ in range(iters):
        x, lam = step(x)
    return float(lam)


def largest_eigenvalue(matvec: Callable, shape, dtype=jnp.complex64, iters: int = 30, seed: int = 0) -> float:
    """:func:`power_iteration` (Rayleigh quotient, Python loop) of a Hermitian PSD JAX ``matvec`` (e.g. the
    streamed :func:`jaxcryo.leastsq.normal_equations`) from a real normal vector of ``default_rng(seed)``
    in ``dtype``: ``lambda_max`` of ``H`` for the step size ``c / lambda_max`` of plain SGD."""
    x0 = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
    return power_iteration(matvec, x0, iters=iters)


def preconditioned_max_eigenvalue(obj_fn: Callable, params: Num[ArrayLike, "*d"], diag: Float[ArrayLike, "*d"],
                                  threshold: float | None = None,
                                  iters: int = 20, seed: int = 0) -> jax.Array:
    """Largest eigenvalue of ``D-hat^{-1} H`` (``H`` the Hessian of ``obj_fn`` at ``params``) by the traced
    :func:`power_iteration` on Hessian-vector products (growth estimate); jit-compatible.

    ``D-hat = max(|diag|, threshold)`` (default :func:`jaxcryo.solvers.default_threshold`); ``diag=None`` gives
    the largest eigenvalue of ``H`` itself. The start vector is ``jax.random.normal(PRNGKey(seed))``. A
    stable constant step for (preconditioned) gradient descent is below ``2 / lambda_max``.
    """
    n = params.shape[-1]
    rdt = jnp.real(params).dtype
    if diag is None:
        dhat = jnp.ones(params.shape, rdt)
    else:
        thr = default_threshold(n) if threshold is None else threshold
        dhat = jnp.maximum(jnp.abs(diag), thr).astype(rdt)
    x = jax.random.normal(jax.random.PRNGKey(seed), params.shape, rdt).astype(params.dtype)
    return power_iteration(lambda z: hvp(obj_fn, params, z) / dhat, x / jnp.linalg.norm(x), iters=iters,
                           rayleigh=False, traced=True)


# --------------------------------------------------------------------------------------------------
# Lanczos and condition numbers
# --------------------------------------------------------------------------------------------------
def scaled_operator(matvec: Callable, scale: Float[ArrayLike, "*d"]) -> Callable:
    """``z -> scale * A(scale * z)`` (e.g. ``scale = D^-1/2``: the symmetric form of ``D^-1 A``)."""
    s = np.asarray(scale, np.float64)

    def mv(z):
        return s * np.asarray(matvec(s * np.asarray(z)))

    mv.is_real = getattr(matvec, "is_real", False)  # type: ignore[attr-defined]  # read by the eigensolvers
    return mv


def _eigh_tridiagonal(alpha, beta):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix with diagonal ``alpha``
    and off-diagonal ``beta[:len(alpha) - 1]`` (dense ``np.linalg.eigh``: Lanczos runs are short)."""
    a = np.asarray(alpha, np.float64)
    b = np.asarray(beta[: a.size - 1], np.float64)
    return np.linalg.eigh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))


def lanczos_extreme_eigs(matvec: Callable, mask: Bool[ArrayLike, "*d"], key=0, iters: int = LANCZOS_ITERS,
                         return_ritz: bool = False,
                         real: bool | None = None, rtol: float = LANCZOS_RTOL, check_every: int = 10):
    """Smallest and largest eigenvalues of ``P A P`` on the subspace of ``mask`` voxels (``A`` Hermitian).

    Lanczos (three-term recurrence plus full reorthogonalisation by classical Gram-Schmidt, repeated
    when the norm drops by more than 0.7, Kahan's criterion) in float64 on the host: complex128
    vectors and ``np.vdot``, or float64 real vectors when ``real`` (default: ``matvec.is_real``; a real
    symmetric ``A`` has the same eigenvalues on complex and real vectors). At most ``iters`` iterations;
    every ``check_every`` it stops once both extreme Ritz pairs have residual norms
    ``beta_j |s_j| <= rtol * |theta|`` (then each lies within ``rtol`` relative of an eigenvalue); ``rtol=0``
    always runs ``iters``. Stops early on an invariant subspace. Ritz values lie inside the spectrum, so
    ``lambda_min`` is approached from above.

    Returns:
        ``(lambda_min, lambda_max)``, plus ``info`` (dict: ``ritz`` values, ``iters`` run, ``residuals`` of
        the extreme pairs) if ``return_ritz``.
    """
    m = np.asarray(mask, bool)
    idx = np.flatnonzero(m.ravel())
    k = idx.size
    if real is None:
        real = bool(getattr(matvec, "is_real", False))
    dt = np.float64 if real else np.complex128
    iters = int(min(iters, k))

    def op(v):
        x = np.zeros(m.size, dt)
        x[idx] = v
        y = np.asarray(matvec(x.reshape(m.shape))).ravel()[idx]
        return (y.real if real else y).astype(dt)

    q = _random_vector(_rng(key), (k,), not real).astype(dt)
    q /= np.linalg.norm(q)
    Q = np.empty((iters, k), dt)
    alpha: list[float] = []
    beta: list[float] = []
    res = (np.inf, np.inf)
    for j in range(iters):
        Q[j] = q
        w = op(q)
        a = float(np.real(np.vdot(q, w)))
        alpha.append(a)
        w -= a * q
        if j:
            w -= beta[-1] * Q[j - 1]
        Qj = Q[: j + 1]
        nw = float(np.linalg.norm(w))
        for _ in range(2):  # full reorthogonalisation w -= Q Q^H w (no copy of Q); a 2nd pass if needed
            h = Qj @ w if real else np.conj(Qj @ np.conj(w))
            w -= h @ Qj
            b = float(np.linalg.norm(w))
            if b > 0.7 * nw:  # "twice is enough" (Kahan): little cancellation, w is orthogonal
                break
            nw = b
        beta.append(b)
        if b <= 1e-10 * max(abs(a), 1e-300):  # invariant subspace: Ritz values exact
            res = (0.0, 0.0)
            break
        if rtol > 0 and (j + 1) % check_every == 0:
            th, s = _eigh_tridiagonal(alpha, beta)
            res = (b * abs(s[-1, 0]), b * abs(s[-1, -1]))
            if res[0] <= rtol * abs(th[0]) and res[1] <= rtol * abs(th[-1]):
                break
        q = w / b
    ritz, s = _eigh_tridiagonal(alpha, beta)
    if res[0] != 0.0:
        res = (beta[-1] * abs(s[-1, 0]), beta[-1] * abs(s[-1, -1]))
    out = (float(ritz[0]), float(ritz[-1]))
    if return_ritz:
        return (*out, {"ritz": ritz, "iters": len(alpha), "residuals": res})
    return out


def condition_number(matvec: Callable, mask: Bool[ArrayLike, "*d"], key=0, iters: int = LANCZOS_ITERS,
                     preconditioner: Float[ArrayLike, "*d"] | None = None,
                     threshold: float | None = None, rtol: float = LANCZOS_RTOL, return_info: bool = False):
    """``(kappa, lambda_min, lambda_max)`` of ``P A P`` (``A = matvec``) inside ``mask`` by Lanczos.

    ``preconditioner``: a diagonal ``D`` (real ``(N, N, N)``); the eigenvalues are then those of
    ``D-hat^-1 A`` with ``D-hat = max(|D|, threshold)`` (default :func:`jaxcryo.solvers.default_threshold`),
    computed on the similar ``D-hat^-1/2 A D-hat^-1/2``. ``kappa = inf`` if ``lambda_min <= 0``.
    ``return_info`` appends the Lanczos info dict (iterations, residuals).
    """
    op = matvec
    if preconditioner is not None:
        d = np.asarray(preconditioner, np.float64)
        thr = default_threshold(d.shape[-1]) if threshold is None else float(threshold)
        op = scaled_operator(matvec, 1.0 / np.sqrt(np.maximum(np.abs(d), thr)))
    lo, hi, info = lanczos_extreme_eigs(op, mask, key, iters, return_ritz=True, rtol=rtol)
    out = ((hi / lo if lo > 0 else float("inf")), lo, hi)
    return (*out, info) if return_info else out


# --------------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------------
class CGResult(NamedTuple):
    x: jax.Array
    residuals: list  # relative residual ||b - Hx|| / ||b|| per iteration
    iterations: int


def conjugate_gradient(matvec: Callable, b: Num[ArrayLike, "*d"], x0: Num[ArrayLike, "*d"] | None = None,
                       tol: float = 1e-4, maxiter: int = 500,
                       callback: Callable | None = None) -> CGResult:
    """Conjugate gradient for a Hermitian positive (semi)definite ``matvec`` (Python loop, one matvec per
    iteration so that ``matvec`` may stream data). Stops at relative residual ``tol``."""
    x = jnp.zeros_like(b) if x0 is None else x0
    r = b - matvec(x) if x0 is not None else b
    p = r
    rs = jnp.real(jnp.vdot(r, r))
    bnorm = float(jnp.sqrt(jnp.real(jnp.vdot(b, b))))
    res = [float(jnp.sqrt(rs)) / bnorm]
    it = 0
    while res[-1] > tol and it < maxiter:
        hp = matvec(p)
        alpha = rs / jnp.real(jnp.vdot(p, hp))
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = jnp.real(jnp.vdot(r, r))
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
        res.append(float(jnp.sqrt(rs)) / bnorm)
        if callback is not None:
            callback(it, x, res[-1])
    return CGResult(x, res, it)


def relative_error_in_ball(x: Num[ArrayLike, "n n n"], ref: Num[ArrayLike, "n n n"], radius: float | None = None
                           ) -> float:
    """``||x - ref|| / ||ref||`` over the Fourier voxels with ``|k| <= radius`` (default ``n/2``)."""
    m = jnp.asarray(ball_mask(x.shape[-1], radius))
    return float(jnp.linalg.norm(jnp.where(m, x - ref, 0)) / jnp.linalg.norm(jnp.where(m, ref, 0)))
