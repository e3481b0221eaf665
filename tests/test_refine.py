"""`jaxcryo refine` (issue 11): local and global refinement on small simulated sets, outputs, resume, bad input."""

import json

import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.rotations._grids import align_rotations
from jaxcryo.io.mrc import read_map, write_map
from jaxcryo.data._sources import read_particles


@pytest.fixture(scope="module")
def simset(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine_sim")
    assert main(["simulate", "--out", str(d), "--box", "32", "--n-particles", "600", "--snr", "4",
                 "--max-shift", "9", "--perturb-angle", "5", "--perturb-shift", "1.5", "--remove-poses",
                 "--seed", "3", "--quiet"]) == 0
    return d


def _errors(out, sim):
    est = read_particles(out / "particles.star")
    true = read_particles(sim / "particles.star")
    return align_rotations(est.rotations, true.rotations, mirror=True), est, true


def test_local_refinement_improves_poses(simset, tmp_path):
    out = tmp_path / "loc"
    assert main(["refine", str(simset / "particles_perturbed.star"), "--reference", str(simset / "ground_truth.mrc"),
                 "--out", str(out), "--local-only", "--iterations", "3", "--batch-size", "100",
                 "--global-iterations", "2",  # no effect with starting poses: every iteration searches locally
                 "--truth", str(simset / "ground_truth.mrc"), "--true-poses", str(simset / "particles.star"),
                 "--quiet"]) == 0
    for f in ("particles.star", "half1.mrc", "half2.mrc", "map.mrc", "fsc.json", "fsc.png", "history.json",
              "convergence.png", "run.json", "checkpoint.npz", "checkpoint.json"):
        assert (out / f).exists(), f
    a, est, true = _errors(out, simset)
    start = align_rotations(read_particles(simset / "particles_perturbed.star").rotations, true.rotations)
    assert start.median_deg == pytest.approx(5.0, abs=0.1)
    assert a.median_deg < 3.0 and not a.mirrored, a.median_deg
    shift_err = np.median(np.linalg.norm(est.shifts - true.shifts, axis=1)) / true.pixel_size
    assert shift_err < 0.8, shift_err
    assert set(np.unique(est.random_subset)) == {1, 2}
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 3 and all(h["global_search"] is False for h in hist)
    for k in ("resolution", "angular_step", "frequency_limit_shell", "mean_pose_change_deg", "seconds"):
        assert k in hist[0], k
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["pose_errors"]["median_deg"] == pytest.approx(a.median_deg, rel=1e-6)
    _, px = read_map(out / "map.mrc")
    assert px == pytest.approx(true.pixel_size, rel=1e-4)


def test_global_refinement_from_no_poses(simset, tmp_path):
    out = tmp_path / "glob"
    assert main(["refine", str(simset / "particles_noposes.star"), "--reference", str(simset / "ground_truth.mrc"),
                 "--out", str(out), "--iterations", "3", "--batch-size", "100", "--global-iterations", "2",
                 "--quiet"]) == 0
    a, _, _ = _errors(out, simset)
    assert a.median_deg < 6.0, a.median_deg
    hist = json.loads((out / "history.json").read_text())
    # two global searches (the second against the first's half maps, at the same sampling), then local ones
    assert [h["global_search"] for h in hist] == [True, True, False]
    assert hist[0]["angular_step"] == hist[1]["angular_step"] == 7.5
    assert hist[1]["mean_pose_change_deg"] is not None


def test_resume_continues(simset, tmp_path):
    out = tmp_path / "res"
    args = ["refine", str(simset / "particles_perturbed.star"), "--reference", str(simset / "ground_truth.mrc"),
            "--out", str(out), "--local-only", "--batch-size", "100", "--quiet"]
    assert main(args + ["--iterations", "1"]) == 0
    assert main(args + ["--iterations", "2", "--resume"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert [h["iteration"] for h in hist] == [1, 2]


def test_bad_input(simset, tmp_path, capsys):
    star = str(simset / "particles_perturbed.star")
    # no reference: argparse's usage error (exit 2)
    with pytest.raises(SystemExit) as e:
        main(["refine", star, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    # a reference of another extent: refused with one line
    vol, px = read_map(simset / "ground_truth.mrc")
    write_map(tmp_path / "wrong.mrc", vol, px * 2)
    assert main(["refine", star, "--reference", str(tmp_path / "wrong.mrc"), "--out", str(tmp_path / "y"),
                 "--quiet"]) == 2
    assert "does not match" in capsys.readouterr().err
    # the same extent at another box: resampled with a warning
    from jaxcryo.ndimage._fourier import resample_real
    write_map(tmp_path / "big.mrc", np.asarray(resample_real(vol, 40, 3), np.float32), px * 32 / 40)
    assert main(["refine", star, "--reference", str(tmp_path / "big.mrc"), "--out", str(tmp_path / "z"),
                 "--local-only", "--iterations", "1", "--batch-size", "100"]) == 0
    assert "resampled" in capsys.readouterr().err
    # NaN poses
    text = (simset / "particles_perturbed.star").read_text().splitlines()
    hdr = [i for i, l in enumerate(text) if l.startswith("_rlnAngleRot")][0]
    col = int(text[hdr].split("#")[1]) - 1
    first = next(i for i in range(hdr, len(text)) if text[i].strip() and not text[i].startswith("_"))
    f = text[first].split()
    f[col] = "nan"
    text[first] = "\t".join(f)
    (tmp_path / "nan.star").write_text("\n".join(text) + "\n")
    assert main(["refine", str(tmp_path / "nan.star"), "--reference", str(simset / "ground_truth.mrc"),
                 "--out", str(tmp_path / "n"), "--local-only", "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err


def _refine_once(simset, out, *flags):
    return main(["refine", str(simset / "particles_perturbed.star"), "--reference", str(simset / "ground_truth.mrc"),
                 "--out", str(out), "--local-only", "--iterations", "1", "--batch-size", "100", "--quiet", *flags])


def test_refine_postprocesses_its_half_maps(simset, tmp_path):
    """Issue 18 item 3: the reported resolution is the corrected masked FSC of jaxcryo.post.postprocess (soft
    spherical mask by default, --mask when given), and the postprocessed maps lie beside the half maps."""
    from jaxcryo.ndimage import spherical_mask
    from jaxcryo.post import postprocess

    vol, px = read_map(simset / "ground_truth.mrc")
    n = vol.shape[0]
    for name, flags in (("default", ()), ("masked", ("--mask", str(tmp_path / "mask.mrc")))):
        mask = spherical_mask(n, 0.9 * n * px, px) if name == "default" else spherical_mask(n, 0.6 * n * px, px, 3)
        if flags:
            write_map(tmp_path / "mask.mrc", mask, px)
        out = tmp_path / name
        assert _refine_once(simset, out, *flags) == 0
        for f in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.json", "fsc.png", "postprocess.mrc",
                  "postprocess_masked.mrc", "postprocess.json", "postprocess_fsc.png", "postprocess_guinier.png",
                  "history.json", "convergence.png", "run.json", "particles.star"):
            assert (out / f).exists(), (name, f)
        run = json.loads((out / "run.json").read_text())
        pp = json.loads((out / "postprocess.json").read_text())
        fsc = json.loads((out / "fsc.json").read_text())
        s = run["summary"]
        # the same postprocess, recomputed from the written half maps with the mask the run used
        again = postprocess(read_map(out / "half1.mrc")[0], read_map(out / "half2.mrc")[0], pixel_size=px,
                            mask=mask, fit_from=10.0, seed=0)
        assert s["resolution_0143"] == pp["resolution_0143"] == pytest.approx(again.resolution_0143, rel=1e-5)
        assert s["resolution_05"] == pp["resolution_05"] == pytest.approx(again.resolution_05, rel=1e-5)
        assert s["resolution_from"].startswith("corrected masked FSC")
        # the unmasked half-map values are kept (and fsc.json is still the unmasked curve)
        assert s["resolution_0143_unmasked"] == fsc["resolution_0143"]
        assert s["resolution_05_unmasked"] == fsc["resolution_05"]
        assert pp["fsc_corrected"] == pytest.approx([float(x) for x in again.fsc_corrected], abs=1e-5)
        pmap, ppx = read_map(out / "postprocess.mrc")
        masked, _ = read_map(out / "postprocess_masked.mrc")
        assert ppx == pytest.approx(px, rel=1e-4)
        np.testing.assert_allclose(masked, pmap * mask, atol=1e-5 * np.abs(pmap).max())
        assert run["postprocess"]["mask"] == (flags[1] if flags else None)
        assert run["postprocess"]["spherical_mask_diameter"] == (None if flags else pytest.approx(0.9 * n * px))


def test_refine_bad_mask_exits_2_naming_the_file(simset, tmp_path, capsys):
    vol, px = read_map(simset / "ground_truth.mrc")
    n = vol.shape[0]
    write_map(tmp_path / "big.mrc", np.full((n,) * 3, 1.5, np.float32), px)       # values outside [0, 1]
    write_map(tmp_path / "box.mrc", np.ones((n // 2,) * 3, np.float32), px)       # another box
    write_map(tmp_path / "apix.mrc", np.ones((n,) * 3, np.float32), 2 * px)      # another pixel size
    for f, words in (("big.mrc", "[0, 1]"), ("box.mrc", "box"), ("apix.mrc", "pixel size")):
        out = tmp_path / f"o_{f}"
        assert _refine_once(simset, out, "--mask", str(tmp_path / f)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f in err and words in err, err
        assert not out.exists()  # refused before any work
    assert main(["refine", str(simset / "particles_perturbed.star"), "--reference", str(simset / "ground_truth.mrc"),
                 "--out", str(tmp_path / "d"), "--particle-diameter", "-5", "--quiet"]) == 2
    assert "--particle-diameter" in capsys.readouterr().err


def test_refine_falls_back_when_postprocess_cannot_run():
    """Identical half maps: the unmasked FSC never falls below 0.8, postprocess raises InputError; the result
    keeps the unmasked half-map resolution and says why."""
    from types import SimpleNamespace

    from jaxcryo.poses import RefineResult, RefineSettings, finish_refinement

    rng = np.random.default_rng(0)
    v = rng.standard_normal((16, 16, 16)).astype(np.float32)
    half = SimpleNamespace(resolution_0143=7.5, resolution_05=9.0)
    told = []
    res = finish_refinement(RefineResult(SimpleNamespace(pixel_size=2.0), None, [],  # type: ignore[arg-type]
                                         SimpleNamespace(half1=v, half2=v, fsc_half=half)),  # type: ignore[arg-type]
                            RefineSettings(particle_diameter=20.0), warn=told.append)
    assert res.postprocess is None and "0.8" in res.postprocess_error and told == [res.postprocess_error]
    assert res.resolution_0143 == 7.5 and res.resolution_05 == 9.0
    assert res.mask_diameter == 20.0 and res.mask.shape == (16, 16, 16)
