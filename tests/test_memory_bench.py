"""``benchmarks/memory.py --quick``: every step compiles and reports XLA's buffer sizes, which grow with the
batch; the JSON has the documented fields and a PNG is written."""

from __future__ import annotations

from test_benchmarks_quick import check_machine, run_quick


def test_memory_quick(tmp_path):
    d = run_quick("memory", tmp_path)
    check_machine(d["machine"])
    steps = {"psgd", "psgd_exact", "sgd", "backproject", "backproject_x2", "local_search"}
    assert {r["step"] for r in d["rows"]} == steps
    for step in steps:
        rows = sorted((r for r in d["rows"] if r["step"] == step), key=lambda r: r["batch"])
        assert [r["batch"] for r in rows] == [32, 64] and all(r["box"] == 32 for r in rows)
        for r in rows:
            assert r["peak_bytes"] == r["argument_size"] + r["output_size"] - r["alias_size"] + r["temp_size"]
            assert r["peak_bytes"] > 0 and r["resident_other_half"] > 0
            assert r["device_total_bytes"] == r["peak_bytes"] + r["resident_other_half"]
        # the images alone are 32 x 32 x 32 x 4 bytes = 128 KiB more at the larger batch
        assert rows[1]["peak_bytes"] > rows[0]["peak_bytes"] + 32 * 32 * 32 * 4, step
        assert d["largest_batch_within_60pct_of_16GB"][step] == {"32": 64}
    assert d["budget_gb"] == 16 and d["safety_fraction"] == 0.6
