"""Slice operators: how a central slice samples the centred Fourier volume at off-grid points.

A slice operator is an :class:`equinox.Module` mapping a centred Fourier volume ``(N, N, N)`` (``[z, y, x]``,
DC at ``N//2``) and points ``(..., 3)`` in Fourier-voxel units of that grid (``(x, y, z)`` order) to the
values there. It is linear in the volume (its adjoint, the backprojection, comes from
``jax.linear_transpose``). The subclasses:

* :class:`Nearest`: the nearest Fourier voxel (with ``oversample == 1`` the least-squares Hessian is exactly
  diagonal);
* :class:`Trilinear`: trilinear interpolation between the 8 neighbouring voxels;
* :class:`NUFFT`: exact trigonometric interpolation of the DFT by a type-2 non-uniform FFT (jax-finufft).

``Nearest`` and ``Trilinear`` take ``oversample = s``: the volume is first zero-padded ``s``-fold in real
space (finer Fourier sampling, more accurate slices), and ``gridding``: the real-space volume is first divided
by the interpolation kernel's transform (:func:`gridding_profile`, RELION's gridding correction; automatic:
on for trilinear with ``s > 1``). Measured against the exact DFT slice (:func:`dft_at_points`,
``benchmarks/slice_accuracy.py``), per shell up to Nyquist: nearest 35-60% error, trilinear 15-37%,
trilinear x2 without correction 4-11%, with it 2-4.5%, NUFFT 1e-6.

Facts other modules need are properties of the operator, never string comparisons:

* :attr:`SliceOperator.has_local_stencil`: each point reads only the (at most 8) voxels of its grid cube
  on the ``N``-grid, so the Hessian is a 27-point stencil and its exact diagonal is the backprojection of
  ``M CTF^2`` through the squared weights (:meth:`AbstractGridOperator.squared_weight_slice`, of the operator
  :func:`local_stencil_operator` returns);
* :attr:`SliceOperator.has_diagonal_hessian`: the Hessian is exactly diagonal (the Wiener filter is then the
  exact least-squares solution);
* :meth:`SliceOperator.weight_kernel`: the local operator whose (plain-weight) backprojection of ``M CTF^2``
  serves as the ``CTF^2`` weights of a one-pass (Wiener) estimate, as RELION and cryoDRGN do.

The registry :data:`OPERATORS` maps the user-facing names (``--interp``) to classes and feeds every CLI's
choices. Adding an operator is one subclass and one registry line.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float, Num

from ..errors import InputError
from ..ndimage._fourier import fft3c, ifft3c
from ..jax_util import vary_like


def _gather(vol, iz, iy, ix):
    """``vol[iz, iy, ix]`` with zeros outside the grid."""
    n = vol.shape[-1]
    valid = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
    flat = (jnp.clip(iz, 0, n - 1) * n + jnp.clip(iy, 0, n - 1)) * n + jnp.clip(ix, 0, n - 1)
    return jnp.where(valid, vol.reshape(-1)[flat], 0)


def slice_nearest(vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"]) -> Complex[Array, "*p"]:
    """Nearest-voxel values of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz)."""
    c = jnp.rint(points).astype(jnp.int32) + vol_f.shape[-1] // 2
    return _gather(vol_f, c[..., 2], c[..., 1], c[..., 0])


#: One (2, 2, 2) window per point of the one-voxel zero-padded volume (:func:`slice_trilinear`).
_WINDOW_DIMS = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(),
                                              start_index_map=(0, 1, 2))


def slice_trilinear(vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"], weight_power: int = 1
                    ) -> Complex[Array, "*p"]:
    """Trilinear interpolation of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz).

    Zeros outside the grid. ``weight_power=2`` sums the 8 neighbours with squared weights: its transpose
    applied to ``CTF^2`` backprojects the exact Hessian diagonal (:func:`jaxcryo.leastsq.batch_diagonal_sum`).

    One gather per point: the volume is zero-padded by one voxel and the ``2 x 2 x 2`` window of the point's
    grid cell is read as one slice, so the autodiff adjoint (the backprojection) is one windowed scatter-add
    rather than eight (equal to the eight-gather formula to rounding, ``tests/test_fast_operators.py``).
    """
    n = vol_f.shape[-1]
    shape = points.shape[:-1]
    c = points.reshape(-1, 3) + n // 2
    # clamp before the integer cast (far-away points); a cell with a corner on the grid has -1 <= c0 <= n-1
    c0 = jnp.clip(jnp.floor(c), -2, n)
    f = (c - c0).astype(jnp.real(vol_f).dtype)
    i0 = c0.astype(jnp.int32)
    inside = jnp.all((i0 >= -1) & (i0 <= n - 1), axis=-1)
    start = jnp.clip(i0[:, ::-1], -1, n - 1) + 1  # [z, y, x] corner in the padded grid
    win = jax.lax.gather(jnp.pad(vol_f, 1), start, _WINDOW_DIMS, slice_sizes=(2, 2, 2),
                         mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)  # (P, 2, 2, 2) [z, y, x]
    wx = jnp.stack([1 - f[:, 0], f[:, 0]], axis=-1)
    wy = jnp.stack([1 - f[:, 1], f[:, 1]], axis=-1)
    wz = jnp.stack([1 - f[:, 2], f[:, 2]], axis=-1)
    w = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]) ** weight_power
    out = jnp.sum((w * win).reshape(-1, 8), axis=-1)
    return jnp.where(inside, out, 0).reshape(shape)


def finufft():
    """The ``jax_finufft`` module. Imported on first use: NUFFT slices are optional (a GPU needs a CUDA build
    of jax-finufft, which nearest and trilinear slices do not)."""
    try:
        import jax_finufft
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("NUFFT slices need jax-finufft (pip install jax-finufft; on a GPU, its CUDA build); "
                          "nearest and trilinear slices work without it") from e
    return jax_finufft


def slice_nufft(vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"], eps: float | None = None
                ) -> Complex[Array, "*p"]:
    """Exact (trigonometric) interpolation of the DFT ``vol_f`` at ``points`` by a type-2 NUFFT.

    ``V(q) = sum_r v(r) exp(-2 pi i q . r / N)`` with ``v = ifft3c(vol_f)`` on the centred grid.
    """
    n = vol_f.shape[-1]
    if eps is None:
        eps = 1e-12 if vol_f.dtype == jnp.complex128 else 1e-6
    vol = ifft3c(vol_f)
    shape = points.shape[:-1]
    p = points.reshape(-1, 3) * (2 * jnp.pi / n)
    # in a data-parallel step (shard_map) the points are per device and the grid replicated: jax-finufft types
    # its output like the grid, so mark the grid per device (the adjoint's grids are then psum-reduced)
    vol = vary_like(vol, p)
    # jax-finufft: modes f[k1, k2, k3] in CMCL (centred) order, points (x, y, z) paired with (k1, k2, k3);
    # our volume is [z, y, x], so pass the z coordinate first.
    vals = finufft().nufft2(vol, p[:, 2], p[:, 1], p[:, 0], iflag=-1, eps=eps)
    return vals.reshape(shape)


def dft_at_points(vol: Num[ArrayLike, "n n n"], points: Float[ArrayLike, "*p 3"], chunk: int = 2048
                  ) -> Complex[np.ndarray, "*p"]:
    """The exact DFT of a real-space volume at off-grid points, by direct summation in float64 (NumPy):
    ``V(p) = sum_r vol[r] exp(-2 pi i p . r / N)`` over the centred positions ``r`` (the function every slice
    operator approximates; :func:`slice_nufft` computes it to ``eps``). ``vol``: ``(N, N, N)`` ``[z, y, x]``;
    ``points``: ``(..., 3)`` in Fourier-voxel units, ``(x, y, z)``. Cost ``N^3`` per point: a reference for
    tests and benchmarks at small boxes, not a forward model.
    """
    vol = np.asarray(vol, np.complex128)
    n = vol.shape[-1]
    r = np.arange(n, dtype=np.float64) - n // 2
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    out = np.empty(len(pts), np.complex128)
    for a in range(0, len(pts), chunk):
        p = pts[a:a + chunk]
        ex, ey, ez = (np.exp(-2j * np.pi * np.outer(p[:, i], r) / n) for i in range(3))  # (P, N) each
        t = (vol.reshape(n * n, n) @ ex.T).reshape(n, n, -1)  # sum over x: [z, y, P]
        t = np.einsum("zyp,py->pz", t, ey)
        out[a:a + chunk] = np.einsum("pz,pz->p", t, ez)
    return out.reshape(np.shape(points)[:-1])


#: Gridding-correction profiles are clamped from below at this value (never reached for ``oversample >= 1``:
#: the smallest is ``sinc^2(1/2) = 0.405``, trilinear without oversampling at the box edge).
GRIDDING_FLOOR = 1e-2


def gridding_profile(n: int, m: int, order: int) -> Float[np.ndarray, " n"]:
    """The real-space transform of the interpolation kernel along one axis, ``sinc(x / m) ** order``
    (``np.sinc(t) = sin(pi t) / (pi t)``), at the centred positions ``x = -n//2 .. (n-1)//2`` of an ``n``-box
    whose Fourier volume is interpolated on an ``m``-point grid (``m = oversample * n``); ``(n,)`` float64.

    ``order`` is the kernel's B-spline order: 1 for nearest (a unit box in Fourier space; the profile holds
    in expectation over the point positions), 2 for trilinear (a unit tent, box * box); 0 gives ones.
    Interpolating on the ``m``-grid multiplies the object by this profile along each axis (plus aliases of
    the object at multiples of ``m``); dividing the object by it first (:func:`oversampled`) undoes the
    multiplication, as RELION's ``Projector::griddingCorrect`` does (RELION uses the radial
    ``sinc(|r| / m)``; the kernels are separable, so jaxcryo uses the per-axis product, which is exact for
    them; the two differ by < 1e-3 in measured slice error).
    """
    x = np.arange(n, dtype=np.float64) - n // 2
    return np.maximum(np.sinc(x / m) ** order, GRIDDING_FLOOR) if order else np.ones(n)


def oversampled(vol_f: Complex[Array, "n n n"], s: int, gridding_order: int = 0) -> Complex[Array, "m m m"]:
    """The centred Fourier volume of ``vol_f`` zero-padded ``s``-fold in real space (``(sN,)*3``).

    With ``gridding_order`` > 0 the real-space volume is first divided by the interpolation kernel's
    transform (:func:`gridding_profile` along each axis, for the ``sN`` grid): the gridding correction, so
    that interpolating the result at ``s * points`` approximates the exact DFT of the volume at ``points``.
    Linear in ``vol_f`` (a fixed diagonal scaling in real space), so its transpose is exact. The correction
    acts only inside the ``N``-box: the padding stays zero.
    """
    if s == 1 and not gridding_order:
        return vol_f
    n = vol_f.shape[-1]
    vol = ifft3c(vol_f)
    if gridding_order:
        p = jnp.asarray(1.0 / gridding_profile(n, s * n, gridding_order), jnp.real(vol).dtype)
        vol = vol * (p[:, None, None] * p[None, :, None] * p[None, None, :])
    if s == 1:
        return fft3c(vol)
    pad = (s * n) // 2 - n // 2
    return fft3c(jnp.pad(vol, [(pad, s * n - n - pad)] * 3))


class SliceOperator(eqx.Module):
    """Abstract slice operator (see the module docstring): subclasses implement :meth:`lift`,
    :meth:`slice_lifted` and :attr:`has_local_stencil`, and set :attr:`local_capable` and
    :attr:`diagonal_when_local`. The concrete operators are final."""

    #: The class has a local stencil in some configuration (nearest/trilinear without oversampling).
    local_capable: eqx.AbstractClassVar[bool]
    #: With a local stencil, the Hessian is exactly diagonal (nearest-voxel slices on the ``N``-grid).
    diagonal_when_local: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def lift(self, vol_f: Complex[Array, "n n n"]) -> Complex[Array, "m m m"]:
        """The batch-independent linear first stage of :meth:`slice` (e.g. oversampling with the gridding
        correction): ``slice(v, p) == slice_lifted(lift(v), p)``.

        A sum of adjoints over many batches can be accumulated on the lifted grid and mapped back with the
        transpose of ``lift`` once (:meth:`jaxcryo.forward.Projector.backproject_lifted`), instead of
        once per batch."""

    @abc.abstractmethod
    def slice_lifted(self, lifted: Complex[Array, "m m m"], points: Float[Array, "*p 3"]) -> Complex[Array, "*p"]:
        """The point-dependent stage of :meth:`slice`, reading the output of :meth:`lift`."""

    @property
    @abc.abstractmethod
    def has_local_stencil(self) -> bool:
        """Each point reads only the voxels of its grid cube on the ``N``-grid (27-point Hessian stencil)."""

    def slice(self, vol_f: Complex[Array, "n n n"], points: Float[Array, "*p 3"]) -> Complex[Array, "*p"]:
        """Values of the centred Fourier volume ``vol_f`` ``(N, N, N)`` at ``points`` ``(..., 3)``."""
        return self.slice_lifted(self.lift(vol_f), points)

    @property
    def has_diagonal_hessian(self) -> bool:
        """The least-squares Hessian is exactly diagonal."""
        return self.has_local_stencil and self.diagonal_when_local

    def weight_kernel(self) -> "SliceOperator":
        """The local operator whose backprojection of ``M CTF^2`` (plain weights) gives the ``CTF^2`` weights
        of a one-pass (Wiener) estimate: the operator itself when it is local, else trilinear."""
        return self if self.has_local_stencil else Trilinear()


def local_stencil_operator(op: SliceOperator) -> "AbstractGridOperator":
    """``op`` when it has a local stencil (the exact Hessian diagonal, the stencil Hessian and
    :meth:`AbstractGridOperator.squared_weight_slice` need one); else ``NotImplementedError`` naming it."""
    if not (isinstance(op, AbstractGridOperator) and op.has_local_stencil):
        raise NotImplementedError(
            f"the exact Hessian diagonal needs a slice operator with a local stencil "
            f"({', '.join(n for n, c in OPERATORS.items() if c.local_capable)} without oversampling), "
            f"not {describe(op)}; use the Hutchinson estimator"
        )
    return op


class AbstractGridOperator(SliceOperator):
    """Operators that read voxels of a (possibly oversampled) grid: nearest and trilinear; subclasses declare
    the fields ``oversample`` and ``gridding``, the class variable ``kernel_order`` and implement
    :meth:`kernel`.

    ``oversample = s``: zero-pad the volume ``s``-fold in real space first (finer Fourier sampling).
    ``gridding``: divide the real-space volume by the kernel's transform before that FFT
    (:func:`gridding_profile`, RELION's gridding correction), so the interpolated slices approximate the
    exact DFT slice; ``None`` (default) turns it on where it was measured to help
    (``benchmarks/slice_accuracy.py``): trilinear with ``oversample > 1`` (box 64, x2: slice error 4.0% -> 2.7%
    on the phantom, 6.2% -> 2.5% on a ribosome map; least-squares map 6.7% -> 1.3%, NUFFT's 1.2%), never
    for nearest (whose error is the rounding of each point, not the mean attenuation the correction removes:
    slices and least-squares maps get worse), and not for ``oversample == 1``, where it would cost the local
    stencil (exact diagonal, stencil Hessian, exact Wiener) that makes the plain operators useful, although
    it helps there too (trilinear least-squares map 28% -> 3.9%). ``True``/``False`` force it. With
    oversampling or gridding the operator has no local stencil on the ``N``-grid.
    """

    oversample: eqx.AbstractVar[int]
    gridding: eqx.AbstractVar[bool | None]
    local_capable: ClassVar[bool] = True
    #: B-spline order of the interpolation kernel (1: nearest's box, 2: trilinear's tent); its real-space
    #: transform is ``sinc ** kernel_order`` per axis (:func:`gridding_profile`).
    kernel_order: eqx.AbstractClassVar[int]

    def __check_init__(self):
        if self.oversample < 1 or int(self.oversample) != self.oversample:
            raise ValueError(f"oversample must be a positive integer, got {self.oversample}")
        if self.gridding not in (None, True, False):
            raise ValueError(f"gridding must be True, False or None (automatic), got {self.gridding!r}")

    @abc.abstractmethod
    def kernel(self, vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"],
               weight_power: int = 1) -> Complex[Array, "*p"]:
        """The interpolation on the grid of ``vol_f`` at ``points`` (grid units), with the weights raised to
        ``weight_power``."""

    @property
    def gridding_on(self) -> bool:
        """Whether the gridding correction is applied (``gridding``, or the automatic choice for ``None``)."""
        if self.gridding is None:
            return self.oversample > 1 and self.kernel_order > 1
        return bool(self.gridding)

    @property
    def has_local_stencil(self) -> bool:
        return self.oversample == 1 and not self.gridding_on

    def lift(self, vol_f: Complex[Array, "n n n"]) -> Complex[Array, "m m m"]:
        if self.has_local_stencil:
            return vol_f
        fine = oversampled(vol_f, self.oversample, self.kernel_order if self.gridding_on else 0)
        # The DFT is periodic (index sN is index 0): one wrapped plane on each side of each axis (the centre
        # stays at the middle index for even and odd sizes) gives the points within 1/s voxel of the +N/2
        # faces their upper neighbours (zeros otherwise: measured 0.19 -> 0.02 error in the Nyquist shell for
        # trilinear x2). The local operators keep zeros there, as their stencil Hessian assumes.
        return jnp.pad(fine, [(1, 1)] * 3, mode="wrap")

    def slice_lifted(self, lifted: Complex[Array, "m m m"], points: Float[Array, "*p 3"]) -> Complex[Array, "*p"]:
        if self.has_local_stencil:
            return self.kernel(lifted, points)
        return self.kernel(lifted, points * self.oversample)

    def squared_weight_slice(self, vol: Float[Array, "n n n"], points: Float[Array, "*p 3"]) -> Float[Array, "*p"]:
        """The slice with squared interpolation weights (real ``vol``); its transpose applied to
        ``M CTF^2`` is the exact Hessian diagonal. Only with a local stencil (else ``NotImplementedError``)."""
        return local_stencil_operator(self).kernel(vol, points, weight_power=2)


class Nearest(AbstractGridOperator):
    """Nearest Fourier voxel."""

    oversample: int = eqx.field(static=True, default=1)
    gridding: bool | None = eqx.field(static=True, default=None)
    kernel_order: ClassVar[int] = 1
    diagonal_when_local: ClassVar[bool] = True

    def kernel(self, vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"], weight_power: int = 1
               ) -> Complex[Array, "*p"]:
        return slice_nearest(vol_f, points)  # weights are 0/1: squaring changes nothing


class Trilinear(AbstractGridOperator):
    """Trilinear interpolation between the 8 neighbouring Fourier voxels."""

    oversample: int = eqx.field(static=True, default=1)
    gridding: bool | None = eqx.field(static=True, default=None)
    kernel_order: ClassVar[int] = 2
    diagonal_when_local: ClassVar[bool] = False

    def kernel(self, vol_f: Complex[Array, "m m m"], points: Float[Array, "*p 3"], weight_power: int = 1
               ) -> Complex[Array, "*p"]:
        return slice_trilinear(vol_f, points, weight_power)


class NUFFT(SliceOperator):
    """Exact interpolation of the DFT by a type-2 NUFFT (``eps``: requested accuracy; default 1e-6 in
    single precision, 1e-12 in double)."""

    eps: float | None = eqx.field(static=True, default=None)
    local_capable: ClassVar[bool] = False
    diagonal_when_local: ClassVar[bool] = False

    @property
    def has_local_stencil(self) -> bool:
        return False

    def lift(self, vol_f: Complex[Array, "n n n"]) -> Complex[Array, "n n n"]:
        return vol_f

    def slice_lifted(self, lifted: Complex[Array, "n n n"], points: Float[Array, "*p 3"]) -> Complex[Array, "*p"]:
        return slice_nufft(lifted, points, self.eps)


#: The slice operators by user-facing name (``--interp``). Adding one: a subclass and a line here.
OPERATORS: dict[str, type[SliceOperator]] = {
    "nearest": Nearest,
    "trilinear": Trilinear,
    "nufft": NUFFT,
}
#: The names, in registry order (CLI choices).
OPERATOR_NAMES: tuple[str, ...] = tuple(OPERATORS)


def make_operator(name: str | SliceOperator, **options) -> SliceOperator:
    """The operator registered as ``name`` with ``options`` (e.g. ``oversample=2``).

    Raises ``ValueError`` naming the parameter ``interp`` for an unknown name.
    """
    if isinstance(name, SliceOperator):
        return name
    try:
        cls = OPERATORS[name]
    except KeyError:
        raise InputError(f"{{param}} {name!r}: expected one of {', '.join(OPERATOR_NAMES)}", param="interp") from None
    fields = set(cls.__dataclass_fields__)
    for k in options:
        if k not in fields:
            raise InputError(f"{{param}} {name!r} takes no option {k!r}", param="interp")
    return cls(**options)


def as_operator(op: "SliceOperator | str") -> SliceOperator:
    """``op`` itself, or the registered operator of that name with default options."""
    return op if isinstance(op, SliceOperator) else make_operator(op)


def operator_name(op: SliceOperator) -> str:
    """The registry name of ``op``'s class."""
    for name, cls in OPERATORS.items():
        if type(op) is cls:
            return name
    return type(op).__name__


def describe(op: SliceOperator) -> str:
    """``name``, or ``name (oversample s[, gridding])`` for messages and records (``gridding`` when the
    gridding correction is applied)."""
    parts = []
    if isinstance(op, AbstractGridOperator):
        if op.oversample != 1:
            parts.append(f"oversample {op.oversample}")
        if op.gridding_on:
            parts.append("gridding")
    return operator_name(op) + (f" ({', '.join(parts)})" if parts else "")
