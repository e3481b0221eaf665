"""RELION 3.1 auto-refine tasks of ``benchmarks/robustness.py`` (``relion_local``, ``relion_global``; ``relion_sgd``:
SGD initial model, then auto-refine) and of ``benchmarks/refine.py``, through ``benchmarks/_relion.py``: the
command lines, the evaluation of a RELION output folder (a stopped run at its last iteration, a continued and
converged one at its final map; a mirrored, rotated SGD map), and the skip without RELION. Fast: RELION itself is never run (its runs are replaced by writing the files it would write)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _relion  # noqa: E402
import refine  # noqa: E402
import robustness  # noqa: E402
from jaxcryo.cli.refine import pose_errors  # noqa: E402
from jaxcryo.data import perturbed_metadata, read_particles  # noqa: E402
from jaxcryo.forward import ParticleMetadata  # noqa: E402
from jaxcryo.io import read_map, write_map, write_star  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no defocus columns")  # the fake particles have no CTF

MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi"]
EXES = ("/usr/bin/mpirun", "/usr/bin/relion_refine_mpi")
PX, BOX, N = 3.0, 16, 40


def _both(box: int, px: float, star: str, name: str) -> list:
    """The flags both runs share (refine.py's, as they were before they moved into _relion.py)."""
    return MPI + ["--o", f"{name}/run", "--auto_refine", "--split_random_halves", "--i", star,
                  "--ref", "reference_30A.mrc", "--ini_high", "30", "--particle_diameter", str(0.8 * box * px),
                  "--ctf", "--flatten_solvent", "--zero_mask", "--j", "1", "--pad", "2",
                  "--low_resol_join_halves", "40", "--oversampling", "1"]


def test_command_flags():
    loc = [str(x) for x in _relion.relion_command(MPI, "relion_local", 64, 3.0)]
    glo = [str(x) for x in _relion.relion_command(MPI, "relion_global", 64, 3.0)]
    assert loc == _both(64, 3.0, "particles_perturbed.star", "relion_local") + [
        "--offset_range", "3", "--offset_step", "1", "--healpix_order", "4", "--auto_local_healpix_order", "4",
        "--sigma_ang", "3"]
    assert glo == _both(64, 3.0, "particles_noposes.star", "relion_global") + [
        "--offset_range", "6", "--healpix_order", "2", "--offset_step", "2"]
    assert "--particle_diameter" in loc and loc[loc.index("--particle_diameter") + 1] == "153.60000000000002"
    assert "--firstiter_cc" not in loc + glo  # refine.py's runs do not ask for it
    cont = [str(x) for x in _relion.continue_command(MPI, "relion_local", Path("/x/relion_local/run_it007_optimiser.star"),
                                                     7)]
    assert cont == MPI + ["--continue", "relion_local/run_it007_optimiser.star", "--o", "relion_local/run_ct7",
                          "--j", "1"]
    assert robustness.TASKS[-3:-1] == ("relion_local", "relion_global") == refine.RELION_RUNS
    assert robustness.TASKS[-1] == "relion_sgd"  # robustness.py only


# --------------------------------------------------------------------------------------------------
# A fake set and the files RELION would write
# --------------------------------------------------------------------------------------------------
def _truth() -> np.ndarray:
    return robustness.lowpassed(np.random.default_rng(0).standard_normal((BOX,) * 3).astype(np.float32), 12.0, PX)


def _true_md() -> ParticleMetadata:
    from scipy.spatial.transform import Rotation

    return ParticleMetadata(rotations=Rotation.random(N, random_state=1).as_matrix(), shifts=np.zeros((N, 2)),
                            ctf=None, image_files=np.array(["particles.mrcs"] * N), image_indices=np.arange(N),
                            pixel_size=PX, box=BOX)


def _halves(truth, seed):
    rng = np.random.default_rng(seed)
    return [truth + 0.5 * rng.standard_normal(truth.shape).astype(np.float32) for _ in range(2)]


def _write_iteration(o: Path, stem: str, it: int, md, truth, resolution: float) -> None:
    h1, h2 = _halves(truth, it)
    (o / f"{stem}_it{it:03d}_optimiser.star").write_text("data_optimiser_general\n")
    write_map(o / f"{stem}_it{it:03d}_half1_class001.mrc", h1, PX)
    write_map(o / f"{stem}_it{it:03d}_half2_class001.mrc", h2, PX)
    write_star(o / f"{stem}_it{it:03d}_data.star", md)
    (o / f"{stem}_it{it:03d}_half1_model.star").write_text(
        f"data_model_general\n\n_rlnCurrentResolution   {resolution}\n")


def _write_final(o: Path, stem: str, md, truth) -> None:
    write_map(o / f"{stem}_class001.mrc", truth + 0.1, PX)
    write_star(o / f"{stem}_data.star", md)
    (o / f"{stem}_model.star").write_text("data_model_general\n\n_rlnCurrentResolution   8.25\n")


def test_evaluate_stopped_and_converged(tmp_path):
    """The last finished iteration of a stopped run (its data STAR and the mean of its half maps), then the final
    map and data of a converged one: the errors :func:`robustness.pose_map_metrics` gives jaxcryo's rows."""
    truth, md = _truth(), _true_md()
    est = perturbed_metadata(md, 0.0, 1.5, seed=0)  # poses right, shifts 1.5 px off
    o = tmp_path / "relion_local"
    o.mkdir()
    _write_iteration(o, "run", 0, md, truth, 30.0)
    _write_iteration(o, "run", 1, md, truth, 20.0)
    _write_iteration(o, "run", 2, est, truth, 15.0)
    vol, data, info = _relion.relion_result(o, first_iteration=1)
    assert info == {"converged": False, "iterations": 2,
                    "evaluated": "run_it002_data.star and the average of its two half maps"}
    assert data == o / "run_it002_data.star"
    h = [read_map(o / f"run_it002_half{i}_class001.mrc")[0] for i in (1, 2)]
    np.testing.assert_allclose(vol, 0.5 * (h[0] + h[1]))
    m = robustness.pose_map_metrics(vol, read_particles(data), truth, md)
    assert m["median_angular_error_deg"] < 0.01 and m["median_shift_error_px"] == pytest.approx(1.5, abs=1e-4)
    assert m["fsc05_truth_shell"] == refine.fsc05_shell(vol, truth)[0] and not m["mirrored"]
    assert _relion.half_map_resolution(o) == 15.0
    # refine.py's evaluation reads the same files
    ev = refine._relion_evaluate(o, truth, md)
    assert ev["iterations"] == 2 and ev["converged"] is False
    assert ev["median_shift_error_px"] == pytest.approx(1.5, abs=1e-4)
    # iteration 0 only (the input poses): nothing to evaluate for robustness.py
    (o0 := tmp_path / "only0").mkdir()
    _write_iteration(o0, "run", 0, md, truth, 30.0)
    assert _relion.relion_result(o0, first_iteration=1)[0] is None
    # a continued run that converged: its final map and data
    rot = perturbed_metadata(md, 5.0, 0.0, seed=3)
    _write_iteration(o, "run_ct2", 3, rot, truth, 10.0)
    _write_final(o, "run_ct2", rot, truth)
    vol, data, info = _relion.relion_result(o, first_iteration=1)
    assert info == {"converged": True, "iterations": 3, "evaluated": "run_ct2_class001.mrc"}
    m = robustness.pose_map_metrics(vol, read_particles(data), truth, md)
    e = pose_errors(read_particles(o / "run_ct2_data.star"), md)
    assert m["median_angular_error_deg"] == e["median_deg"] and 3.0 < e["median_deg"] < 5.5
    assert _relion.half_map_resolution(o) == 8.25


@pytest.fixture(autouse=True)
def _no_aspire(monkeypatch):
    monkeypatch.setattr(robustness, "find_aspire", lambda explicit: None)  # the sets here are jaxcryo's


def _fake_set(tmp_path: Path) -> tuple[dict, Path, Path, Path]:
    """A set folder that ``robustness.make_set`` reads back (``set.json``) and a results file with its known row."""
    key = {"generator": "jaxcryo", "volume": "phantom", "box": BOX, "pixel_size": PX, "particles": N, "snr": 0.5,
           "seed": 0}
    work, out = tmp_path / "work", tmp_path / "out"
    d = work / robustness.set_name(key)
    d.mkdir(parents=True)
    out.mkdir()
    write_map(d / "truth.mrc", _truth(), PX)
    write_star(d / "particles.star", _true_md())
    (d / "set.json").write_text(json.dumps({"dir": str(d), "star": str(d / "particles.star")}))
    known = {**key, "task": "known", "variant": "default", "fsc05_truth_shell": 7}
    (out / "robustness.json").write_text(json.dumps({"rows": [known], "skipped": []}))
    return key, d, work, out


ARGS = ["--generators", "jaxcryo", "--volumes", "phantom", "--box", str(BOX), "--particles", str(N), "--snr",
        "0.5", "--seeds", "0", "--no-relion"]


@pytest.fixture
def fake_relion(monkeypatch):
    """RELION on the PATH, its runs replaced: each writes iterations (and, the second time, the final files)."""
    calls = []
    monkeypatch.setattr(_relion.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(robustness, "relion_version", lambda exe: "RELION 3.1 (fake)")

    def timed(cmd, log, env=None, timeout=None, cwd=None):
        cmd = [str(x) for x in cmd]
        calls.append({"cmd": cmd, "cwd": cwd, "timeout": timeout, "env": env})
        o = Path(cwd) / cmd[cmd.index("--o") + 1].split("/")[0]
        md, truth = _true_md(), read_map(Path(cwd) / "truth.mrc")[0]
        if "--continue" not in cmd:  # stopped by the time limit after iteration 2
            for it in range(3):
                _write_iteration(o, "run", it, perturbed_metadata(md, 0.0, 1.5, 0), truth, 20.0 - it)
            rc = "timeout"
        else:
            _write_iteration(o, "run_ct2", 3, md, truth, 9.0)
            _write_final(o, "run_ct2", md, truth)
            rc = 0
        Path(log).write_text("fake\n")
        return {"command": " ".join(cmd), "returncode": rc, "wall_seconds": 10.0, "cpu_seconds": 25.0, "log": str(log)}

    monkeypatch.setattr(_relion, "timed", timed)
    return calls


def test_robustness_relion_task(tmp_path, fake_relion):
    """``--tasks relion_local``: the command (set's pixel size in the particle diameter, in the set's folder,
    ``--relion-timeout``), a row for the stopped run, then the continued, converged one; the table."""
    key, d, work, out = _fake_set(tmp_path)
    argv = ARGS + ["--tasks", "relion_local", "--work", str(work), "--out", str(out), "--relion-timeout", "100"]
    assert robustness.main(argv) == 0
    (call,) = fake_relion
    cmd = call["cmd"]
    assert cmd[:6] == [*EXES[:1], "--allow-run-as-root", "--oversubscribe", "-np", "3", EXES[1]]
    assert cmd[cmd.index("--i") + 1] == "particles_perturbed.star" and "--sigma_ang" in cmd
    assert cmd[cmd.index("--particle_diameter") + 1] == str(0.8 * BOX * PX)
    assert Path(call["cwd"]) == d and 90 < call["timeout"] <= 100
    assert call["env"]["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    res = json.loads((out / "robustness.json").read_text())
    row = next(r for r in res["rows"] if r["task"] == "relion_local")
    assert row["returncode"] == "timeout" and row["converged"] is False and row["iterations"] == 2
    assert row["median_angular_error_deg"] < 0.01 and row["median_shift_error_px"] == pytest.approx(1.5, abs=1e-4)
    assert row["known_pose_shell"] == 7 and row["variant"] == "default" and row["refine_args"] is None
    assert row["wall_seconds"] == 10.0 and row["cpu_seconds"] == 25.0 and row["half_map_resolution"] == 18.0
    assert row["relion_version"] == "RELION 3.1 (fake)" and "fsc05_truth_shell" in row
    assert (out / "robustness.png").exists()
    # the next run continues the stopped one
    assert robustness.main(argv) == 0
    assert "--continue" in fake_relion[1]["cmd"]
    res = json.loads((out / "robustness.json").read_text())
    row = next(r for r in res["rows"] if r["task"] == "relion_local")
    assert row["returncode"] == 0 and row["converged"] is True and row["iterations"] == 3
    assert row["wall_seconds"] == 20.0 and row["cpu_seconds"] == 50.0 and len(row["segments"]) == 2
    assert row["median_angular_error_deg"] < 0.01 and row["half_map_resolution"] == 8.25
    # a converged folder is evaluated again, not run
    assert robustness.main(argv) == 0 and len(fake_relion) == 2
    # the table: RELION's row right after jaxcryo's of the same task
    loc = dict(row, task="local", returncode=0)
    del loc["converged"]
    lines = robustness.table(res["rows"] + [loc]).splitlines()[2:]
    assert [ln.split(" | ")[5] for ln in lines] == ["known", "local", "relion_local"]
    stopped = robustness.table([dict(row, returncode="timeout", converged=False, iterations=2)])
    assert "| 2 (timeout) |" in stopped


def test_missing_relion_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(_relion.shutil, "which", lambda name: None)
    tasks, skipped = robustness.runnable_tasks(["local", "relion_local", "relion_global", "relion_sgd"])
    assert tasks == ["local"]
    assert [s["task"] for s in skipped] == ["relion_local", "relion_global", "relion_sgd"]
    assert all("relion_refine_mpi" in s["reason"] for s in skipped)
    assert skipped[-1]["reason"] == _relion.MISSING_SGD and "relion_refine," in _relion.MISSING_SGD
    assert robustness.runnable_tasks(["local"]) == (["local"], [])
    assert refine.run_relion(tmp_path, None, None, None)["available"] is False
    # through main: no row, a skipped entry, no error
    key, d, work, out = _fake_set(tmp_path)
    assert robustness.main(ARGS + ["--tasks", "relion_global", "--work", str(work), "--out", str(out)]) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert [r["task"] for r in res["rows"]] == ["known"]
    assert res["skipped"] == [{"task": "relion_global", "reason": _relion.MISSING}]
    # relion_sgd also needs the serial relion_refine (its SGD runs without MPI); the MPI tasks do not
    monkeypatch.setattr(_relion.shutil, "which", lambda name: None if name == "relion_refine" else f"/usr/bin/{name}")
    assert robustness.runnable_tasks(["relion_global", "relion_sgd"]) == (
        ["relion_global"], [{"task": "relion_sgd", "reason": _relion.MISSING_SGD}])
    monkeypatch.setattr(_relion.shutil, "which", lambda name: None)
    assert robustness.main(ARGS + ["--tasks", "relion_sgd", "--work", str(work), "--out", str(out)]) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert [r["task"] for r in res["rows"]] == ["known"]
    assert res["skipped"] == [{"task": "relion_sgd", "reason": _relion.MISSING_SGD}]


def test_timeout_counts_orphaned_ranks(tmp_path):
    """A command stopped by its time limit whose children outlive it unreaped (as MPI ranks do when ``mpirun`` goes
    first): their CPU seconds are still counted (``_common.tree_cpu_seconds``)."""
    import _common

    child = ("import os, signal\nos.setpgid(0, 0)\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
             "signal.alarm(4)\nwhile 1: pass\n")  # its own process group, like a rank; gone after 4 s anyway
    script = tmp_path / "launcher.py"
    script.write_text(
        "import os, signal, subprocess, sys\n"
        f"ps = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]\n"
        "def stop(*a):\n    [p.terminate() for p in ps]\n    os._exit(0)  # without reaping them\n"
        "signal.signal(signal.SIGTERM, stop)\n[p.wait() for p in ps]\n")
    r = _common.run_timed([sys.executable, script], timeout=2.0)
    assert r["returncode"] == "timeout" and r["cpu_s"] > 0.5, r


# --------------------------------------------------------------------------------------------------
# relion_sgd: RELION's SGD initial model, then auto-refine from its map
# --------------------------------------------------------------------------------------------------
def test_sgd_command_flags():
    cmd = [str(x) for x in _relion.sgd_command("relion_refine", 64, 3.0)]
    assert cmd == ["relion_refine", "--sgd", "--denovo_3dref", "--K", "1", "--i", "particles_noposes.star",
                   "--o", "relion_sgd/sgd/run", "--ctf", "--particle_diameter", "153.60000000000002", "--sym", "C1",
                   "--zero_mask", "--flatten_solvent", "--pad", "1", "--j", "1",
                   "--sgd_ini_iter", "50", "--sgd_inbetween_iter", "200", "--sgd_fin_iter", "50",
                   "--sgd_write_iter", "20", "--sgd_ini_resol", "35", "--sgd_fin_resol", "15",
                   "--sgd_ini_subset", "100", "--sgd_fin_subset", "500", "--sgd_sigma2fudge_halflife", "-1",
                   "--oversampling", "1", "--healpix_order", "1", "--offset_range", "6", "--offset_step", "2"]
    short = [str(x) for x in _relion.sgd_command("relion_refine", 64, 3.0, (5, 20, 5), 4)]
    assert short[short.index("--sgd_ini_iter"):short.index("--sgd_ini_resol")] == [
        "--sgd_ini_iter", "5", "--sgd_inbetween_iter", "20", "--sgd_fin_iter", "5", "--sgd_write_iter", "4"]
    # the refinement: relion_global's command (global search, no --firstiter_cc), from the SGD's map
    ref = "relion_sgd/sgd/run_it300_class001.mrc"
    ref_cmd = [str(x) for x in _relion.relion_command(MPI, "relion_sgd", 64, 3.0, ref, "relion_sgd/refine_from_it300")]
    glo = [str(x) for x in _relion.relion_command(MPI, "relion_global", 64, 3.0)]
    assert ref_cmd[ref_cmd.index("--ref") + 1] == ref and ref_cmd[ref_cmd.index("--o") + 1] == (
        "relion_sgd/refine_from_it300/run")
    assert [x for x in ref_cmd if x not in (ref, "relion_sgd/refine_from_it300/run")] == [
        x for x in glo if x not in ("reference_30A.mrc", "relion_global/run")]
    assert "--firstiter_cc" not in ref_cmd and ref_cmd[ref_cmd.index("--i") + 1] == "particles_noposes.star"
    # a stopped SGD goes on without MPI
    cont = [str(x) for x in _relion.continue_command(["relion_refine"], "relion_sgd/sgd",
                                                     Path("/x/run_it040_optimiser.star"), 40)]
    assert cont == ["relion_refine", "--continue", "relion_sgd/sgd/run_it040_optimiser.star",
                    "--o", "relion_sgd/sgd/run_ct40", "--j", "1"]


def _rotation(deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.radians(deg) * np.array([0.6, 0.0, 0.8])).as_matrix()


def _mirrored(truth, md, deg: float = 30.0):
    """A map and poses in another frame and the other hand: poses ``J R J`` with ``R G^T = true`` (``G`` a rotation
    by ``deg``) and the map they see, ``V(x) = truth(x J G)`` (:func:`jaxcryo.poses.align_map_to`'s convention)."""
    import dataclasses

    from jaxcryo.poses._align import rotate_map
    from jaxcryo.rotations._grids import MIRROR

    g = _rotation(deg)
    est = dataclasses.replace(md, rotations=MIRROR @ (md.rotations @ g.T) @ MIRROR)
    return rotate_map(truth, MIRROR @ g), est


def _write_sgd_iteration(o: Path, stem: str, it: int, vol, md) -> None:
    (o / f"{stem}_it{it:03d}_optimiser.star").write_text("data_optimiser_general\n")
    write_map(o / f"{stem}_it{it:03d}_class001.mrc", vol, PX)
    write_star(o / f"{stem}_it{it:03d}_data.star", md)
    (o / f"{stem}_it{it:03d}_model.star").write_text("data_model_general\n")


@pytest.fixture
def fake_sgd(monkeypatch):
    """RELION on the PATH, its runs replaced. The SGD (``--sgd_write_iter`` 20 of 60 iterations) is stopped after
    iteration 20 (before iteration 1 with ``state["sgd_stops_at_0"]``), then continued to 60; each refinement writes
    iteration 0, then a mirrored, rotated map and poses (iteration 1) and its final files, unless
    ``state["refine_stops"]`` (stopped after iteration 0)."""
    calls: list = []
    monkeypatch.setattr(_relion.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(robustness, "relion_version", lambda exe: "RELION 3.1 (fake)")
    state = {"refine_stops": False, "sgd_stops_at_0": False}

    def timed(cmd, log, env=None, timeout=None, cwd=None):
        cmd = [str(x) for x in cmd]
        calls.append({"cmd": cmd, "cwd": cwd, "timeout": timeout})
        o = Path(cwd) / Path(cmd[cmd.index("--o") + 1]).parent
        md, truth = _true_md(), read_map(Path(cwd) / "truth.mrc")[0]
        vol, est = _mirrored(truth, md)
        if cmd[0].endswith("/relion_refine"):  # the SGD, without MPI
            if "--continue" not in cmd:
                _write_sgd_iteration(o, "run", 0, np.zeros_like(vol), _true_md())
                if not state["sgd_stops_at_0"]:
                    _write_sgd_iteration(o, "run", 20, vol, est)
                rc = "timeout"
            else:
                for it in (20, 40, 60):
                    _write_sgd_iteration(o, "run_ct20", it, vol, est)
                rc = 0
        else:  # the auto-refine
            assert "--auto_refine" in cmd
            _write_iteration(o, "run", 0, md, truth, 30.0)
            rc = "timeout"
            if not state["refine_stops"]:
                h1, h2 = (_mirrored(h, md)[0] for h in _halves(truth, 1))
                for k, h in ((1, h1), (2, h2)):
                    write_map(o / f"run_it001_half{k}_class001.mrc", h, PX)
                (o / "run_it001_optimiser.star").write_text("data_optimiser_general\n")
                write_star(o / "run_it001_data.star", est)
                write_map(o / "run_class001.mrc", vol, PX)
                write_star(o / "run_data.star", est)
                (o / "run_model.star").write_text("data_model_general\n\n_rlnCurrentResolution   9.5\n")
                rc = 0
        Path(log).write_text("fake\n")
        return {"command": " ".join(cmd), "returncode": rc, "wall_seconds": 10.0, "cpu_seconds": 25.0,
                "log": str(log)}

    monkeypatch.setattr(_relion, "timed", timed)
    return calls, state


def test_robustness_relion_sgd(tmp_path, fake_sgd):
    """``--tasks relion_sgd``: the SGD's command (no MPI), the refinement's ``--ref`` (the SGD's last map, also of
    a stopped SGD), a mirrored and rotated result evaluated as ab initio's (``mirrored: true``, pose errors after
    the global rotation and hand, the map aligned to the truth), the stages' times summed; the next run continues
    the SGD and refines its new map in a folder of its own."""
    calls, state = fake_sgd
    key, d, work, out = _fake_set(tmp_path)
    argv = ARGS + ["--tasks", "relion_sgd", "--work", str(work), "--out", str(out), "--relion-timeout", "100",
                   "--relion-sgd-iter", "10", "40", "10"]
    assert robustness.main(argv) == 0
    sgd, ref = calls
    assert sgd["cmd"][0] == "/usr/bin/relion_refine" and "mpirun" not in " ".join(sgd["cmd"])
    assert sgd["cmd"][sgd["cmd"].index("--particle_diameter") + 1] == str(0.8 * BOX * PX)
    assert sgd["cmd"][sgd["cmd"].index("--sgd_inbetween_iter") + 1] == "40"
    assert Path(sgd["cwd"]) == d and 90 < sgd["timeout"] <= 100 and 90 < ref["timeout"] <= 100  # each stage
    assert ref["cmd"][:6] == [*EXES[:1], "--allow-run-as-root", "--oversubscribe", "-np", "3", EXES[1]]
    assert ref["cmd"][ref["cmd"].index("--ref") + 1] == "relion_sgd/sgd/run_it020_class001.mrc"
    assert ref["cmd"][ref["cmd"].index("--o") + 1] == "relion_sgd/refine_from_it020/run"
    assert ref["cmd"][ref["cmd"].index("--healpix_order") + 1] == "2"  # global search
    row = next(r for r in json.loads((out / "robustness.json").read_text())["rows"] if r["task"] == "relion_sgd")
    assert row["returncode"] == "timeout" and row["stages"]["sgd"]["returncode"] == "timeout"  # the SGD stopped
    assert row["sgd_iterations"] == 20 and row["sgd_iterations_planned"] == 60 and row["sgd_finished"] is False
    assert row["stages"]["refine"]["returncode"] == 0 and row["converged"] is True and row["iterations"] == 1
    assert row["mirrored"] is True and row["median_angular_error_deg"] < 0.01 and row["mean_angular_error_deg"] < 0.01
    assert row["median_shift_error_px"] is None  # a global rotation was needed: the frames' origins differ
    assert row["fsc05_truth_shell"] >= 5 and row["evaluated"] == "run_class001.mrc" and row["half_map_resolution"] == 9.5
    assert row["wall_seconds"] == 20.0 and row["cpu_seconds"] == 50.0 and row["sgd_cpu_seconds"] == 25.0
    assert row["refine_wall_seconds"] == 10.0 and row["command"].count(" ; ") == 1 and row["refine_args"] is None
    assert "SGD 20 + 1 (timeout)" in robustness.table([row])
    # the next run: the SGD continued (no MPI) to its 60 iterations, its new map refined in a new folder
    assert robustness.main(argv) == 0
    cont, ref2 = calls[2:]
    assert cont["cmd"][:3] == ["/usr/bin/relion_refine", "--continue", "relion_sgd/sgd/run_it020_optimiser.star"]
    assert ref2["cmd"][ref2["cmd"].index("--ref") + 1] == "relion_sgd/sgd/run_ct20_it060_class001.mrc"
    assert ref2["cmd"][ref2["cmd"].index("--o") + 1] == "relion_sgd/refine_from_it060/run"
    row = next(r for r in json.loads((out / "robustness.json").read_text())["rows"] if r["task"] == "relion_sgd")
    assert row["returncode"] == 0 and row["sgd_finished"] is True and row["sgd_iterations"] == 60
    assert row["wall_seconds"] == 30.0 and len(row["stages"]["sgd"]["segments"]) == 2  # two SGD segments, one refine
    # then only evaluated again
    assert robustness.main(argv) == 0 and len(calls) == 4


def test_relion_sgd_evaluated_at_the_sgd_map(tmp_path, fake_sgd):
    """A refinement stopped before its first iteration: the row is the SGD's last map and data STAR, aligned (a
    mirrored map: ``mirrored: true``); an SGD that wrote no iteration: no refinement, no metrics."""
    calls, state = fake_sgd
    state["refine_stops"] = True
    key, d, work, out = _fake_set(tmp_path)
    truth, md = _truth(), _true_md()
    exes = (*EXES, "/usr/bin/relion_refine")
    row = robustness.task_relion_sgd(d, key, truth, md, None, 50.0, exes, (10, 40, 10), 20)
    assert row["returncode"] == "timeout" and row["iterations"] == 0 and row["converged"] is False
    assert row["evaluated"] == "the SGD's run_it020_class001.mrc and run_it020_data.star"
    assert row["mirrored"] is True and row["median_angular_error_deg"] < 0.01 and row["fsc05_truth_shell"] >= 5
    sgd_map = read_map(d / "relion_sgd" / "sgd" / "run_it020_class001.mrc")[0]
    assert refine.fsc05_shell(sgd_map, truth)[0] <= 2  # unaligned, the map matches the truth at the lowest shells only
    assert row["stages"]["refine"]["returncode"] == "timeout" and row["stages"]["sgd"]["iterations"] == 20
    # an SGD stopped before it wrote iteration 1: nothing to refine or evaluate; the next run starts it afresh
    state["sgd_stops_at_0"] = True
    d2 = tmp_path / "second"
    d2.mkdir()
    write_map(d2 / "truth.mrc", truth, PX)
    n = len(calls)
    for _ in range(2):
        row = robustness.task_relion_sgd(d2, key, truth, md, None, 50.0, exes, (10, 40, 10), 20)
    assert len(calls) == n + 2 and all("--continue" not in c["cmd"] and "--sgd" in c["cmd"] for c in calls[n:])
    assert row["returncode"] == "timeout" and row["sgd_iterations"] == 0 and "fsc05_truth_shell" not in row
    assert row["stages"]["refine"] == {"skipped": "the SGD wrote no map (iteration 1 or later)"}
    assert row["wall_seconds"] == 20.0 and row["cpu_seconds"] == 50.0  # both segments of the SGD
