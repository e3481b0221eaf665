"""The forward model: Fourier slice, in-plane shift and CTF, and its exact adjoint (backprojection).

For a centred Fourier volume ``V`` (``(N, N, N)`` complex, indexed ``[z, y, x]``, see
:mod:`jaxcryo.fourier`) and per image a RELION rotation ``A``, an origin ``o`` (Å) and CTF parameters, the
image's centred Fourier transform is

    ``Y(k) = CTF(k) * exp(+2 pi i k . o) * V((kx, ky, 0) @ A)``       for ``|k| <= mask_radius``

with ``k`` in 1/Å for the shift (the image is the projection shifted by ``-o``, RELION's origin convention)
and in Fourier-voxel units for the slice. ``V`` at off-grid points is obtained by one of three slice
operators, chosen by name:

* ``"nearest"``: nearest Fourier voxel (the Hessian of the least-squares loss is then exactly diagonal);
* ``"trilinear"``: trilinear interpolation between the 8 neighbouring voxels; with ``oversample = s > 1`` the
  volume is first zero-padded ``s``-fold in real space (finer Fourier sampling, more accurate slices);
* ``"nufft"``: exact trigonometric interpolation of the DFT by a type-2 non-uniform FFT (jax-finufft).

All three are linear in ``V``; the adjoint is derived by ``jax.linear_transpose`` of the same code, never
written twice. Everything is jit- and vmap-friendly; float32/complex64 by default, float64/complex128 when
given such inputs with ``jax_enable_x64``.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .ctf import CTFParams, evaluate_ctf
from .fourier import fft3c, freq_grid_2d, freq_indices, ifft2c, ifft3c

SliceMethod = Literal["nearest", "trilinear", "nufft"]
METHODS: tuple[str, ...] = ("nearest", "trilinear", "nufft")


def _real_dtype(cdtype):
    return jnp.float64 if jnp.dtype(cdtype) == jnp.complex128 else jnp.float32


def slice_points(rotations, n: int, dtype=jnp.float32):
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
    k2 = jnp.stack([kx, ky], axis=-1)  # (n, n, 2)
    return jnp.einsum("yxi,bij->byxj", k2, rotations[:, :2, :].astype(dtype))


def _gather(vol, iz, iy, ix):
    """``vol[iz, iy, ix]`` with zeros outside the grid."""
    n = vol.shape[-1]
    valid = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
    flat = (jnp.clip(iz, 0, n - 1) * n + jnp.clip(iy, 0, n - 1)) * n + jnp.clip(ix, 0, n - 1)
    return jnp.where(valid, vol.reshape(-1)[flat], 0)


def slice_nearest(vol_f, points):
    """Nearest-voxel values of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz)."""
    c = jnp.rint(points).astype(jnp.int32) + vol_f.shape[-1] // 2
    return _gather(vol_f, c[..., 2], c[..., 1], c[..., 0])


def slice_trilinear(vol_f, points, weight_power: int = 1):
    """Trilinear interpolation of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz).

    ``weight_power=2`` sums the 8 neighbours with squared weights: its transpose applied to ``CTF^2``
    backprojects the exact Hessian diagonal (:func:`jaxcryo.optim.batch_diagonal_sum`).
    """
    c = points + vol_f.shape[-1] // 2
    c0 = jnp.floor(c)
    f = (c - c0).astype(jnp.real(vol_f).dtype)
    i0 = c0.astype(jnp.int32)
    out = 0
    for dz in (0, 1):
        wz = f[..., 2] if dz else 1 - f[..., 2]
        for dy in (0, 1):
            wy = f[..., 1] if dy else 1 - f[..., 1]
            for dx in (0, 1):
                wx = f[..., 0] if dx else 1 - f[..., 0]
                val = _gather(vol_f, i0[..., 2] + dz, i0[..., 1] + dy, i0[..., 0] + dx)
                out = out + (wz * wy * wx) ** weight_power * val
    return out


def slice_nufft(vol_f, points, eps: float | None = None):
    """Exact (trigonometric) interpolation of the DFT ``vol_f`` at ``points`` by a type-2 NUFFT.

    ``V(q) = sum_r v(r) exp(-2 pi i q . r / N)`` with ``v = ifft3c(vol_f)`` on the centred grid.
    """
    from jax_finufft import nufft2

    n = vol_f.shape[-1]
    if eps is None:
        eps = 1e-12 if vol_f.dtype == jnp.complex128 else 1e-6
    vol = ifft3c(vol_f)
    shape = points.shape[:-1]
    p = points.reshape(-1, 3) * (2 * jnp.pi / n)
    # jax-finufft: modes f[k1, k2, k3] in CMCL (centred) order, points (x, y, z) paired with (k1, k2, k3);
    # our volume is [z, y, x], so pass the z coordinate first.
    vals = nufft2(vol, p[:, 2], p[:, 1], p[:, 0], iflag=-1, eps=eps)
    return vals.reshape(shape)


def shift_phase(shifts, freqs):
    """Phase ramps ``exp(+2 pi i k . o)`` ``(B, n, n)`` for origins ``shifts`` ``(B, 2)`` (Å, RELION's
    rlnOriginX/YAngst) on the frequency grid ``freqs`` ``(n, n, 2)`` (1/Å)."""
    ph = 2 * jnp.pi * (freqs[..., 0] * shifts[:, 0, None, None] + freqs[..., 1] * shifts[:, 1, None, None])
    return jax.lax.complex(jnp.cos(ph), jnp.sin(ph))


class Projector(eqx.Module):
    """The forward model ``V -> Y_i`` for a box of ``n`` pixels of ``pixel_size`` Å.

    Attributes:
        n: box size (images ``n x n``, volume ``n^3``).
        pixel_size: Å per pixel.
        method: ``"nearest"``, ``"trilinear"`` or ``"nufft"``.
        oversample: real-space zero-padding factor for ``"trilinear"``/``"nearest"`` (1 = none).
        mask_radius: image frequencies with ``|k| > mask_radius`` (voxel units) are zeroed; default ``n/2``.
    """

    n: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    method: str = eqx.field(static=True, default="trilinear")
    oversample: int = eqx.field(static=True, default=1)
    mask_radius: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown slice method {self.method!r}; expected one of {METHODS}")
        if self.oversample < 1 or int(self.oversample) != self.oversample:
            raise ValueError(f"oversample must be a positive integer, got {self.oversample}")

    # -- grids -------------------------------------------------------------------------------------
    def freqs(self, dtype=jnp.float32):
        """Image frequencies ``(n, n, 2)`` in 1/Å."""
        return jnp.asarray(freq_grid_2d(self.n, self.pixel_size), dtype=dtype)

    def image_mask(self, dtype=jnp.float32):
        """``(n, n)`` 0/1 mask of the image frequencies that are modelled (``|k| <= mask_radius``)."""
        r = self.n / 2 if self.mask_radius is None else self.mask_radius
        k = freq_indices(self.n)
        rr = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
        return jnp.asarray(rr <= r + 1e-6, dtype=dtype)

    def ctf(self, ctf_params: CTFParams | None, dtype=jnp.float32):
        """CTF values ``(B, n, n)`` for a batch of parameters, or ``None`` when the CTF is off."""
        if ctf_params is None:
            return None
        return evaluate_ctf(ctf_params, self.freqs(dtype))

    # -- the operator ------------------------------------------------------------------------------
    def slices(self, vol_f, rotations):
        """Central slices ``(B, n, n)`` of ``vol_f`` (no shift, no CTF, no mask)."""
        rdt = _real_dtype(vol_f.dtype)
        s = self.oversample
        if self.method == "nufft":
            return slice_nufft(vol_f, slice_points(rotations, self.n, rdt))
        if s > 1:
            vol = ifft3c(vol_f)
            pad = (s * self.n) // 2 - self.n // 2
            vol = jnp.pad(vol, [(pad, s * self.n - self.n - pad)] * 3)
            vol_f = fft3c(vol)
        pts = slice_points(rotations, self.n, rdt) * s
        if self.method == "nearest":
            return slice_nearest(vol_f, pts)
        return slice_trilinear(vol_f, pts)

    def __call__(self, vol_f, rotations, shifts, ctf_params: CTFParams | None = None, ctf=None):
        """Fourier images ``(B, n, n)`` complex.

        Args:
            vol_f: ``(n, n, n)`` centred Fourier volume (complex).
            rotations: ``(B, 3, 3)`` RELION matrices.
            shifts: ``(B, 2)`` RELION origins in Å.
            ctf_params: per-image CTF parameters (fields ``(B,)``), or ``None``.
            ctf: precomputed CTF values ``(B, n, n)``; overrides ``ctf_params``.
        """
        rdt = _real_dtype(vol_f.dtype)
        y = self.slices(vol_f, rotations)
        mult = shift_phase(shifts.astype(rdt), self.freqs(rdt)).astype(vol_f.dtype) * self.image_mask(rdt)
        if ctf is None:
            ctf = self.ctf(ctf_params, rdt)
        if ctf is not None:
            mult = mult * ctf
        return y * mult

    def adjoint(self, images_f, rotations, shifts, ctf_params: CTFParams | None = None, ctf=None):
        """Exact Hermitian adjoint (backprojection) ``(B, n, n) -> (n, n, n)`` of :meth:`__call__`.

        Derived with ``jax.linear_transpose`` of the forward model (conjugated, since that gives the plain
        transpose of a complex-linear map).
        """
        cdt = images_f.dtype
        spec = jax.ShapeDtypeStruct((self.n,) * 3, cdt)
        fwd = lambda v: self(v, rotations, shifts, ctf_params, ctf)  # noqa: E731
        (out,) = jax.linear_transpose(fwd, spec)(jnp.conj(images_f))
        return jnp.conj(out)

    def images(self, vol_f, rotations, shifts, ctf_params: CTFParams | None = None, ctf=None):
        """Real-space images ``(B, n, n)`` (inverse centred FFT of :meth:`__call__`)."""
        return ifft2c(self(vol_f, rotations, shifts, ctf_params, ctf)).real


def volume_to_fourier(vol):
    """Real-space volume ``(n, n, n)`` ``[z, y, x]`` -> centred Fourier volume (complex)."""
    vol = jnp.asarray(vol)
    cdt = jnp.complex128 if vol.dtype == jnp.float64 else jnp.complex64
    return fft3c(vol.astype(cdt))


def fourier_to_volume(vol_f):
    """Centred Fourier volume -> real-space volume (real part of the inverse centred FFT)."""
    return ifft3c(vol_f).real
