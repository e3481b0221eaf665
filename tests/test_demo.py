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
    for f in ("convergence.png", "fsc.png", "ground_truth.mrc"):
        assert (out / f).stat().st_size > 1000
    text = capsys.readouterr().out
    assert "optimizer" in text and "psgd" in text and "sgd" in text and s["verdict"] in text
