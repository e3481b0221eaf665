"""Multi-host data parallelism (issue 12, acceptance 4): two processes on localhost, joined by
:func:`jaxcryo.parallel._distributed.initialize` through a loopback coordinator, each with 2 forced CPU devices (a
4-device mesh across processes; cross-process ``psum`` by JAX's ``gloo`` CPU collectives), give the map of one
process on one device to 1e-5 relative, through the API (:func:`jaxcryo.solvers._fit`) and the command
(``jaxcryo reconstruct --coordinator --num-processes --process-id``); each process reads only its block of
every batch; process 0 alone writes the outputs; the default one-pass ``backproject`` gives the one-process
map too; ``cg`` refuses several processes.

The processes run ``tests/multihost_check.py`` (it sets ``JAX_PLATFORMS=cpu`` and the forced device count
before JAX is imported) next to a one-process reference, under one deadline: a hang (a process that never
joins, a collective that never completes) fails the test with every process's output instead of blocking.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxcryo.parallel import _distributed as distributed
from jaxcryo.errors import InputError

HERE = Path(__file__).resolve().parent
TOL = 1e-5
DEADLINE_S = 115  # all three processes together; the run takes ~30-70 s on the 2-core test machine
LOCAL_DEVICES = 2
BATCH, EPOCHS, SEED, N_PARTICLES = 40, 3, 3, 200  # as in multihost_check.py


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _report(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("MULTIHOST_CHECK ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Processes 0 and 1 of a two-process run and the one-process reference, run at once; their reports,
    outputs (stdout + stderr) and output folder."""
    from jaxcryo.cli import main

    out = tmp_path_factory.mktemp("multihost")
    assert main(["simulate", "--box", "16", "--n-particles", str(N_PARTICLES), "--snr", "1",
                 "--out", str(out / "sim"), "--quiet"]) == 0
    star = str(out / "sim" / "particles.star")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    for k in ("XLA_FLAGS", "JAX_PLATFORMS", *distributed.ENV.values()):
        env.pop(k, None)
    script = str(HERE / "multihost_check.py")
    coord = f"127.0.0.1:{_free_port()}"
    cmds = {f"p{i}": [sys.executable, script, "multi", star, str(out), "--coordinator", coord, "--num-processes",
                      "2", "--process-id", str(i), "--local-devices", str(LOCAL_DEVICES), "--timeout", "60"]
            for i in (0, 1)}
    cmds["single"] = [sys.executable, script, "single", star, str(out), "--local-devices", "1"]
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k, c in cmds.items()}
    deadline = time.monotonic() + DEADLINE_S
    logs, rcs, hung = {}, {}, []
    for k, p in procs.items():
        try:
            logs[k], _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(k)
            for q in procs.values():  # a hang anywhere: stop them all, keep what they printed
                q.kill()
            logs[k], _ = p.communicate()
        rcs[k] = p.returncode
    tails = "\n".join(f"--- {k} (rc {rcs.get(k)}) ---\n{logs.get(k, '')[-3000:]}" for k in procs)
    assert not hung, f"past the {DEADLINE_S} s deadline: {hung}\n{tails}"
    assert rcs == {"p0": 0, "p1": 0, "single": 0}, tails
    return {k: _report(v) for k, v in logs.items()}, logs, out


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_processes_join_one_mesh(runs):
    reps, _, _ = runs
    for i in (0, 1):
        r = reps[f"p{i}"]
        assert r["joined"] and r["process_index"] == i and r["process_count"] == 2, r
        assert r["device_count"] == 2 * LOCAL_DEVICES and r["local_device_count"] == LOCAL_DEVICES
        assert r["collectives"] == "gloo"
        # the mesh: all 4 devices, ordered by process, the same in both processes
        assert [p for p, _ in r["mesh_devices"]] == [0, 0, 1, 1]
        assert r["mesh_devices"] == reps["p0"]["mesh_devices"]
    assert reps["p0"]["share_of_40"] == [0, 20] and reps["p1"]["share_of_40"] == [20, 40]


def test_each_process_reads_its_block_of_every_batch(runs):
    """Process ``i`` read exactly rows ``[20 i, 20 i + 20)`` of each global batch, the batches of the
    one-process run (same seed, same order); together the two read each batch once."""
    from jaxcryo.data._batch import epoch_batches

    reps, _, _ = runs
    rng = np.random.default_rng(SEED)
    expected = {0: [], 1: []}
    for _ in range(EPOCHS):
        for idx, mask in epoch_batches(np.arange(N_PARTICLES), BATCH, rng, multiple=2 * LOCAL_DEVICES):
            for i in (0, 1):
                expected[i].append(sorted(set(idx[i * BATCH // 2:(i + 1) * BATCH // 2].tolist())))
    for i in (0, 1):
        assert reps[f"p{i}"]["reads"] == expected[i]
    for a, b in zip(reps["p0"]["reads"], reps["p1"]["reads"]):
        assert not set(a) & set(b) and len(a) + len(b) == BATCH


def test_two_process_fit_matches_one_process(runs):
    reps, _, out = runs
    p0, p1 = np.load(out / "api_multi_p0.npy"), np.load(out / "api_multi_p1.npy")
    one = np.load(out / "api_single_d1.npy")
    assert np.array_equal(p0, p1)  # replicated: both processes hold the same map
    diff = _rel(p0, one)
    print(f"two processes x {LOCAL_DEVICES} devices vs one process x 1 device: max relative difference {diff:.2e}")
    assert diff < TOL
    np.testing.assert_allclose(reps["p0"]["losses"], reps["single"]["losses"]["1"], rtol=TOL)
    for i in (0, 1):  # fit hands back a plain array on the process's own device
        assert reps[f"p{i}"]["result_fully_addressable"] and "SingleDevice" in reps[f"p{i}"]["result_sharding"]


def test_two_process_cli_matches_one_process(runs):
    from jaxcryo.io.mrc import read_map

    reps, logs, out = runs
    multi, single = out / "cli_multi", out / "cli_single"
    assert reps["p0"]["rc_cli"] == 0 and reps["p1"]["rc_cli"] == 0 and reps["single"]["rc_cli"] == 0
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        a, _ = read_map(multi / name)
        b, _ = read_map(single / name)
        diff = _rel(a, b)
        print(f"jaxcryo reconstruct, {name}: two processes vs one: max relative difference {diff:.2e}")
        assert diff < TOL, (name, diff)
    run = json.loads((multi / "run.json").read_text())
    assert run["devices"] == 2 * LOCAL_DEVICES and run["processes"] == 2
    assert json.loads((single / "run.json").read_text())["processes"] == 1
    np.testing.assert_allclose([h["loss"] for h in json.loads((multi / "history.json").read_text())],
                               [h["loss"] for h in json.loads((single / "history.json").read_text())], rtol=TOL)
    # process 0 wrote the outputs; process 1 only its checkpoint, in its own folder
    assert "jaxcryo reconstruct: 200 particles" in logs["p0"]
    assert "jaxcryo reconstruct: 200 particles" not in logs["p1"]
    assert sorted(f.name for f in (multi / "process1").iterdir()) == ["checkpoint.json", "checkpoint.npz"]


def test_two_process_backproject_matches_one_process_and_cg_refuses(runs):
    """The default one-pass ``backproject`` (and the spectral prior's estimate) on the 4-device mesh across
    the two processes: the one-process map; ``cg`` is not split and refuses several processes."""
    from jaxcryo.io.mrc import read_map

    reps, logs, out = runs
    assert reps["p0"]["rc_backproject"] == 0 and reps["p1"]["rc_backproject"] == 0
    assert reps["single"]["rc_backproject"] == 0
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        a, _ = read_map(out / "bp_multi" / name)
        b, _ = read_map(out / "bp_single" / name)
        diff = _rel(a, b)
        print(f"jaxcryo reconstruct (backproject), {name}: two processes vs one: max relative difference {diff:.2e}")
        assert diff < TOL, (name, diff)
    run = json.loads((out / "bp_multi" / "run.json").read_text())
    assert run["devices"] == 2 * LOCAL_DEVICES and run["processes"] == 2
    for i in (0, 1):
        assert reps[f"p{i}"]["rc_cg"] == 2
        assert "--optimizer cg with 2 processes" in logs[f"p{i}"]


# --------------------------------------------------------------------------------------------------
# in this process (one process; no coordinator is started)
# --------------------------------------------------------------------------------------------------

def test_resolve_settings_flags_and_environment():
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve(num_processes=1, environ={}) is None
    s = distributed.resolve("10.0.0.1:1234", 4, 3, environ={})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.auto) == ("10.0.0.1:1234", 4, 3, False)
    env = {"JAX_COORDINATOR_ADDRESS": "h:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(environ=env) == distributed.Settings("h:99", 2, 1)
    assert distributed.resolve(process_id=0, environ=env).process_id == 0  # a flag overrides its variable
    assert distributed.resolve("auto", environ={}).auto


@pytest.mark.parametrize("kwargs, env, param, text", [
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), {}, "coordinator", "expected HOST:PORT"),
    (dict(coordinator_address="h:0", num_processes=2, process_id=0), {}, "coordinator", "expected HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "process_id", "expected 0 <= id < 2"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), {}, "num_processes", "at least 1"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0), {}, "num_processes", "an integer"),
    (dict(coordinator_address="h:1", num_processes=2), {}, "process_id", "JAX_PROCESS_ID"),
    (dict(num_processes=2, process_id=1), {}, "coordinator", "JAX_COORDINATOR_ADDRESS"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"}, None,
     "JAX_PROCESS_ID='x': expected an integer"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, None,
     "JAX_PROCESS_ID=5"),
])
def test_resolve_rejects_bad_settings(kwargs, env, param, text):
    with pytest.raises(InputError) as e:
        distributed.resolve(environ=env, **kwargs)
    assert e.value.param == param and text in str(e.value), str(e.value)


def test_initialize_after_jax_started_says_so():
    import jax

    jax.devices()  # this process's backend has started
    assert distributed.initialize(environ={}) is False  # nothing to join: fine at any time
    with pytest.raises(InputError, match="before JAX starts its devices"):
        distributed.initialize("127.0.0.1:1", 2, 0, environ={})
    assert not distributed.is_initialized() and distributed.process_count() == 1


def test_process_share_and_argv():
    assert distributed.process_share(12) == slice(0, 12)
    assert distributed.settings_from_argv(["reconstruct", "x.star", "--coordinator", "h:1", "--num-processes=2",
                                           "--process-id", "1", "--", "--process-id", "0"]) == dict(
        coordinator_address="h:1", num_processes="2", process_id="1")


def test_cli_flag_errors(tmp_path, capsys):
    from jaxcryo.cli import main

    base = ["reconstruct", str(tmp_path / "none.star"), "--out", str(tmp_path / "o")]
    assert main(base + ["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "--coordinator 'nohost': expected HOST:PORT" in capsys.readouterr().err
    assert main(base + ["--coordinator", "127.0.0.1:5", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id 2: expected 0 <= id < 2" in capsys.readouterr().err
    assert main(base + ["--num-processes", "2", "--process-id", "1"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator not given (nor JAX_COORDINATOR_ADDRESS)" in err and len(err.strip().splitlines()) == 1
