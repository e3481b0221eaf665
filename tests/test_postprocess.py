"""Post-processing (issue 18): phase randomisation, the mask-corrected FSC (Chen et al. 2013), the Guinier
B-factor (Rosenthal & Henderson 2003), sharpening and low-pass, the writer and ``jaxcryo postprocess``."""

import json
import warnings

import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo import read_map, write_map
from jaxcryo.cli import main
from jaxcryo.data import phantom
from jaxcryo.errors import InputError
from jaxcryo.ndimage import auto_mask, first_shell_below, fsc, low_pass, radius_grid, shell_index
from jaxcryo.post import corrected_fsc, fsc_weights, randomise_phases

N, PX = 48, 2.0


def _decay(vol, bfactor, px=PX):
    """``vol`` with the amplitudes multiplied by exp(-B s^2 / 4)."""
    n = vol.shape[-1]
    s2 = (np.fft.ifftshift(radius_grid(n, 3)) / (n * px)) ** 2
    return np.fft.ifftn(np.fft.fftn(vol) * np.exp(-bfactor / 4 * s2)).real


def _signal_and_noise(seed=3, shell=5):
    """A common signal below ``shell`` plus independent unit noise in each half."""
    sig = low_pass(phantom(N), PX, N * PX / shell)
    sig = sig / sig.std()
    rng = np.random.default_rng(seed)
    return sig, sig + rng.standard_normal(sig.shape), sig + rng.standard_normal(sig.shape)


def test_phase_randomisation_keeps_amplitudes_and_decorrelates_beyond_the_cut():
    v = phantom(N).astype(np.float64)
    cut = 8
    out = randomise_phases(v, cut, np.random.default_rng(0))
    fa, fb = np.fft.fftn(v), np.fft.fftn(out)
    r = np.fft.ifftshift(radius_grid(N, 3))
    np.testing.assert_allclose(np.abs(fb), np.abs(fa), rtol=1e-9, atol=1e-9 * np.abs(fa).max())
    low, high = r < cut, r >= cut
    np.testing.assert_allclose(fb[low], fa[low], atol=1e-9 * np.abs(fa).max())
    dphi = np.angle(fb[high] * np.conj(fa[high]))
    assert abs(np.mean(np.cos(dphi))) < 0.02 and abs(np.mean(np.sin(dphi))) < 0.02
    curve = fsc(v, out).fsc
    np.testing.assert_allclose(curve[:cut], 1.0, atol=1e-9)
    assert np.abs(curve[cut + 1:]).max() < 0.15 and abs(curve[cut + 1:].mean()) < 0.03
    again = randomise_phases(v, cut, np.random.default_rng(0))
    assert np.array_equal(again, out)  # seeded


def test_corrected_fsc_of_independent_noise_inside_a_mask_is_zero():
    sig, a, b = _signal_and_noise()
    mask = auto_mask(sig, PX, lowpass=None, extend=0, soft_edge=0)  # a hard, tight mask: strong mask effect
    r = jc.postprocess(a, b, pixel_size=PX, mask=mask, seed=1, bfactor=0.0)
    k = r.randomise_shell
    assert k == 6  # the first shell where the unmasked FSC falls below 0.8 (the signal stops at shell 5)
    beyond = slice(k + 2, None)
    assert np.abs(r.fsc_unmasked[beyond]).mean() < 0.05
    assert r.fsc_masked[beyond].mean() > 0.1  # the mask correlates the independent noise...
    assert abs(r.fsc_corrected[beyond].mean()) < 0.03  # ...and the correction removes it
    assert np.abs(r.fsc_corrected[beyond]).mean() < 0.08
    np.testing.assert_array_equal(r.fsc_corrected[:k + 2], r.fsc_masked[:k + 2])
    # the corrected curve falls below 0.143 within a shell of the first corrected one; the masked one far later
    assert first_shell_below(r.fsc_corrected, 0.143) <= k + 3 < k + 6 <= first_shell_below(r.fsc_masked, 0.143)


def test_corrected_fsc_formula_and_fsc_weights():
    t = np.array([1.0, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2])
    n = np.array([1.0, 0.9, 0.7, 0.5, 0.2, 0.1, 0.2])
    out = corrected_fsc(t, n, 2)
    np.testing.assert_allclose(out[:4], t[:4])
    np.testing.assert_allclose(out[4:], (t[4:] - n[4:]) / (1 - n[4:]))
    w = fsc_weights([1.0, 0.5, 0.2, 0.0, 0.3])
    np.testing.assert_allclose(w, [1.0, np.sqrt(2 / 3), np.sqrt(0.4 / 1.2), 0.0, 0.0])


@pytest.mark.parametrize("bfactor", [60.0, 150.0])
def test_guinier_fit_recovers_a_known_bfactor(bfactor):
    rng = np.random.default_rng(7)
    flat = np.fft.ifftn(np.exp(2j * np.pi * rng.random((N,) * 3))).real  # ~flat amplitude spectrum
    flat = np.fft.ifftn(np.exp(1j * np.angle(np.fft.fftn(flat)))).real  # exactly flat
    v = _decay(flat, bfactor)
    eps = 1e-4 * v.std()
    a, b = v + eps * rng.standard_normal(v.shape), v + eps * rng.standard_normal(v.shape)
    r = jc.postprocess(a, b, pixel_size=PX, fit_from=20.0, fit_to=4.5)
    assert r.bfactor == pytest.approx(-bfactor, rel=0.05)
    assert r.bfactor_fitted and r.fit_correlation > 0.99
    assert 4.5 <= r.fit_to < r.fit_from <= 20.0
    # the sharpened Guinier curve is flat over the fit range
    used = r.guinier_fit
    assert np.ptp(r.guinier_sharpened[used]) < 0.05 * np.ptp(r.guinier_weighted[used])


def test_given_bfactor_low_pass_and_no_mask():
    sig, a, b = _signal_and_noise(shell=12)
    r = jc.postprocess(a, b, pixel_size=PX, bfactor=-80.0, low_pass=10.0)
    assert r.bfactor == -80.0 and not r.bfactor_fitted and r.fit_from is None and r.intercept is None
    assert r.fsc_masked is None and r.fsc_randomised is None and r.masked_map is None
    np.testing.assert_array_equal(r.fsc_corrected, r.fsc_unmasked)
    spec = np.abs(np.fft.fftn(r.map))
    shells = np.fft.ifftshift(shell_index(N, 3))
    k = round(N * PX / 10.0)
    assert spec[shells > k + 1].max() < 1e-6 * spec.max()  # the low-pass edge ends one shell past k
    d = r.to_dict()
    assert d["fsc_masked"] is None and d["low_pass"] == 10.0
    # default low-pass: the corrected FSC-0.143 resolution
    r2 = jc.postprocess(a, b, pixel_size=PX, bfactor=0.0)
    assert r2.low_pass == r2.resolution_0143


def test_postprocess_bad_input():
    sig, a, b = _signal_and_noise()
    with pytest.raises(InputError, match="half2"):
        jc.postprocess(a, b[:-2, :-2, :-2], pixel_size=PX)
    bad = b.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="half2.*non-finite"):
        jc.postprocess(a, bad, pixel_size=PX)
    with pytest.raises(InputError, match=r"mask.*\[0, 1\]"):
        jc.postprocess(a, b, pixel_size=PX, mask=2.0 * np.ones_like(a))
    with pytest.raises(InputError, match="mask.*empty"):
        jc.postprocess(a, b, pixel_size=PX, mask=np.zeros_like(a))
    with pytest.raises(InputError, match="mask.*shape"):
        jc.postprocess(a, b, pixel_size=PX, mask=np.ones((8, 8, 8)))
    with pytest.raises(InputError, match="randomise_at_fsc"):
        jc.postprocess(a, a, pixel_size=PX, mask=np.ones_like(a))


def _write_halves(tmp_path):
    sig, a, b = _signal_and_noise(shell=10)
    write_map(tmp_path / "half1.mrc", a, PX)
    write_map(tmp_path / "half2.mrc", b, PX)
    mask = auto_mask(sig, PX)
    write_map(tmp_path / "mask.mrc", mask, PX)
    return a, b, mask


def test_postprocess_cli_round_trip(tmp_path, capsys):
    a, b, mask = _write_halves(tmp_path)
    out = tmp_path / "pp"
    assert main(["postprocess", str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc"), "--mask",
                 str(tmp_path / "mask.mrc"), "--out", str(out), "--auto-bfactor", "--fit-from", "20",
                 "--fit-to", "0"]) == 0
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.json", "fsc.png", "guinier.png"):
        assert (out / name).stat().st_size > 0, name
    d = json.loads((out / "postprocess.json").read_text())
    for key in ("resolution_0143", "resolution_05", "bfactor", "fit_from", "fit_to", "intercept",
                "fsc_unmasked", "fsc_masked", "fsc_randomised", "fsc_corrected", "frequency", "resolution"):
        assert key in d, key
    ref = jc.postprocess(a, b, pixel_size=PX, mask=mask, fit_from=20.0)
    assert d["resolution_0143"] == pytest.approx(ref.resolution_0143, rel=1e-5)
    assert d["bfactor"] == pytest.approx(ref.bfactor, rel=1e-4)
    assert len(d["fsc_corrected"]) == len(d["frequency"]) == N // 2 + 1
    vol, px = read_map(out / "postprocess.mrc")
    assert px == pytest.approx(PX) and vol.shape == (N,) * 3
    np.testing.assert_allclose(vol, ref.map, atol=1e-5 * np.abs(ref.map).max())
    masked, _ = read_map(out / "postprocess_masked.mrc")
    np.testing.assert_allclose(masked, ref.map * mask, atol=1e-5 * np.abs(ref.map).max())
    # --auto-mask and a given B-factor
    assert main(["postprocess", str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc"), "--auto-mask",
                 "--bfactor", "-50", "--out", str(tmp_path / "pp2")]) == 0
    d2 = json.loads((tmp_path / "pp2" / "postprocess.json").read_text())
    assert d2["bfactor"] == -50.0 and d2["fit_from"] is None and (tmp_path / "pp2" / "mask.mrc").exists()


def test_postprocess_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    a, b, mask = _write_halves(tmp_path)
    h1, h2 = str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc")
    cases = {}
    write_map(tmp_path / "small.mrc", b[:40, :40, :40], PX)
    cases["small.mrc"] = [h1, str(tmp_path / "small.mrc")]
    write_map(tmp_path / "px.mrc", b, 1.5)
    cases["px.mrc"] = [h1, str(tmp_path / "px.mrc")]
    nan = b.copy()
    nan[1, 2, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_map(tmp_path / "nan.mrc", nan, PX)
    cases["nan.mrc"] = [h1, str(tmp_path / "nan.mrc")]
    write_map(tmp_path / "m_range.mrc", 1.5 * mask, PX)
    cases["m_range.mrc"] = [h1, h2, "--mask", str(tmp_path / "m_range.mrc")]
    write_map(tmp_path / "m_box.mrc", mask[:32, :32, :32], PX)
    cases["m_box.mrc"] = [h1, h2, "--mask", str(tmp_path / "m_box.mrc")]
    write_map(tmp_path / "m_empty.mrc", np.zeros_like(mask), PX)
    cases["m_empty.mrc"] = [h1, h2, "--mask", str(tmp_path / "m_empty.mrc")]
    for name, args in cases.items():
        capsys.readouterr()
        assert main(["postprocess", *args, "--out", str(tmp_path / "bad")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "Traceback" not in err[0], (name, err)
    assert not (tmp_path / "bad" / "postprocess.json").exists()


def test_writer_beside_another_commands_outputs(tmp_path):
    """How ``refine`` can write its postprocessed map beside its half maps without touching its own fsc.png."""
    from jaxcryo.cli.postprocess import write_outputs
    from jaxcryo.ndimage import spherical_mask

    sig, a, b = _signal_and_noise(shell=10)
    (tmp_path / "fsc.png").write_bytes(b"refine's")
    r = jc.postprocess(a, b, pixel_size=PX, mask=spherical_mask(N, 0.6 * N * PX, PX), fit_from=20.0)
    paths = write_outputs(r, tmp_path, plot_prefix="postprocess_")
    assert sorted(p.name for p in paths) == ["postprocess.json", "postprocess.mrc", "postprocess_fsc.png",
                                             "postprocess_guinier.png", "postprocess_masked.mrc"]
    assert (tmp_path / "fsc.png").read_bytes() == b"refine's"
    assert json.loads((tmp_path / "postprocess.json").read_text())["resolution_0143"] == r.resolution_0143


def test_unmasked_fsc_is_used_when_it_reaches_further_as_relion():
    sig, a, b = _signal_and_noise(shell=16)
    corner = np.roll(jc.soft_sphere_mask(N, 5.0, 3.0), (N // 2, N // 2, N // 2), axis=(0, 1, 2))  # solvent only
    with pytest.warns(UserWarning, match="unmasked FSC is used"):
        r = jc.postprocess(a, b, pixel_size=PX, mask=corner, bfactor=0.0)
    assert r.unmasked_fallback and r.to_dict()["unmasked_fallback"] is True
    np.testing.assert_array_equal(r.fsc_corrected, r.fsc_unmasked)
    with pytest.warns(UserWarning, match="extends beyond"):
        forced = jc.postprocess(a, b, pixel_size=PX, mask=corner, bfactor=0.0, force_mask=True)
    assert not forced.unmasked_fallback
    assert first_shell_below(forced.fsc_corrected, 0.143) < first_shell_below(r.fsc_corrected, 0.143)


def test_no_bfactor_fit_for_a_map_worse_than_fit_from():
    sig, a, b = _signal_and_noise(shell=5)  # about 19 Å: no shell with signal from 10 Å on
    with pytest.warns(UserWarning, match="fewer than two shells"):
        r = jc.postprocess(a, b, pixel_size=PX)
    assert r.bfactor == 0.0 and not r.bfactor_fitted and r.fit_from is None


@pytest.mark.parametrize("kwargs, param", [
    ({"bfactor": float("nan")}, "bfactor"), ({"bfactor": float("inf")}, "bfactor"),
    ({"low_pass": float("nan")}, "low_pass"), ({"low_pass": -5.0}, "low_pass"),
    ({"fit_from": float("nan")}, "fit_from"), ({"fit_from": 10.0, "fit_to": 12.0}, "fit_to"),
    ({"randomise_at_fsc": 1.5}, "randomise_at_fsc"), ({"randomise_at_fsc": float("nan")}, "randomise_at_fsc"),
])
def test_postprocess_refuses_non_finite_or_out_of_range_parameters(kwargs, param):
    """Review fix: a NaN or inf B-factor made a NaN map; a NaN low-pass crashed in shell_of (ValueError)."""
    sig, a, b = _signal_and_noise(shell=10)
    with pytest.raises(InputError) as e:
        jc.postprocess(a, b, pixel_size=PX, **kwargs)
    assert e.value.param == param and param in str(e.value)


def test_mask_tolerance_is_the_mask_readers_and_constant_or_identical_halves_are_refused():
    """Review fixes: a mask 5e-4 above 1 passed read_volume (tolerance 1e-3) but postprocess refused it (1e-6),
    printing "found [0, 1]"; half maps of one value, or two identical ones without a mask, gave a confident
    resolution (the box size, or Nyquist)."""
    sig, a, b = _signal_and_noise(shell=10)
    mask = auto_mask(sig, PX)
    r = jc.postprocess(a, b, pixel_size=PX, mask=1.0005 * mask, bfactor=0.0)
    assert r.mask.max() == 1.0
    with pytest.raises(InputError, match=r"mask.*\[0, 1\], found \[0, 1\.01\]"):
        jc.postprocess(a, b, pixel_size=PX, mask=1.01 * mask)
    with pytest.raises(InputError, match="half1: all .* voxels are 0; an empty map"):
        jc.postprocess(np.zeros_like(a), b, pixel_size=PX)
    with pytest.raises(InputError, match="identical"):
        jc.postprocess(a, a.copy(), pixel_size=PX)


def test_fsc_that_never_falls_below_0143_warns_that_the_resolution_is_a_limit():
    rng = np.random.default_rng(5)
    sig = rng.standard_normal((N,) * 3)  # signal at every shell
    a, b = sig + 0.1 * rng.standard_normal(sig.shape), sig + 0.1 * rng.standard_normal(sig.shape)
    with pytest.warns(UserWarning, match="does not fall below 0.143 up to the last shell"):
        r = jc.postprocess(a, b, pixel_size=PX, bfactor=0.0)
    assert r.resolution_0143 == 2 * PX


def test_postprocess_cli_bad_parameters_and_identical_halves_exit_2(tmp_path, capsys):
    """Review fixes: ``--bfactor nan`` wrote a NaN map with exit 0, ``--low-pass nan`` ended in a traceback,
    and identical half maps named a flag that does not exist (``--randomise-at-fsc``), not the files."""
    _write_halves(tmp_path)
    h1, h2 = str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc")
    for args, named in ((["--bfactor", "nan"], "--bfactor"), (["--low-pass", "nan"], "--low-pass"),
                        (["--fit-from", "nan"], "--fit-from"), ([h1, "--auto-mask"], "half1.mrc")):
        capsys.readouterr()
        argv = ["postprocess", h1, *(args if args[0] == h1 else [h2, *args]), "--out", str(tmp_path / "bad")]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0] and "Traceback" not in err[0], (args, err)
        assert "--randomise-at-fsc" not in err[0]
    assert not (tmp_path / "bad" / "postprocess.json").exists()
    assert not (tmp_path / "bad" / "postprocess.mrc").exists()


def test_postprocess_cli_auto_mask_failure_leaves_no_mask_and_names_the_files(tmp_path, capsys):
    """Review fix: with --auto-mask, mask.mrc was written before post-processing, so a run refused later left it
    behind; the refusal named --randomise-at-fsc, a flag the command does not have."""
    sig, a, b = _signal_and_noise(shell=10)
    rng = np.random.default_rng(2)
    write_map(tmp_path / "half1.mrc", a, PX)
    write_map(tmp_path / "half2.mrc", a + 1e-3 * rng.standard_normal(a.shape), PX)  # FSC > 0.8 everywhere
    out = tmp_path / "pp"
    capsys.readouterr()
    assert main(["postprocess", str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc"), "--auto-mask",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "half1.mrc" in err[0] and "half2.mrc" in err[0] and "0.8" in err[0], err
    assert "--randomise-at-fsc" not in err[0]
    assert not (out / "mask.mrc").exists() and not (out / "postprocess.json").exists()
