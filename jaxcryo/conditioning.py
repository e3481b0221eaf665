"""Conditioning of the known-pose reconstruction problem.

The Hessian of the least-squares loss of :mod:`jaxcryo.loss` (mean over images, weights 1) is

    ``H = (1/B) sum_i S_i^H M S_i + lam I``

on complex Fourier volumes. It does not depend on the point (the loss is quadratic) nor on the in-plane
shifts (``|exp(2 pi i k.o)| = 1``). This module estimates its extreme eigenvalues and condition number,
with and without the diagonal preconditioner of :mod:`jaxcryo.optim`, and compares with the theoretical
growth with box size.

Conventions (the numbers ``jaxcryo condition`` reports):

* **Restriction to the ball.** Eigenvalues are those of ``P H P`` on the subspace of voxels with
  ``|k| <= N/2`` (``P`` = :func:`jaxcryo.fourier.ball_mask`); outside the ball the data say nothing
  (``H`` is 0 there, or ``lam``).
* **Preconditioned.** ``kappa(D^-1 H)`` is computed from the similar symmetric operator
  ``D^-1/2 P H P D^-1/2``, ``D = max(|diag H|, default_threshold(N))`` with ``diag H`` from
  :func:`jaxcryo.optim.exact_diagonal` (the thresholded diagonal the optimiser uses).
* **Operator.** :func:`hessian_operator` returns a matvec on complex ``(N, N, N)`` volumes. For ``nearest``
  and ``trilinear`` slices without oversampling it assembles ``H`` once as a 27-point stencil (the exact
  operator: each image pixel couples the <= 8 voxels of its interpolation cube), so a matvec costs
  milliseconds instead of the ~1.5 s of a 2,000-image HVP at box 32 on a CPU; the tests check it against
  :func:`jaxcryo.loss.hvp`. Other slice operators (``nufft``, oversampling) use chunked HVPs.
* **Arithmetic.** Lanczos runs on the host in float64 (complex128, ``np.vdot``) with full
  reorthogonalisation (classical Gram-Schmidt, repeated when needed). The stencil is assembled in float64, so the
  whole computation is float64 without enabling ``jax_enable_x64`` (the HVP path evaluates in the JAX
  default precision, float32 unless x64 is on: relative error ~1e-6 of ``lambda_max``, fine for
  ``kappa`` up to ~1e4). With real interpolation weights and a real CTF, ``H`` is a real symmetric matrix
  acting alike on real and imaginary parts, so its complex spectrum equals its real one; such operators
  are flagged ``is_real`` and Lanczos then uses float64 real vectors (a quarter of the flops, half the
  memory; identical eigenvalues).
* **Accuracy.** Lanczos Ritz values bound the spectrum from inside: ``lambda_max`` converges in a few
  dozen iterations; ``lambda_min`` sits in a dense cluster (high-frequency modes that trilinear
  interpolation attenuates) and converges slowly from above, so ``kappa`` is a slight *under*-estimate.
  Runs stop when both extreme Ritz pairs have residual ``<= 1e-2 * |theta|`` (at most
  :data:`LANCZOS_ITERS`): at box 32 (2,000 poses) that is ~300 iterations for ``H`` and ~140 for
  ``D^-1 H``, and ``lambda_min`` then agrees with ARPACK (implicitly restarted Lanczos, converged) and
  with 600 iterations to ~1e-4 relative; at box 64 ~350 and ~150 iterations.
* **Tikhonov.** The default is ``lam = 0``: with 2,000 uniform poses and trilinear slices every ball voxel
  is touched, and ``lambda_min > 0`` (it is reported as measured; if it is ``<= 0`` the condition number
  is reported as ``inf``, never clipped). Pass ``lam`` (the paper uses ``1e-8``, negligible here) to
  regularise.

Prediction (:func:`predicted_condition_number`): the paper's lower bound for the nearest-slice (diagonal)
Hessian, ``kappa >= (1 + lam) / (p + lam)`` with ``p`` = voxels in the central disc / voxels in the ball
(radius ``R = N/2``), ``p ~ 3 / (4R)``, so ``kappa ~ 4R/3 = 2N/3``: linear growth with the box. It bounds
the *diagonal* spread (the centre voxel is on every slice, a voxel at radius ``|k|`` on a fraction
``~ 1/|k|`` of them). Trilinear interpolation adds off-diagonal coupling that makes the measured ``kappa(H)``
much larger than the bound (checkerboard-like modes at high frequency are attenuated by the
interpolation, and the fall-off of the diagonal makes them the smallest). The diagonal preconditioner
removes the ``1/|k|`` fall-off; what is left, ``kappa(D^-1 H)``, is the interpolation's own conditioning
and hardly grows with the box (measured ~25-29 at boxes 16-64, 2,000 poses).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .ctf import CTFParams
from .fourier import ball_mask
from .projection import Projector, slice_points

#: Default maximum number of Lanczos iterations per operator (each run stops earlier once converged).
LANCZOS_ITERS = 500
#: Default Lanczos stopping tolerance (relative residual of the extreme Ritz pairs).
LANCZOS_RTOL = 1e-2

# The 27 offsets (dz, dy, dx) in {-1, 0, 1}^3 of the stencil, index (dz+1)*9 + (dy+1)*3 + (dx+1).
_OFFSETS = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# --------------------------------------------------------------------------------------------------
# The Hessian as an operator
# --------------------------------------------------------------------------------------------------
def _pixel_weights(projector: Projector, ctf, b0: int, b1: int) -> np.ndarray:
    """``M * CTF^2`` for images ``b0:b1`` ``(b, n, n)`` float64 (``M`` the image-frequency mask)."""
    n = projector.n
    m = np.asarray(projector.image_mask(jnp.float32), np.float64)
    w = np.broadcast_to(m, (b1 - b0, n, n))
    if ctf is not None:
        params = CTFParams(*(jnp.asarray(np.asarray(f)[b0:b1], jnp.float32) for f in ctf))
        c = np.asarray(projector.ctf(params, jnp.float32), np.float64)
        w = w * c * c
    return w


def hessian_stencil(projector: Projector, rotations, ctf: CTFParams | None = None, lam: float = 0.0,
                    chunk: int | None = None) -> np.ndarray:
    """The exact Hessian of ``nearest``/``trilinear`` slices as a 27-point stencil ``(27, N, N, N)`` float64.

    ``(H z)[j] = sum_o S[o, j] z[j + o]`` over the offsets ``o`` in ``{-1, 0, 1}^3`` (index
    ``(oz+1)*9 + (oy+1)*3 + (ox+1)``, ``S[13]`` is the diagonal). ``H = (1/B) sum_i T_i^T (M CTF_i^2) T_i
    + lam I`` with ``T_i`` the interpolation matrix of image ``i`` (geometry identical to
    :func:`jaxcryo.projection.slice_trilinear` / ``slice_nearest``). Assembled with ``np.bincount`` in
    chunks of ``chunk`` images (default: about 2e7 terms per chunk).
    """
    if projector.method not in ("nearest", "trilinear") or projector.oversample != 1:
        raise NotImplementedError("the assembled Hessian needs 'nearest' or 'trilinear' slices without "
                                  "oversampling; use hessian_operator(..., mode='hvp')")
    n = projector.n
    nvox = n ** 3
    rots = jnp.asarray(rotations, jnp.float32)
    nimg = int(rots.shape[0])
    acc = np.zeros(27 * nvox, np.float64)
    corners = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    # Pairs of cube corners a <= b (lexicographic); a < b gives the 13 "positive" offsets o = b - a, whose
    # mirror entries S[-o, j + o] = S[o, j] are filled in at the end.
    pairs = [(a, b, (cb[0] - ca[0] + 1) * 9 + (cb[1] - ca[1] + 1) * 3 + (cb[2] - ca[2] + 1))
             for a, ca in enumerate(corners) for b, cb in enumerate(corners) if a <= b]
    npix = max(1, int(np.asarray(projector.image_mask()).sum()))
    if chunk is None:  # about 1e7 (pixel, corner pair) terms per bincount
        chunk = max(1, int(1e7 // (len(pairs) * npix)))
    buf_i = buf_v = None
    for b0 in range(0, nimg, chunk):
        b1 = min(b0 + chunk, nimg)
        w = _pixel_weights(projector, ctf, b0, b1)
        keep = w != 0
        pts = np.asarray(slice_points(rots[b0:b1], n, jnp.float32))[keep]  # (P, 3) float32, xyz
        wp = w[keep]
        if projector.method == "nearest":
            c = np.rint(pts).astype(np.int64) + n // 2
            ok = np.all((c >= 0) & (c < n), axis=-1)
            vox = (c[ok, 2] * n + c[ok, 1]) * n + c[ok, 0]
            acc[13 * nvox:14 * nvox] += np.bincount(vox, weights=wp[ok], minlength=nvox)
            continue
        c = pts + np.float32(n // 2)
        c0 = np.floor(c)
        f = (c - c0).astype(np.float32).astype(np.float64)  # as slice_trilinear (float32 fractions)
        i0 = c0.astype(np.int64)
        cw, cidx = [], []
        for dz, dy, dx in corners:
            iz, iy, ix = i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx
            ok = (iz >= 0) & (iz < n) & (iy >= 0) & (iy < n) & (ix >= 0) & (ix < n)
            cidx.append(np.clip((iz * n + iy) * n + ix, 0, nvox - 1))
            cw.append(np.where(ok, (f[:, 2] if dz else 1 - f[:, 2]) * (f[:, 1] if dy else 1 - f[:, 1])
                               * (f[:, 0] if dx else 1 - f[:, 0]), 0.0))  # zero weight: off the grid
        m = wp.size
        if buf_i is None or buf_i.size < len(pairs) * m:  # reused: page faults once
            buf_i = np.empty(len(pairs) * m, np.int64)
            buf_v = np.empty(len(pairs) * m, np.float64)
        idx = buf_i[: len(pairs) * m].reshape(len(pairs), m)
        val = buf_v[: len(pairs) * m].reshape(len(pairs), m)
        for r, (a, b, o) in enumerate(pairs):
            np.add(o * nvox, cidx[a], out=idx[r])
            np.multiply(wp * cw[a], cw[b], out=val[r])
        acc += np.bincount(idx.ravel(), weights=val.ravel(), minlength=27 * nvox)
    s = acc.reshape(27, n, n, n) / nimg
    if projector.method == "trilinear":
        for k, (oz, oy, ox) in enumerate(_OFFSETS[14:], start=14):  # S[-o, j] = S[o, j - o]
            src = s[k]
            dst = s[26 - k]
            dst[max(oz, 0):n + min(oz, 0), max(oy, 0):n + min(oy, 0), max(ox, 0):n + min(ox, 0)] = \
                src[max(-oz, 0):n + min(-oz, 0), max(-oy, 0):n + min(-oy, 0), max(-ox, 0):n + min(-ox, 0)]
    s[13] += lam
    return s


class HessianOperator:
    """A matvec ``z -> H z`` on complex ``(N, N, N)`` volumes (returns ``np.complex128``).

    Attributes:
        n: box size.
        is_real: True when ``H`` is a real symmetric matrix (real interpolation weights and CTF), so its
            eigenvalues can be computed with real vectors.
        stencil: the assembled ``(27, N, N, N)`` stencil, or ``None`` (HVP mode).
        n_matvecs: matvecs applied so far.
    """

    def __init__(self, n: int, fn: Callable, is_real: bool, stencil: np.ndarray | None = None):
        self.n, self._fn, self.is_real, self.stencil, self.n_matvecs = n, fn, is_real, stencil, 0

    def __call__(self, z):
        self.n_matvecs += 1
        return self._fn(z)

    def diagonal(self) -> np.ndarray:
        """``diag H`` (real ``(N, N, N)``; stencil mode only)."""
        if self.stencil is None:
            raise NotImplementedError("diagonal() needs the assembled stencil; use optim.exact_diagonal")
        return self.stencil[13].copy()


def _stencil_matvec(s: np.ndarray) -> Callable:
    n = s.shape[-1]

    def mv(z):
        z = np.asarray(z)
        zp = np.pad(z, 1)
        out = np.zeros(z.shape, np.result_type(z.dtype, np.float64))
        for k, (dz, dy, dx) in enumerate(_OFFSETS):
            out += s[k] * zp[1 + dz:1 + dz + n, 1 + dy:1 + dy + n, 1 + dx:1 + dx + n]
        return out

    return mv


def hessian_operator(projector: Projector, rotations, shifts=None, ctf: CTFParams | None = None,
                     lam: float = 0.0, mode: str = "auto", chunk: int = 250) -> HessianOperator:
    """The Hessian ``H`` of the known-pose loss (:func:`jaxcryo.loss.loss`, weights 1) as a matvec.

    Args:
        projector: the forward model.
        rotations: ``(B, 3, 3)`` RELION matrices.
        shifts: ``(B, 2)`` origins in Å (default zeros; ``H`` does not depend on them).
        ctf: per-image :class:`CTFParams` or ``None``.
        lam: Tikhonov weight.
        mode: ``"stencil"`` (assemble once; ``nearest``/``trilinear`` without oversampling), ``"hvp"``
            (Hessian-vector products of :func:`jaxcryo.loss.loss` at ``v = 0`` with all-zero images, jitted,
            in chunks of ``chunk`` images) or ``"auto"`` (stencil where possible).

    Returns:
        a :class:`HessianOperator` (callable ``z -> H z``, complex in, ``np.complex128`` out).
    """
    n = projector.n
    can_stencil = projector.method in ("nearest", "trilinear") and projector.oversample == 1
    if mode == "auto":
        mode = "stencil" if can_stencil else "hvp"
    if mode == "stencil":
        s = hessian_stencil(projector, rotations, ctf, lam)
        mv = _stencil_matvec(s)
        return HessianOperator(n, lambda z: mv(np.asarray(z, np.complex128)), True, s)
    if mode != "hvp":
        raise ValueError(f"mode must be 'auto', 'stencil' or 'hvp', got {mode!r}")

    from .loss import Batch, hvp, loss

    x64 = bool(jax.config.jax_enable_x64)
    rdt, cdt = (jnp.float64, jnp.complex128) if x64 else (jnp.float32, jnp.complex64)
    rots = jnp.asarray(rotations, rdt)
    nimg = int(rots.shape[0])
    sh = jnp.zeros((nimg, 2), rdt) if shifts is None else jnp.asarray(shifts, rdt)
    batches = []
    for b0 in range(0, nimg, chunk):
        b1 = min(b0 + chunk, nimg)
        c = None if ctf is None else CTFParams(*(jnp.asarray(np.asarray(f)[b0:b1], rdt) for f in ctf))
        batches.append(Batch(jnp.zeros((b1 - b0, n, n), cdt), rots[b0:b1], sh[b0:b1], c,
                             jnp.ones((b1 - b0,), rdt), jnp.ones((b1 - b0,), rdt)))
    v0 = jnp.zeros((n,) * 3, cdt)

    @jax.jit
    def one(z, batch):
        return hvp(lambda v: loss(v, batch, projector), v0, z)

    def mv(z):
        z = jnp.asarray(z, cdt)
        out = np.zeros((n,) * 3, np.complex128)
        for b in batches:
            out += (b.mask.shape[0] / nimg) * np.asarray(one(z, b), np.complex128)
        return out + lam * np.asarray(z, np.complex128)

    return HessianOperator(n, mv, False, None)


def scaled_operator(matvec: Callable, scale) -> Callable:
    """``z -> scale * A(scale * z)`` (e.g. ``scale = D^-1/2``: the symmetric form of ``D^-1 A``)."""
    s = np.asarray(scale, np.float64)

    def mv(z):
        return s * np.asarray(matvec(s * np.asarray(z)))

    mv.is_real = getattr(matvec, "is_real", False)
    return mv


# --------------------------------------------------------------------------------------------------
# Eigenvalue estimators
# --------------------------------------------------------------------------------------------------
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


def power_iteration(matvec: Callable, shape, key=0, iters: int = 100, mask=None) -> float:
    """Largest eigenvalue of a Hermitian positive semidefinite ``matvec`` (restricted to ``mask`` if given)
    by power iteration from a random complex vector; returns the last Rayleigh quotient (float64)."""
    m = None if mask is None else np.asarray(mask, bool)
    x = _random_vector(_rng(key), tuple(shape), True)
    if m is not None:
        x = x * m
    x /= np.linalg.norm(x)
    lam = 0.0
    for _ in range(iters):
        y = np.asarray(matvec(x), np.complex128)
        if m is not None:
            y = y * m
        lam = float(np.real(np.vdot(x, y)))
        x = y / np.linalg.norm(y)
    return lam


def lanczos_extreme_eigs(matvec: Callable, mask, key=0, iters: int = LANCZOS_ITERS, return_ritz: bool = False,
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

    def tridiag(alpha, beta):
        from scipy.linalg import eigh_tridiagonal

        return eigh_tridiagonal(np.asarray(alpha), np.asarray(beta[: len(alpha) - 1]))

    q = _random_vector(_rng(key), (k,), not real).astype(dt)
    q /= np.linalg.norm(q)
    Q = np.empty((iters, k), dt)
    alpha, beta = [], []
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
        nw = np.linalg.norm(w)
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
            th, s = tridiag(alpha, beta)
            res = (b * abs(s[-1, 0]), b * abs(s[-1, -1]))
            if res[0] <= rtol * abs(th[0]) and res[1] <= rtol * abs(th[-1]):
                break
        q = w / b
    ritz, s = tridiag(alpha, beta)
    if res[0] != 0.0:
        res = (beta[-1] * abs(s[-1, 0]), beta[-1] * abs(s[-1, -1]))
    out = (float(ritz[0]), float(ritz[-1]))
    if return_ritz:
        return (*out, {"ritz": ritz, "iters": len(alpha), "residuals": res})
    return out


def condition_number(matvec: Callable, mask, key=0, iters: int = LANCZOS_ITERS, preconditioner=None,
                     threshold: float | None = None, rtol: float = LANCZOS_RTOL, return_info: bool = False):
    """``(kappa, lambda_min, lambda_max)`` of ``P A P`` (``A = matvec``) inside ``mask`` by Lanczos.

    ``preconditioner``: a diagonal ``D`` (real ``(N, N, N)``); the eigenvalues are then those of
    ``D-hat^-1 A`` with ``D-hat = max(|D|, threshold)`` (default :func:`jaxcryo.optim.default_threshold`),
    computed on the similar ``D-hat^-1/2 A D-hat^-1/2``. ``kappa = inf`` if ``lambda_min <= 0``.
    ``return_info`` appends the Lanczos info dict (iterations, residuals).
    """
    op = matvec
    if preconditioner is not None:
        from .optim import default_threshold

        d = np.asarray(preconditioner, np.float64)
        thr = default_threshold(d.shape[-1]) if threshold is None else float(threshold)
        op = scaled_operator(matvec, 1.0 / np.sqrt(np.maximum(np.abs(d), thr)))
    lo, hi, info = lanczos_extreme_eigs(op, mask, key, iters, return_ritz=True, rtol=rtol)
    out = ((hi / lo if lo > 0 else float("inf")), lo, hi)
    return (*out, info) if return_info else out


def predicted_condition_number(n: int, lam: float = 0.0) -> float:
    """The paper's lower bound ``kappa >= (1 + lam) / (p + lam)`` (= ``(B + B lam) / (B p + B lam)``).

    ``p`` = voxels in the central disc of radius ``N/2`` / voxels in the ball of radius ``N/2``
    (:func:`jaxcryo.fourier.ball_mask`), ``~ 3 / (4R)`` with ``R = N/2``: the mean fraction of slices through
    a ball voxel, against 1 for the centre voxel (on every slice), for the nearest-slice (diagonal) Hessian
    normalised by the number of images. So ``kappa ~ 4R/3 = 2N/3``, linear in the box.
    """
    ball = ball_mask(n)
    p = float(ball[n // 2].sum()) / float(ball.sum())
    return float((1.0 + lam) / (p + lam))


# --------------------------------------------------------------------------------------------------
# The report of ``jaxcryo condition``
# --------------------------------------------------------------------------------------------------
def _poses(n_poses: int, seed: int, ctf: bool):
    from .rotations import random_rotations

    rots = np.asarray(random_rotations(jax.random.PRNGKey(seed), n_poses, jnp.float32))
    ctfp = None
    if ctf:
        from .simulate import random_ctf_params

        ctfp = random_ctf_params(np.random.default_rng(seed), n_poses)
    return rots, ctfp


def condition_report(boxes, n_poses: int = 2000, method: str = "trilinear", ctf: bool = False, seed: int = 0,
                     lam: float = 0.0, lanczos_iters: int = LANCZOS_ITERS, pixel_size: float = 3.0,
                     progress: Callable | None = None) -> dict:
    """``kappa(H)``, ``kappa(D^-1 H)`` and the predicted ``kappa`` per box size (schema of ``jaxcryo condition``).

    Poses: ``n_poses`` uniform random rotations (:func:`jaxcryo.rotations.random_rotations`,
    ``PRNGKey(seed)``), the same draw at every box; with ``ctf``, random CTF parameters
    (:func:`jaxcryo.simulate.random_ctf_params`, ``default_rng(seed)``) at ``pixel_size`` Å/px.
    ``H`` restricted to the ball of radius ``N/2``; ``D = max(|exact_diagonal|, default_threshold(N))``.

    Returns:
        ``{"box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings"}``, lists in ``boxes`` order;
        ``settings`` records every choice and the eigenvalues/timings per box.
    """
    from .loss import Batch
    from .optim import default_threshold, exact_diagonal

    rots, ctfp = _poses(n_poses, seed, ctf)
    out = {"box": [], "kappa_H": [], "kappa_DinvH": [], "kappa_predicted": []}
    eig = []
    for n in boxes:
        n = int(n)
        t0 = time.perf_counter()
        proj = Projector(n=n, pixel_size=pixel_size, method=method)
        op = hessian_operator(proj, rots, None, ctfp, lam)
        batch = Batch(
            images_f=jnp.zeros((n_poses, n, n), jnp.complex64), rotations=jnp.asarray(rots),
            shifts=jnp.zeros((n_poses, 2), jnp.float32),
            ctf=None if ctfp is None else CTFParams(*(jnp.asarray(f, jnp.float32) for f in ctfp)),
            weights=jnp.ones((n_poses,), jnp.float32), mask=jnp.ones((n_poses,), jnp.float32))
        d = np.asarray(exact_diagonal(proj, batch, lam=lam), np.float64)
        mask = ball_mask(n)
        k_h, lo, hi, ih = condition_number(op, mask, seed, lanczos_iters, return_info=True)
        k_p, plo, phi, ip = condition_number(op, mask, seed, lanczos_iters, preconditioner=d, return_info=True)
        out["box"].append(n)
        out["kappa_H"].append(k_h)
        out["kappa_DinvH"].append(k_p)
        out["kappa_predicted"].append(predicted_condition_number(n, lam))
        eig.append({"box": n, "lambda_min_H": lo, "lambda_max_H": hi, "lambda_min_DinvH": plo,
                    "lambda_max_DinvH": phi, "ball_voxels": int(mask.sum()),
                    "lanczos_iters_run": [int(ih["iters"]), int(ip["iters"])],
                    "seconds": round(time.perf_counter() - t0, 3)})
        if progress is not None:
            progress(n, k_h, k_p, out["kappa_predicted"][-1])
    out["settings"] = {
        "interp": method,
        "n_poses": int(n_poses),
        "poses": "uniform random (random_rotations, PRNGKey(seed)), same draw at every box",
        "ctf": bool(ctf),
        "pixel_size": float(pixel_size),
        "seed": int(seed),
        "ball_radius": "N/2",
        "lam": float(lam),
        "lanczos_iters": int(lanczos_iters),
        "lanczos_rtol": LANCZOS_RTOL,
        "eigensolver": "Lanczos, full reorthogonalisation, float64, on P H P (ball voxels), at most "
                       "lanczos_iters iterations, stopped when both extreme Ritz residuals <= lanczos_rtol * "
                       "|theta|; Ritz lambda_min approaches from above (kappa slightly underestimated)",
        "hessian": "assembled 27-point stencil (exact)" if method in ("nearest", "trilinear") else "HVPs",
        "D": "exact diagonal (optim.exact_diagonal), thresholded max(|D|, default_threshold(N))",
        "threshold": {str(int(n)): default_threshold(int(n)) for n in boxes},
        "kappa_predicted": "paper's lower bound (1+lam)/(p+lam), p = voxels in central disc / voxels in ball "
                           "(radius N/2), ~ 2N/3",
        "eigenvalues": eig,
    }
    return out


def plot_condition(report: dict, path) -> str:
    """Log-log plot of ``kappa`` against box size (measured ``H``, ``D^-1 H`` and predicted) as a PNG,
    written atomically (temporary file beside ``path``, then ``os.replace``)."""
    import os
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    box = np.asarray(report["box"], float)
    order = np.argsort(box)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    s = report.get("settings", {})
    for key, label, style in (("kappa_H", "κ(H)", "o-"), ("kappa_DinvH", "κ(D⁻¹H)", "s-"),
                              ("kappa_predicted", "predicted (paper's bound)", "--")):
        y = np.asarray([np.nan if v is None else v for v in report[key]], float)
        ax.plot(box[order], y[order], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(box[order], [str(int(b)) for b in box[order]])
    ax.set_xlabel("box size N (ball radius N/2)")
    ax.set_ylabel("condition number")
    ax.set_title(f"{s.get('interp', '')}, {s.get('n_poses', '')} poses"
                 + (", CTF" if s.get("ctf") else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return str(path)
