"""`jaxcryo demo` at a tiny size: outputs and the summary.json schema (issue 5)."""

import json

from jaxcryo.cli import main


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--box", "16", "--n-particles", "200", "--epochs", "2", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for k in ("sgd", "psgd"):
        assert {"resolution_05", "seconds", "epochs"} <= set(s[k])
        assert s[k]["epochs"] == 2 and s[k]["resolution_05"] > 0 and s[k]["seconds"] > 0
        assert 0 <= s[k]["relative_error_to_optimum"] < 1
        assert (out / f"map_{k}.mrc").exists()
        # issue 10: the paper's measure per epoch, in %
        g = s[k]["loss_gap_closed"]
        assert len(g) == 2 and all(0 < x <= 100 for x in g) and g[1] >= g[0] - 1e-6
        assert s[k]["epoch_to_sgd_final_loss"] in (None, 1, 2)
    assert s["sgd"]["epoch_to_sgd_final_loss"] is not None
    assert s["settings"]["interp"] == "trilinear" and s["settings"]["alpha"] == 1e-8
    assert s["settings"]["optimum"]["relative_residual"] < 1e-6
    # the verdict follows the measurement
    ahead = s["psgd"]["loss_gap_closed"][-1] > s["sgd"]["loss_gap_closed"][-1]
    assert ("NOT ahead" in s["verdict"]) == (not ahead)
    for f in ("convergence.png", "fsc.png", "ground_truth.mrc"):
        assert (out / f).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "optimizer" in text and "psgd" in text and "sgd" in text and s["verdict"] in text
