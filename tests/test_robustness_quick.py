"""``benchmarks/robustness.py`` (issue 19) in its quick mode, and its ASPIRE side when ASPIRE is installed."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_robustness_quick(tmp_path):
    import robustness

    assert robustness.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "out" / "robustness.json").read_text())
    rows = {r["task"]: r for r in res["rows"]}
    assert set(rows) == {"known", "local"}
    k, loc = rows["known"], rows["local"]
    for r in (k, loc):
        assert r["generator"] == "jaxcryo" and r["volume"] == "phantom" and r["seed"] == 0
        assert r["snr"] == 0.5 and "ASPIRE" in r["snr_definition"]
        # the set was simulated at the jaxcryo SNR that gives ASPIRE's 0.5, and measured to
        assert r["snr_aspire_measured"] == pytest.approx(0.5, rel=0.05)
        assert 0.2 < r["snr_jaxcryo"] < 0.5
    assert k["fsc05_truth_shell"] >= 6 and loc["known_pose_shell"] == k["fsc05_truth_shell"]
    assert loc["median_angular_error_deg"] < 5.0 and loc["iterations"] == 2
    assert isinstance(loc["warnings"], list)  # run.json's warnings (issue 19 item 3)
    assert loc["wall_seconds"] > 0 and loc["cpu_seconds"] > 0
    assert (tmp_path / "out" / "robustness.png").exists()
    table = robustness.table(res["rows"])
    assert "| jaxcryo | phantom | 0.5 |" in table
    # rows are merged by key: a second variant adds rows, it does not replace the first
    merged = robustness.merge_rows(res["rows"], [dict(loc, variant="other")])
    assert len(merged) == 3


ASPIRE_PY = None
try:
    sys.path.insert(0, str(BENCH))
    import robustness as _r

    ASPIRE_PY = _r.find_aspire(None)
except Exception:  # pragma: no cover
    ASPIRE_PY = None


@pytest.mark.skipif(ASPIRE_PY is None, reason="no Python with ASPIRE (benchmark-only peer)")
def test_aspire_set_snr_and_sign(tmp_path):
    """An ASPIRE set: its SNR in both definitions, and its truth in RELION's sign (known-pose map correlates
    positively with it)."""
    import robustness

    key = {"generator": "aspire", "volume": "asym", "box": 32, "particles": 300, "snr": 0.5, "seed": 0}
    s = robustness.make_set(key, tmp_path, ASPIRE_PY)
    assert s["snr_aspire_measured"] == pytest.approx(0.5, rel=1e-3)
    assert 0.6 < s["jaxcryo_over_aspire"] < 0.95
    d = Path(s["dir"])
    r = subprocess.run([sys.executable, "-m", "jaxcryo", "reconstruct", str(d / "particles.star"), "--out",
                        str(d / "known"), "--quiet"], capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from jaxcryo.io.mrc import read_map
    from refine import fsc05_shell

    shell, f = fsc05_shell(read_map(d / "known" / "map.mrc")[0], read_map(d / "truth.mrc")[0])
    assert min(f[1:4]) > 0.5 and shell >= 6, f[:8]


def _preferred_set_checks(s: dict, seed: int, n: int) -> None:
    """Both generators: the STAR holds exactly jaxcryo's preferred poses, and they are preferred (about 0.09 of
    uniform viewing directions lie within 25 degrees of the two views)."""
    import robustness
    from jaxcryo.data._sources import read_particles
    from jaxcryo.rotations import preferred_orientations, random_rotations

    assert s["poses"]["distribution"] == "preferred" and s["poses"]["fraction_within_25deg_of_views"] > 0.25
    rots = np.asarray(read_particles(Path(s["star"])).rotations)
    np.testing.assert_allclose(rots, preferred_orientations(seed, n), atol=1e-4)
    uniform = np.asarray(random_rotations(jax.random.PRNGKey(0), 2000))
    assert 0.06 < robustness.view_fraction(uniform) < 0.13
    assert "_preferred" in Path(s["dir"]).name


def test_preferred_poses_jaxcryo_set(tmp_path):
    import robustness

    key = {"generator": "jaxcryo", "volume": "phantom", "box": 32, "particles": 200, "snr": 0.5, "seed": 3,
           "poses": "preferred"}
    _preferred_set_checks(robustness.make_set(key, tmp_path, None), 3, 200)
    # rows of older runs (no poses, no shift_sigma) keep their keys: uniform, 1.5 px
    old = {"generator": "jaxcryo", "volume": "phantom", "box": 32, "particles": 200, "snr": 0.5, "seed": 3,
           "task": "local", "variant": "default"}
    assert robustness._row_key(old) == robustness._row_key({**old, "poses": "uniform", "shift_sigma": 1.5,
                                                             "pixel_size": 3.0})
    assert robustness._row_key(old) != robustness._row_key({**old, "poses": "preferred"})
    assert robustness.volume_label({**old, "poses": "preferred", "shift_sigma": 3.0}) == "phantom, preferred, σ 3 px"


@pytest.mark.skipif(ASPIRE_PY is None, reason="no Python with ASPIRE (benchmark-only peer)")
def test_preferred_poses_aspire_set(tmp_path):
    import robustness

    key = {"generator": "aspire", "volume": "asym", "box": 32, "particles": 200, "snr": 0.5, "seed": 4,
           "poses": "preferred"}
    _preferred_set_checks(robustness.make_set(key, tmp_path, ASPIRE_PY), 4, 200)


def test_report_summaries_and_fill(tmp_path):
    """``--report``'s summaries: ranges over seeds, a task run on fewer seeds names them; blocks are replaced."""
    import _robustness_report as rep
    import robustness

    base = {"generator": "aspire", "volume": "asym", "box": 64, "particles": 5000, "snr": 0.1, "variant": "default"}
    rows = []
    for seed, (known, err, shell) in enumerate([(15, 3.15, 13), (15, 2.73, 14), (16, 2.54, 16)]):
        rows.append({**base, "seed": seed, "task": "known", "fsc05_truth_shell": known, "snr_jaxcryo": 0.0726})
        rows.append({**base, "seed": seed, "task": "local", "median_angular_error_deg": err,
                     "fsc05_truth_shell": shell, "cpu_seconds": 80.0})
    rows.append({**base, "seed": 1, "task": "abinitio", "median_angular_error_deg": 4.0, "fsc05_truth_shell": 14,
                 "cpu_seconds": 400.0})
    rows.append({**base, "seed": 0, "task": "local", "variant": "other", "median_angular_error_deg": 99.0,
                 "fsc05_truth_shell": 1, "cpu_seconds": 1.0})
    line = rep.readme_summary(rows, robustness.volume_label).splitlines()[2]
    assert line == "| aspire 0.1 | 0, 1, 2 | 15–16 | - | 2.54–3.15°, -2 to 0 | - | 4.00°, -1 (seed 1) |"
    summary = rep.summary_table(rows, robustness.volume_label).splitlines()
    assert len(summary) == 5 and summary[2].startswith("| aspire b64 | 0.1 / 0.0726 | 0 | 15 | - | 3.15°, 13 (80 CPU s)")
    f = tmp_path / "R.md"
    f.write_text("a\n<!-- X -->\nold\n<!-- /X -->\nb\n")
    rep.fill(f, "X", "new")
    assert f.read_text() == "a\n<!-- X -->\nnew\n<!-- /X -->\nb\n"
