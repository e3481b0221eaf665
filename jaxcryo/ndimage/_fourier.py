"""Centred Fourier transforms, frequency grids, shells, Fourier cropping and padding.

Conventions used throughout jaxcryo:

* Arrays are indexed ``[z, y, x]`` (volumes) and ``[y, x]`` (images), as MRC stores them.
* "Centred" means the origin (real space) and the zero frequency (Fourier space) sit at index ``N // 2``
  of every axis. ``fftc`` / ``ifftc`` map between the two, unnormalised forward, ``1/N^d`` inverse (NumPy's
  convention), so the Fourier slice theorem holds with the plain sum along z:
  ``fft2c(vol.sum(0)) == fft3c(vol)[N // 2]``.
* Integer frequency indices run from ``-N//2`` to ``(N-1)//2``; frequencies in 1/Å are
  ``index / (N * pixel_size)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Inexact, Int, Num, Shaped


def _axes(ndim: int, d: int) -> tuple[int, ...]:
    return tuple(range(ndim - d, ndim))


def _checkerboard(shape: tuple[int, ...], dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(c, s c)`` with ``c = (-1)^(i + j + ...)`` and ``s = (-1)^(sum N_a / 2)`` on an even grid: for even
    sizes the shifts of a centred transform are sign patterns, ``fftshift(fft(ifftshift(x))) = s c fft(c x)``
    exactly (the same for the inverse), so no array is copied to roll it."""
    c = np.ones((), np.int64)
    for m in shape:
        c = np.multiply.outer(c, (-1) ** np.arange(m))
    return c.astype(dtype), (c * (-1) ** (sum(shape) // 2 % 2)).astype(dtype)


def _even(x, ax) -> bool:
    return all(x.shape[a] % 2 == 0 for a in ax)


def fftc(x: Num[Array, "..."], d: int) -> Inexact[Array, "..."]:
    """Centred unnormalised FFT over the last ``d`` axes.

    Even sizes (every box jaxcryo writes) take the sign pattern of :func:`_checkerboard` instead of the two
    shifts, and a real ``x`` one real-input FFT (``rfftn``, about half the work) whose missing half is its
    Hermitian mirror: ``tests/test_fourier_fast.py`` checks both against the shifted FFT."""
    x = jnp.asarray(x)
    ax = _axes(x.ndim, d)
    if not _even(x, ax):
        return jnp.fft.fftshift(jnp.fft.fftn(jnp.fft.ifftshift(x, axes=ax), axes=ax), axes=ax)
    if jnp.iscomplexobj(x):
        c, sc = _checkerboard(x.shape[-d:], jnp.real(x).dtype)
        return jnp.fft.fftn(x * c, axes=ax) * sc
    c, sc = _checkerboard(x.shape[-d:], x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else np.float32)
    h = jnp.fft.rfftn(x * c, axes=ax)  # last axis: frequencies 0 .. N/2
    m = x.shape[-1]
    # the rest of the last axis, frequencies N/2+1 .. N-1 = conj of the transform at minus that frequency
    rest = jnp.conj(h[..., 1:m // 2])
    if d > 1:  # minus on the other axes too: flip them, index 0 stays at 0 (roll by one)
        rest = jnp.roll(jnp.flip(rest, axis=ax[:-1]), 1, axis=ax[:-1])
    return jnp.concatenate([h, jnp.flip(rest, axis=-1)], axis=-1) * sc


def ifftc(x: Num[Array, "..."], d: int) -> Inexact[Array, "..."]:
    """Centred inverse FFT over the last ``d`` axes (normalised by ``1/N^d``; even sizes by the sign pattern,
    as :func:`fftc`)."""
    x = jnp.asarray(x)
    ax = _axes(x.ndim, d)
    if not _even(x, ax):
        return jnp.fft.fftshift(jnp.fft.ifftn(jnp.fft.ifftshift(x, axes=ax), axes=ax), axes=ax)
    c, sc = _checkerboard(x.shape[-d:], jnp.real(x).dtype if jnp.iscomplexobj(x) or
                          jnp.issubdtype(x.dtype, jnp.floating) else np.float32)
    return jnp.fft.ifftn(x * c, axes=ax) * sc


def fft2c(x: Num[Array, "*b n n"]) -> Inexact[Array, "*b n n"]:
    """Centred 2D FFT of ``(..., N, N)`` images."""
    return fftc(x, 2)


def ifft2c(x: Num[Array, "*b n n"]) -> Inexact[Array, "*b n n"]:
    """Centred inverse 2D FFT of ``(..., N, N)`` Fourier images."""
    return ifftc(x, 2)


def fft3c(x: Num[Array, "*b n n n"]) -> Inexact[Array, "*b n n n"]:
    """Centred 3D FFT of ``(..., N, N, N)`` volumes."""
    return fftc(x, 3)


def ifft3c(x: Num[Array, "*b n n n"]) -> Inexact[Array, "*b n n n"]:
    """Centred inverse 3D FFT of ``(..., N, N, N)`` Fourier volumes."""
    return ifftc(x, 3)


def freq_indices(n: int) -> Int[np.ndarray, " n"]:
    """Integer frequency (or centred position) index of each entry of a centred axis: ``arange(n) - n//2``."""
    return np.arange(n) - n // 2


def freq_grid_2d(n: int, pixel_size: float = 1.0, dtype=np.float32) -> Float[np.ndarray, "n n 2"]:
    """Frequencies of a centred ``n x n`` Fourier image, shape ``(n, n, 2)`` with last axis ``(kx, ky)``.

    In 1/Å when ``pixel_size`` is in Å/px (``pixel_size=1`` gives cycles per pixel; the integer index is
    ``freq_grid_2d(n, 1/n)``).
    """
    k = freq_indices(n) / (n * pixel_size)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return np.stack([kx, ky], axis=-1).astype(dtype)


def freq_grid_3d(n: int, pixel_size: float = 1.0, dtype=np.float32) -> Float[np.ndarray, "n n n 3"]:
    """Frequencies of a centred ``n^3`` Fourier volume, shape ``(n, n, n, 3)``, last axis ``(kx, ky, kz)``."""
    k = freq_indices(n) / (n * pixel_size)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.stack([kx, ky, kz], axis=-1).astype(dtype)


def radius_grid(n: int, d: int) -> Float[np.ndarray, "..."]:
    """Distance of each entry of a centred ``n^d`` grid from the centre, in index units."""
    k = freq_indices(n).astype(np.float64)
    grids = np.meshgrid(*([k] * d), indexing="ij")
    return np.sqrt(sum(g * g for g in grids))


def shell_index(n: int, d: int = 3) -> Int[np.ndarray, "..."]:
    """Fourier shell (of width one Fourier voxel) of each entry: ``round(|k|)`` in index units."""
    return np.rint(radius_grid(n, d)).astype(np.int32)


def ball_mask(n: int, radius: float | None = None, d: int = 3) -> Bool[np.ndarray, "..."]:
    """Boolean mask of the centred grid entries with ``|k| <= radius`` (default ``n // 2``)."""
    r = n // 2 if radius is None else radius
    return radius_grid(n, d) <= r + 1e-9


def crop_fourier(x: Shaped[ArrayLike, "..."], n_out: int, d: int) -> Shaped[ArrayLike, "..."]:
    """Crop a centred Fourier array to ``n_out`` along its last ``d`` axes (keeps the central frequencies).

    Works for NumPy and JAX arrays. ``n_out`` must not exceed the input size.
    """
    n = x.shape[-1]
    if n_out > n:
        raise ValueError(f"crop_fourier: output size {n_out} exceeds input size {n}")
    start = n // 2 - n_out // 2
    sl = (Ellipsis,) + (slice(start, start + n_out),) * d
    return x[sl]


def pad_fourier(x: Shaped[ArrayLike, "..."], n_out: int, d: int) -> Shaped[ArrayLike, "..."]:
    """Zero-pad a centred Fourier array to ``n_out`` along its last ``d`` axes (keeps the centre at n//2)."""
    n = x.shape[-1]
    if n_out < n:
        raise ValueError(f"pad_fourier: output size {n_out} is smaller than input size {n}")
    before = n_out // 2 - n // 2
    after = n_out - n - before
    pad = [(0, 0)] * (x.ndim - d) + [(before, after)] * d
    xp = jnp if not isinstance(x, np.ndarray) else np
    return xp.pad(x, pad)


def resize_fourier(x: Shaped[ArrayLike, "..."], n_out: int, d: int) -> Shaped[ArrayLike, "..."]:
    """Crop or zero-pad a centred Fourier array to ``n_out`` along its last ``d`` axes."""
    n = x.shape[-1]
    if n_out == n:
        return x
    return crop_fourier(x, n_out, d) if n_out < n else pad_fourier(x, n_out, d)


def resample_real(x: Float[ArrayLike, "..."], n_out: int, d: int) -> Float[Array, "..."]:
    """Fourier-crop (downsample) or zero-pad (upsample) a real-space array to ``n_out`` per axis.

    Keeps the physical extent: the pixel size changes by ``n / n_out``. Values are scaled so that the
    intensity per pixel is preserved (``mean`` is kept).
    """
    n = x.shape[-1]
    if n_out == n:
        return x
    f = fftc(jnp.asarray(x), d)
    f = resize_fourier(f, n_out, d)
    out = ifftc(f, d).real * (n_out / n) ** d
    return out
