"""FSC, resolution thresholds, masks, relative error, plots and the ``jaxcryo fsc`` command."""

import json

import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.errors import InputError
from jaxcryo.ndimage._fourier import ball_mask, fft3c, ifft3c, radius_grid
from jaxcryo.ndimage._metrics import (FSCResult, first_shell_below, fsc, relative_error, resolution_at,
                             soft_sphere_mask)
from jaxcryo.plotting import plot_convergence, plot_fsc


def test_fsc_self_is_one():
    v = np.random.default_rng(0).standard_normal((32,) * 3)
    r = fsc(v, v, pixel_size=2.0)
    assert isinstance(r, FSCResult)
    np.testing.assert_allclose(r.fsc, 1.0, atol=1e-6)
    assert len(r.fsc) == 17  # shells 0..n//2, Nyquist included
    np.testing.assert_allclose(r.frequency, np.arange(17) / (32 * 2.0))
    assert r.resolution_05 == pytest.approx(4.0)  # never below: Nyquist = 2 * pixel size
    assert r.resolution_0143 == pytest.approx(4.0)
    np.testing.assert_allclose(fsc(v, v, mask=soft_sphere_mask(32)).fsc, 1.0, atol=1e-6)


def test_fsc_fourier_input_matches_real():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 16, 16, 16))
    b = a + b
    r = fsc(a, b, pixel_size=1.3)
    rf = fsc(np.asarray(fft3c(a)), np.asarray(fft3c(b)), pixel_size=1.3, fourier=True)
    np.testing.assert_allclose(rf.fsc, r.fsc, atol=1e-5)
    assert rf.resolution_05 == pytest.approx(r.resolution_05, rel=1e-4)
    with pytest.raises(InputError):
        fsc(np.asarray(fft3c(a)), np.asarray(fft3c(b)), mask=soft_sphere_mask(16), fourier=True)


def test_fsc_independent_noise_near_zero():
    rng = np.random.default_rng(1)
    r = fsc(rng.standard_normal((32,) * 3), rng.standard_normal((32,) * 3))
    assert abs(float(np.mean(r.fsc[1:]))) < 0.05


def test_lowpass_vs_original_crossing():
    """A white-noise map ``a`` and its sharp low-pass ``b`` (Fourier coefficients kept for |k| <= r0, zero
    beyond). Analytically, with shells s = round(|k|):

    * s <= r0 - 1: every voxel has |k| < r0, so F_b = F_a there and FSC = 1 exactly;
    * s = r0: |k| in [r0 - 1/2, r0 + 1/2) and only |k| <= r0 is kept, so FSC = sqrt(P_kept / P_shell),
      about sqrt(1/2) ~ 0.7 (> 0.5) for white noise;
    * s >= r0 + 1: |k| >= r0 + 1/2 > r0, so F_b = 0 and the empty-denominator rule gives FSC = 0.

    Hence the first shell below 0.5 is exactly r0 + 1, and the interpolated 0.5 crossing lies between shells
    r0 and r0 + 1, i.e. within one shell's frequency 1/(n px) of r0 / (n px)."""
    n, px, r0 = 32, 1.5, 9
    a = np.random.default_rng(2).standard_normal((n,) * 3)
    fa = np.asarray(fft3c(a))
    b = np.asarray(ifft3c(np.where(ball_mask(n, r0), fa, 0))).real
    r = fsc(b, a, pixel_size=px)
    np.testing.assert_allclose(r.fsc[:r0], 1.0, atol=1e-6)
    assert 0.5 < r.fsc[r0] < 0.9
    np.testing.assert_allclose(r.fsc[r0 + 1:], 0.0, atol=1e-6)
    assert first_shell_below(r.fsc, 0.5) == r0 + 1
    assert abs(1 / r.resolution_05 - r0 / (n * px)) <= 1 / (n * px)
    # exact interpolation: crossing at shell r0 + t with t = (f_r0 - 0.5) / (f_r0 - 0)
    t = (r.fsc[r0] - 0.5) / r.fsc[r0]
    assert r.resolution_05 == pytest.approx(n * px / (r0 + t))
    assert first_shell_below(r.fsc, 0.143) == r0 + 1


def test_shared_low_frequencies_crossing():
    """Two maps share the frequencies with round(|k|) <= r0 and have independent content above: FSC = 1 up
    to shell r0, ~0 beyond, so the first shell below 0.5 is r0 + 1."""
    n, px, r0 = 32, 1.5, 9
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((n,) * 3), rng.standard_normal((n,) * 3)
    fa, fb = np.asarray(fft3c(a)), np.asarray(fft3c(b))
    fb = np.where(np.rint(radius_grid(n, 3)) <= r0, fa, fb)
    r = fsc(a, np.asarray(ifft3c(fb)).real, pixel_size=px)
    assert first_shell_below(r.fsc, 0.5) == r0 + 1
    assert n * px / (r0 + 1) <= r.resolution_05 <= n * px / r0


def test_resolution_at_nyquist_and_interpolation():
    f = np.arange(5) / 10.0
    assert resolution_at(f, [1, 1, 1, 1, 1], 0.5, pixel_size=2.5) == 5.0
    assert resolution_at(f, [1, 1, 1, 1, 1], 0.5) == pytest.approx(1 / 0.4)  # Nyquist = f[-1]
    assert resolution_at(f, [1, 1, 0.8, 0.2, 0.1], 0.5) == pytest.approx(1 / 0.25)
    assert resolution_at(f, [0.1, 1, 0.8, 0.2, 0.1], 0.5) == pytest.approx(1 / 0.25)  # shell 0 skipped
    assert first_shell_below([0.0, 0.9, 0.4, 0.6, 0.1], 0.5) == 2
    assert first_shell_below([0.0, 0.9, 0.9], 0.5) == 3


def test_to_dict_schema():
    v = np.random.default_rng(4).standard_normal((8,) * 3)
    d = fsc(v, v + 1.0 * np.random.default_rng(6).standard_normal(v.shape), pixel_size=1.2).to_dict()
    assert list(d) == ["resolution_0143", "resolution_05", "frequency", "fsc"]
    assert len(d["frequency"]) == len(d["fsc"]) == 5
    assert all(type(x) is float for x in d["frequency"] + d["fsc"])
    assert json.loads(json.dumps(d)) == d


def test_soft_sphere_mask():
    m = soft_sphere_mask(32)
    assert m.shape == (32, 32, 32) and m.dtype == np.float32
    r = radius_grid(32, 3)
    assert np.all(m[r <= 0.4 * 32] == 1) and np.all(m[r >= 0.4 * 32 + 3.2] == 0)
    edge = m[(r > 12.8) & (r < 16)]
    assert edge.size and np.all((edge > 0) & (edge < 1))
    m2 = soft_sphere_mask(16, radius=4, width=2)
    assert m2[8, 8, 13] == pytest.approx(0.5)  # r = 5: halfway through the cosine edge


def test_relative_error():
    ref = np.arange(1, 9, dtype=np.float64)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(2 * ref, ref) == pytest.approx(1.0)
    z = ref * (1 + 1j)
    assert relative_error(z * 1.1, z) == pytest.approx(0.1)
    mask = ref > 4
    x = ref.copy()
    x[~mask] = 0  # errors outside the mask are ignored
    assert relative_error(x, ref, mask=mask) == 0.0
    with pytest.raises(InputError):
        relative_error(ref[:4], ref)


def test_shape_mismatch_and_non_cubic():
    with pytest.raises(InputError, match=r"\(8, 8, 8\).*\(10, 10, 10\)"):
        fsc(np.zeros((8, 8, 8)), np.zeros((10, 10, 10)))
    with pytest.raises(InputError, match=r"\(8, 8, 10\)"):
        fsc(np.zeros((8, 8, 10)), np.zeros((8, 8, 10)))


def test_plots(tmp_path):
    v = np.random.default_rng(7).standard_normal((16,) * 3)
    r = fsc(v, v + np.random.default_rng(8).standard_normal(v.shape), pixel_size=1.5)
    p = plot_fsc({"a": r, "b": r.to_dict(), "none": None}, tmp_path / "sub" / "fsc.png", title="t")
    assert p.stat().st_size > 1000
    hist = {"sgd": [{"epoch": i, "seconds": 0.5 * i, "loss": 1.0 / (i + 1), "resolution_05_ref": None}
                    for i in range(4)]}
    q = plot_convergence(hist, tmp_path / "conv.png")
    assert q.stat().st_size > 1000
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["conv.png", "fsc.png", "sub"]  # no temp files


def test_fsc_command(tmp_path, capsys):
    mrc = pytest.importorskip("jaxcryo.io.mrc")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16,) * 3).astype(np.float32)
    mrc.write_map(tmp_path / "a.mrc", a, 2.0)
    mrc.write_map(tmp_path / "b.mrc", a + 0.5 * rng.standard_normal(a.shape).astype(np.float32), 2.0)
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--json", str(tmp_path / "f.json"),
               "--plot", str(tmp_path / "f.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FSC=0.143:" in out and "FSC=0.5:" in out
    d = json.loads((tmp_path / "f.json").read_text())
    assert list(d) == ["resolution_0143", "resolution_05", "frequency", "fsc"]
    assert len(d["fsc"]) == 9 and d["frequency"][-1] == pytest.approx(0.25)
    ref = fsc(*(mrc.read_map(tmp_path / f)[0] for f in ("a.mrc", "b.mrc")), pixel_size=2.0)
    assert d["resolution_05"] == pytest.approx(ref.resolution_05)
    assert (tmp_path / "f.png").stat().st_size > 1000
    # masked run
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--mask-radius", "6"]) == 0
    # shape mismatch: exit code 2, message names both files
    mrc.write_map(tmp_path / "c.mrc", np.zeros((8,) * 3, np.float32), 2.0)
    capsys.readouterr()
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "c.mrc")]) == 2
    err = capsys.readouterr().err
    assert "a.mrc" in err and "c.mrc" in err
