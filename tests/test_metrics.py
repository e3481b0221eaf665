"""FSC and resolution (issue 2 acceptance 8) and the fsc command."""

import json

import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.errors import InputError
from jaxcryo.fourier import fft3c, ifft3c, radius_grid
from jaxcryo.io.mrc import write_map
from jaxcryo.metrics import first_shell_below, fsc, resolution_at, soft_sphere_mask


def test_fsc_self_is_one():
    v = np.random.default_rng(0).standard_normal((32,) * 3)
    r = fsc(v, v, pixel_size=2.0)
    np.testing.assert_allclose(r.fsc, 1.0, atol=1e-6)
    assert len(r.fsc) == 17
    assert r.resolution_05 == pytest.approx(4.0)  # never below: Nyquist
    np.testing.assert_allclose(fsc(v, v, mask=soft_sphere_mask(32)).fsc, 1.0, atol=1e-6)


def test_fsc_independent_noise_near_zero():
    rng = np.random.default_rng(1)
    r = fsc(rng.standard_normal((32,) * 3), rng.standard_normal((32,) * 3))
    assert abs(float(np.mean(r.fsc[1:]))) < 0.05


def test_lowpass_crossing():
    """Two maps share the frequencies |k| <= r0 and have independent content above: FSC = 1 up to shell r0,
    ~0 beyond, so the first shell below 0.5 is r0 + 1 and resolution_05 lies between 1/f(r0+1) and 1/f(r0)."""
    n, px, r0 = 32, 1.5, 9
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((n,) * 3), rng.standard_normal((n,) * 3)
    k = radius_grid(n, 3)
    fa, fb = np.asarray(fft3c(a)), np.asarray(fft3c(b))
    low = np.rint(k) <= r0
    fb = np.where(low, fa, fb)
    b2 = np.asarray(ifft3c(fb)).real
    r = fsc(a, b2, pixel_size=px)
    assert first_shell_below(r.fsc, 0.5) == r0 + 1
    assert n * px / (r0 + 1) <= r.resolution_05 <= n * px / r0


def test_resolution_at_nyquist_and_interpolation():
    f = np.arange(5) / 10.0
    assert resolution_at(f, [1, 1, 1, 1, 1], 0.5, pixel_size=2.5) == 5.0
    assert resolution_at(f, [1, 1, 0.8, 0.2, 0.1], 0.5) == pytest.approx(1 / 0.25)


def test_shape_mismatch():
    with pytest.raises(InputError, match="different shapes"):
        fsc(np.zeros((8, 8, 8)), np.zeros((10, 10, 10)))


def test_fsc_command(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16,) * 3).astype(np.float32)
    write_map(tmp_path / "a.mrc", a, 2.0)
    write_map(tmp_path / "b.mrc", a + 0.5 * rng.standard_normal(a.shape).astype(np.float32), 2.0)
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--json", str(tmp_path / "f.json"),
               "--plot", str(tmp_path / "f.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "0.143" in out and "0.5" in out
    d = json.loads((tmp_path / "f.json").read_text())
    assert set(d) == {"resolution_0143", "resolution_05", "frequency", "fsc"}
    assert len(d["fsc"]) == 9 and d["frequency"][-1] == pytest.approx(0.25)
    assert (tmp_path / "f.png").stat().st_size > 1000
    write_map(tmp_path / "c.mrc", np.zeros((8,) * 3, np.float32), 2.0)
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "c.mrc")]) == 2
