"""The forward model: Fourier slice, in-plane shift and CTF, and its exact adjoint (backprojection).

For a centred Fourier volume ``V`` (``(N, N, N)`` complex, indexed ``[z, y, x]``, see
:mod:`jaxcryo.ndimage`) and per image a RELION rotation ``A``, an origin ``o`` (Å) and CTF parameters, the
image's centred Fourier transform is

    ``Y(k) = CTF(k) * exp(+2 pi i k . o) * V((kx, ky, 0) @ A)``       for ``|k| <= mask_radius``

with ``k`` in 1/Å for the shift (the image is the projection shifted by ``-o``, RELION's origin convention)
and in Fourier-voxel units for the slice. ``V`` at off-grid points is read by a slice operator of
:mod:`jaxcryo.forward` (nearest, trilinear with optional oversampling, NUFFT).

The model is linear in ``V``; the adjoint is derived by ``jax.linear_transpose`` of the same code, never
written twice. Everything is jit- and vmap-friendly; float32/complex64 by default, float64/complex128 when
given such inputs with ``jax_enable_x64``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float, Int

from ._ctf import CTFParams, evaluate_ctf
from ..ndimage._fourier import fft3c, freq_grid_2d, freq_indices, ifft2c, ifft3c
from ._operators import SliceOperator, Trilinear, as_operator, operator_name
from ..jax_util import primal_like


def _real_dtype(cdtype):
    return jnp.float64 if jnp.dtype(cdtype) == jnp.complex128 else jnp.float32


def slice_points(rotations: Float[ArrayLike, "b 3 3"], n: int, dtype=jnp.float32) -> Float[Array, "b n n 3"]:
    """3D Fourier coordinates (voxel units, ``(x, y, z)`` order) sampled by each image pixel.

    Args:
        rotations: ``(B, 3, 3)`` RELION matrices.
        n: image/volume box.

    Returns:
        ``(B, n, n, 3)``: for pixel ``[b, iy, ix]`` the point ``(kx, ky, 0) @ A_b`` with
        ``kx = ix - n//2``, ``ky = iy - n//2``.
    """
    k = jnp.asarray(freq_indices(n), dtype=dtype)
    ky, kx = jnp.meshgrid(k, k, indexing="ij")
    return slice_points_at(rotations, jnp.stack([kx, ky], axis=-1), dtype)


def slice_points_at(rotations: Float[ArrayLike, "b 3 3"], k2: Float[ArrayLike, "*p 2"], dtype=jnp.float32
                    ) -> Float[Array, "b *p 3"]:
    """:func:`slice_points` at given image frequencies ``k2`` ``(..., 2)`` (``(kx, ky)``, voxel units), e.g. a
    subset of the pixels (:meth:`Projector.pixel_frequencies`): ``(B, ..., 3)``, the point ``(kx, ky, 0) @ A_b``.
    Written as two products (no matrix product): for a subset, cheaper than every pixel's point and a gather."""
    k2 = jnp.asarray(k2, dtype)
    r = jnp.asarray(rotations).astype(dtype)
    expand = (slice(None),) + (None,) * (k2.ndim - 1)
    return k2[..., 0, None] * r[:, 0, :][expand] + k2[..., 1, None] * r[:, 1, :][expand]


def shift_phase(shifts: Float[Array, "b 2"], freqs: Float[ArrayLike, "n n 2"]) -> Complex[Array, "b n n"]:
    """Phase ramps ``exp(+2 pi i k . o)`` ``(B, n, n)`` for origins ``shifts`` ``(B, 2)`` (Å, RELION's
    rlnOriginX/YAngst) on the frequency grid ``freqs`` ``(n, n, 2)`` (1/Å)."""
    ph = 2 * jnp.pi * (freqs[..., 0] * shifts[:, 0, None, None] + freqs[..., 1] * shifts[:, 1, None, None])
    return jax.lax.complex(jnp.cos(ph), jnp.sin(ph))


def shift_phase_separable(shifts: Float[Array, "b 2"], kx: Float[ArrayLike, " w"],
                          ky: Float[ArrayLike, " h"]) -> Complex[Array, "b h w"]:
    """:func:`shift_phase` on the grid ``meshgrid(kx, ky)`` (what :func:`~jaxcryo.ndimage.freq_grid_2d`
    makes), as the outer product ``exp(2 pi i ky o_y) exp(2 pi i kx o_x)``: ``2n`` sines and cosines per
    image instead of ``n^2``."""
    kx, ky = jnp.asarray(kx, shifts.dtype), jnp.asarray(ky, shifts.dtype)
    return _ramp(ky, shifts[:, 1])[:, :, None] * _ramp(kx, shifts[:, 0])[:, None, :]


def _ramp(k, o):  # exp(2 pi i k o): (b, m) for frequencies k (m,) and origins o (b,)
    ph = 2 * jnp.pi * k[None, :] * o[:, None]
    return jax.lax.complex(jnp.cos(ph), jnp.sin(ph))


def shift_phase_at(shifts: Float[Array, "b 2"], axis: Float[ArrayLike, " n"], iy: Int[ArrayLike, " p"],
                   ix: Int[ArrayLike, " p"]) -> Complex[Array, "b p"]:
    """:func:`shift_phase_separable` on the grid ``meshgrid(axis, axis)`` at the pixels ``(iy, ix)`` only:
    the two 1-D ramps' values at each pixel's row and column, multiplied (``2n`` sines and cosines per image)."""
    axis = jnp.asarray(axis, shifts.dtype)
    return _ramp(axis, shifts[:, 1])[:, np.asarray(iy)] * _ramp(axis, shifts[:, 0])[:, np.asarray(ix)]


class Projector(eqx.Module):
    """The forward model ``V -> Y_i`` for a box of ``n`` pixels of ``pixel_size`` Å.

    Attributes:
        n: box size (images ``n x n``, volume ``n^3``).
        pixel_size: Å per pixel.
        operator: the slice operator (:mod:`jaxcryo.forward`), or its registry name; default trilinear.
        mask_radius: image frequencies with ``|k| > mask_radius`` (voxel units) are zeroed; default ``n/2``.
    """

    n: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    operator: SliceOperator = eqx.field(static=True, default_factory=Trilinear, converter=as_operator)
    mask_radius: float | None = eqx.field(static=True, default=None)

    @property
    def interp(self) -> str:
        """The operator's registry name (what ``--interp`` takes)."""
        return operator_name(self.operator)

    # -- grids -------------------------------------------------------------------------------------
    def freqs(self, dtype=jnp.float32) -> Float[Array, "n n 2"]:
        """Image frequencies ``(n, n, 2)`` in 1/Å."""
        return jnp.asarray(freq_grid_2d(self.n, self.pixel_size), dtype=dtype)

    def image_mask(self, dtype=jnp.float32) -> Float[Array, "n n"]:
        """``(n, n)`` 0/1 mask of the image frequencies that are modelled (``|k| <= mask_radius``)."""
        return jnp.asarray(self._inside_mask(), dtype=dtype)

    def _inside_mask(self) -> np.ndarray:
        """:meth:`image_mask` as a NumPy boolean array (static: usable while tracing)."""
        r = self.n / 2 if self.mask_radius is None else self.mask_radius
        k = freq_indices(self.n)
        rr = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
        return rr <= r + 1e-6

    def ctf(self, ctf_params: CTFParams | None, dtype=jnp.float32) -> Float[Array, "b n n"] | None:
        """CTF values ``(B, n, n)`` for a batch of parameters, or ``None`` when the CTF is off."""
        if ctf_params is None:
            return None
        return evaluate_ctf(ctf_params, self.freqs(dtype))

    # -- the operator ------------------------------------------------------------------------------
    def slices(self, vol_f: Complex[Array, "n n n"], rotations: Float[Array, "b 3 3"]) -> Complex[Array, "b n n"]:
        """Central slices ``(B, n, n)`` of ``vol_f`` (no shift, no CTF, no mask)."""
        return self.operator.slice(vol_f, slice_points(rotations, self.n, _real_dtype(vol_f.dtype)))

    def __call__(self, vol_f: Complex[Array, "n n n"], rotations: Float[Array, "b 3 3"], shifts: Float[Array, "b 2"],
                 ctf_params: CTFParams | None = None, ctf: Float[Array, "b n n"] | None = None) -> Complex[Array, "b n n"]:
        """Fourier images ``(B, n, n)`` complex.

        Args:
            vol_f: ``(n, n, n)`` centred Fourier volume (complex).
            rotations: ``(B, 3, 3)`` RELION matrices.
            shifts: ``(B, 2)`` RELION origins in Å.
            ctf_params: per-image CTF parameters (fields ``(B,)``), or ``None``.
            ctf: precomputed CTF values ``(B, n, n)``; overrides ``ctf_params``.

        ``self(v, R, o, c) == self.apply(v, R, self.filters(o, c, dtype=v.dtype))``.
        """
        return self.apply(vol_f, rotations, self.filters(shifts, ctf_params, ctf, vol_f.dtype))

    def filters(self, shifts: Float[Array, "b 2"], ctf_params: CTFParams | None = None,
                ctf: Float[Array, "b n n"] | None = None, dtype=jnp.complex64) -> Complex[Array, "b n n"]:
        """The per-image filters ``M * exp(+2 pi i k . o_i) * CTF_i`` ``(B, n, n)`` (complex ``dtype``; a real
        dtype means its complex counterpart): image mask, shift phase and CTF (omitted when both
        ``ctf_params`` and ``ctf`` are ``None``).

        They do not depend on the volume: compute them once per batch and pass them to :meth:`apply`, so that
        the CTF and the phase (``sin``/``cos``) are evaluated once per step and stay outside the
        differentiated function (:func:`jaxcryo.leastsq.objective` does this).
        """
        cdt = jnp.dtype(dtype)
        if not jnp.issubdtype(cdt, jnp.complexfloating):
            cdt = jnp.dtype(jnp.complex128 if cdt == jnp.float64 else jnp.complex64)
        rdt = _real_dtype(cdt)
        f = self.freqs(rdt)  # a meshgrid: kx along the columns, ky down the rows
        mult = shift_phase_separable(shifts.astype(rdt), f[0, :, 0], f[:, 0, 1]).astype(cdt) * self.image_mask(rdt)
        if ctf is None:
            ctf = self.ctf(ctf_params, rdt)
        if ctf is not None:
            mult = mult * ctf
        return mult

    def apply(self, vol_f: Complex[Array, "n n n"], rotations: Float[Array, "b 3 3"],
              filters: Complex[Array, "b n n"]) -> Complex[Array, "b n n"]:
        """Fourier images ``(B, n, n)``: the central slices of ``vol_f`` times precomputed :meth:`filters`."""
        return self.slices(vol_f, rotations) * filters

    def adjoint(self, images_f: Complex[Array, "b n n"], rotations: Float[Array, "b 3 3"], shifts: Float[Array, "b 2"],
                ctf_params: CTFParams | None = None, ctf: Float[Array, "b n n"] | None = None) -> Complex[Array, "n n n"]:
        """Exact Hermitian adjoint (backprojection) ``(B, n, n) -> (n, n, n)`` of :meth:`__call__`.

        Derived with ``jax.linear_transpose`` of the forward model (conjugated, since that gives the plain
        transpose of a complex-linear map).
        """
        cdt = images_f.dtype
        spec = jax.ShapeDtypeStruct((self.n,) * 3, cdt)
        fwd = lambda v: self(v, rotations, shifts, ctf_params, ctf)  # noqa: E731
        (out,) = jax.linear_transpose(fwd, spec)(jnp.conj(images_f))
        return jnp.conj(out)

    def lifted_shape(self) -> tuple[int, ...]:
        """Shape of the operator's lifted grid (:meth:`~jaxcryo.forward.SliceOperator.lift`)."""
        return jax.eval_shape(self.operator.lift, jax.ShapeDtypeStruct((self.n,) * 3, jnp.complex64)).shape

    def backproject_lifted(self, images_f: Complex[Array, "b n n"], rotations: Float[Array, "b 3 3"],
                           filters: Complex[Array, "b n n"],
                           pixels: tuple[Int[ArrayLike, " p"], Float[ArrayLike, " p"]] | None = None
                           ) -> Complex[Array, "..."]:
        """The adjoint of :meth:`apply` stopped on the operator's lifted grid: sum it over many batches and
        finish with :meth:`unlift_adjoint` once (``adjoint == unlift_adjoint o backproject_lifted``). For an
        oversampled operator this saves the 3D FFTs of the lift's transpose in every batch.

        ``pixels``: ``(flat_indices, weights)`` (NumPy, static) restricts the backprojection to those image
        pixels, each scaled by its weight (:meth:`hermitian_pixels`)."""
        cdt = images_f.dtype
        pts = slice_points(rotations, self.n, _real_dtype(cdt))
        # in a data-parallel pass (shard_map): this device's partial sum, reduced once by the caller
        spec = primal_like(self.lifted_shape(), cdt, images_f, pts, filters)
        y = jnp.conj(images_f)
        if pixels is not None:
            idx, w = pixels
            b = images_f.shape[0]
            pts = pts.reshape(b, -1, 3)[:, idx]
            filters = filters.reshape(b, -1)[:, idx]
            y = y.reshape(b, -1)[:, idx] * jnp.asarray(w, _real_dtype(cdt))
        fwd = lambda g: self.operator.slice_lifted(g, pts) * filters  # noqa: E731
        (out,) = jax.linear_transpose(fwd, spec)(y)
        return jnp.conj(out)

    def hermitian_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(flat_indices, weights)`` (NumPy) of the image pixels inside the mask that carry a real image's
        whole Fourier transform: one of each Friedel pair ``(k, -k)`` (``ky > 0``, or ``ky == 0`` and
        ``kx > 0``) with weight 1; with weight 1/2 the origin and, for even boxes, the pixels whose mirror is
        not on the image grid (``kx`` or ``ky`` = ``-n/2``).

        For real images, a backprojection ``B`` of these pixels plus its :func:`hermitian_mirror` equals the
        Hermitian part ``(A + mirror(A)) / 2`` of the backprojection ``A`` of all the pixels: the transform
        of the real part of the real-space backprojection, which is all a real map keeps. It costs about 40% of the pixels
        (RELION likewise backprojects half of the transform).
        """
        n = self.n
        k = freq_indices(n)
        ky, kx = np.meshgrid(k, k, indexing="ij")
        inside = self._inside_mask()
        w = np.zeros((n, n))
        w[(ky > 0) | ((ky == 0) & (kx > 0))] = 1.0
        w[(ky == 0) & (kx == 0)] = 0.5
        if n % 2 == 0:
            w[(kx == -(n // 2)) | (ky == -(n // 2))] = 0.5
        flat = np.where(inside, w, 0.0).reshape(-1)
        idx = np.flatnonzero(flat)
        return idx, flat[idx]

    def mask_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(flat_indices, weights)`` (NumPy) of every image pixel inside the mask, each with weight 1 (the
        all-pixel counterpart of :meth:`hermitian_pixels`)."""
        idx = np.flatnonzero(self._inside_mask().reshape(-1))
        return idx, np.ones(idx.size)

    def pixel_frequencies(self, flat_indices: Int[ArrayLike, " p"]) -> Float[np.ndarray, "p 2"]:
        """``(kx, ky)`` of image pixels given by flat indices into the ``n x n`` grid, in Fourier-voxel units
        (NumPy float64; divide by ``n * pixel_size`` for 1/Å)."""
        k = freq_indices(self.n)
        iy, ix = np.divmod(np.asarray(flat_indices), self.n)
        return np.stack([k[ix], k[iy]], axis=-1).astype(np.float64)

    def unlift_adjoint(self, lifted: Complex[Array, "..."]) -> Complex[Array, "n n n"]:
        """The Hermitian adjoint of the operator's lift, ``(lifted grid) -> (n, n, n)``."""
        spec = jax.ShapeDtypeStruct((self.n,) * 3, lifted.dtype)
        (out,) = jax.linear_transpose(self.operator.lift, spec)(jnp.conj(lifted))
        return jnp.conj(out)

    def images(self, vol_f: Complex[Array, "n n n"], rotations: Float[Array, "b 3 3"], shifts: Float[Array, "b 2"],
               ctf_params: CTFParams | None = None, ctf: Float[Array, "b n n"] | None = None) -> Float[Array, "b n n"]:
        """Real-space images ``(B, n, n)`` (inverse centred FFT of :meth:`__call__`)."""
        return ifft2c(self(vol_f, rotations, shifts, ctf_params, ctf)).real


def hermitian_mirror(vol_f: Complex[Array, "n n n"]) -> Complex[Array, "n n n"]:
    """``V(-k)*`` of a centred Fourier volume (``V(-k)`` for a real one): the Friedel mirror, periodic at the
    ``-n/2`` planes of even boxes. ``V + hermitian_mirror(V)`` is the Hermitian part (times 2)."""
    n = vol_f.shape[-1]
    out = jnp.flip(vol_f, (-3, -2, -1))  # index i -> n - 1 - i
    if n % 2 == 0:  # the centre is n/2: i -> (n - i) mod n
        out = jnp.roll(out, 1, (-3, -2, -1))
    return jnp.conj(out) if jnp.iscomplexobj(out) else out


def volume_to_fourier(vol: Float[ArrayLike, "n n n"]) -> Complex[Array, "n n n"]:
    """Real-space volume ``(n, n, n)`` ``[z, y, x]`` -> centred Fourier volume (complex)."""
    vol = jnp.asarray(vol)
    cdt = jnp.complex128 if vol.dtype == jnp.float64 else jnp.complex64
    return fft3c(vol.astype(cdt))


def fourier_to_volume(vol_f: Complex[Array, "n n n"]) -> Float[Array, "n n n"]:
    """Centred Fourier volume -> real-space volume (real part of the inverse centred FFT)."""
    return ifft3c(vol_f).real
