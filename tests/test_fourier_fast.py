"""The centred FFTs' fast paths (sign pattern for even sizes, real-input FFT for real arrays) against the
shifted FFT they replace, in float64, for boxes 0 and 2 mod 4, odd boxes, 2D and 3D, real and complex."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.ndimage import fft2c, fft3c, ifft2c, ifft3c
from jaxcryo.ndimage._fourier import fftc, ifftc


def _shifted(x, d, inverse=False):
    ax = tuple(range(x.ndim - d, x.ndim))
    f = np.fft.ifftn if inverse else np.fft.fftn
    return np.fft.fftshift(f(np.fft.ifftshift(x, axes=ax), axes=ax), axes=ax)


@pytest.mark.parametrize("n", [8, 10, 9, 64, 66])
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_centred_fft_matches_shifted(n, d, kind):
    rng = np.random.default_rng(n + d)
    shape = (3,) + (n,) * d if d == 2 else (n,) * d
    x = rng.standard_normal(shape)
    if kind == "complex":
        x = x + 1j * rng.standard_normal(shape)
    jax.config.update("jax_enable_x64", True)
    try:
        got = np.asarray(fftc(jnp.asarray(x), d))
        inv = np.asarray(ifftc(jnp.asarray(x), d))
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_allclose(got, _shifted(x, d), atol=1e-9 * np.abs(got).max())
    np.testing.assert_allclose(inv, _shifted(x, d, inverse=True), atol=1e-12 * max(1, np.abs(inv).max()) * n ** d)


def test_float32_images_and_gradient():
    x = np.random.default_rng(0).standard_normal((4, 64, 64)).astype(np.float32)
    got = np.asarray(fft2c(jnp.asarray(x)))
    assert got.dtype == np.complex64
    np.testing.assert_allclose(got, _shifted(x.astype(np.float64), 2), atol=2e-6 * np.abs(got).max())
    np.testing.assert_allclose(np.asarray(ifft2c(fft2c(jnp.asarray(x)))).real, x, atol=1e-5)
    v = np.random.default_rng(1).standard_normal((16, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ifft3c(fft3c(jnp.asarray(v)))).real, v, atol=1e-5)
    # the real-input path is differentiable like the shifted FFT: d/dx sum |F x|^2 = 2 N^2 x (Parseval)
    g = jax.grad(lambda a: jnp.sum(jnp.abs(fft2c(a)) ** 2))(jnp.asarray(x[0]))
    np.testing.assert_allclose(np.asarray(g), 2 * 64 * 64 * x[0], rtol=1e-4, atol=1e-5 * 2 * 64 * 64 * np.abs(x[0]).max())
