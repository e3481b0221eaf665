"""Impossible inputs are named (file, field, what was expected), and ``--platform`` really picks JAX's platform.

A voltage of 0 kV, an amplitude contrast of 1.5 or a pixel size of 0 would otherwise reach the optimiser and
come back as "loss diverged, lower the learning rate".
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.forward._ctf import CTFParams, validate_ctf, validate_pixel_size
from jaxcryo.errors import InputError
from jaxcryo.io import read_cs, read_star
from jaxcryo.data._sources import read_particles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """A valid small simulated set (RELION 3.1 STAR with an optics block + MRCS)."""
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--box", "16", "--n-particles", "8", "--out", str(out), "--seed", "3"]) == 0
    return out


def _set_column(text: str, block: str, column: str, value: str, row: int = 0) -> str:
    """``text`` (a STAR file) with ``column`` of data row ``row`` of ``data_<block>`` set to ``value``."""
    lines = text.splitlines()
    start = lines.index(f"data_{block}")
    cols, i = [], start + 1
    while i < len(lines) and not (cols and not lines[i].startswith("_")):
        if lines[i].startswith("_"):
            cols.append(lines[i].split()[0].lstrip("_"))
        i += 1
    k = cols.index(column)
    rows = [j for j in range(i, len(lines)) if lines[j].strip() and not lines[j].startswith(("#", "data_"))]
    tokens = lines[rows[row]].split()
    tokens[k] = value
    lines[rows[row]] = "\t".join(tokens)
    return "\n".join(lines) + "\n"


def _bad_star(sim: Path, name: str, block: str, column: str, value: str, row: int = 0) -> Path:
    f = sim / f"{name}.star"  # beside particles.mrcs, so the stack resolves
    f.write_text(_set_column((sim / "particles.star").read_text(), block, column, value, row))
    return f


STAR_CASES = [  # (name, block, column, value, row, expected message fragment)
    ("voltage0", "optics", "rlnVoltage", "0", 0, r"rlnVoltage 0 kV in optics group 1; expected > 0 kV"),
    ("voltage_volts", "optics", "rlnVoltage", "300000", 0, r"rlnVoltage 300000 kV in optics group 1; expected kV"),
    ("q0_15", "optics", "rlnAmplitudeContrast", "1.5", 0,
     r"rlnAmplitudeContrast 1\.5 in optics group 1; expected .*\[0, 1\)"),
    ("q0_neg", "optics", "rlnAmplitudeContrast", "-0.1", 0, r"rlnAmplitudeContrast -0\.1 in optics group 1"),
    ("pixel0", "optics", "rlnImagePixelSize", "0", 0, r"rlnImagePixelSize 0 Å in optics group 1; expected .*> 0"),
    ("pixelneg", "optics", "rlnImagePixelSize", "-3", 0, r"rlnImagePixelSize -3 Å in optics group 1"),
    ("cs_angstrom", "optics", "rlnSphericalAberration", "2.7e7", 0,
     r"rlnSphericalAberration 2\.7e\+07 mm in optics group 1; expected .* mm"),
    ("defocus_nan", "particles", "rlnDefocusU", "nan", 2,
     r"CTF field rlnDefocusU contains NaN or inf \(nan in particle 3\)"),
]


@pytest.mark.parametrize("name,block,column,value,row,expect", STAR_CASES, ids=[c[0] for c in STAR_CASES])
def test_star_impossible_values_named(sim, name, block, column, value, row, expect):
    f = _bad_star(sim, name, block, column, value, row)
    with pytest.raises(InputError) as e:
        read_particles(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: ") and column in msg, msg
    assert re.search(expect, msg), msg


@pytest.mark.parametrize("name,column,value", [("cli_voltage0", "rlnVoltage", "0"),
                                               ("cli_q0_15", "rlnAmplitudeContrast", "1.5"),
                                               ("cli_pixel0", "rlnImagePixelSize", "0")])
def test_cli_names_the_field_not_divergence(sim, tmp_path, capsys, name, column, value):
    f = _bad_star(sim, name, "optics", column, value)
    capsys.readouterr()
    rc = main(["reconstruct", str(f), "--out", str(tmp_path / "out"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and column in err and f.name in err, err
    assert "diverg" not in err.lower() and "learning rate" not in err.lower(), err


def test_valid_star_still_reads(sim):
    md = read_particles(sim / "particles.star")
    assert len(md) == 8 and md.pixel_size == pytest.approx(3.0) and md.ctf is not None
    assert md.optics_group.tolist() == [1] * 8 and not md.mixed_optics and md.missing_poses is None
    assert md.box_per_particle.tolist() == [16] * 8 and md.pixel_size_per_particle.tolist() == [3.0] * 8


def test_relion30_detector_pixel_and_magnification(sim):
    """RELION 3.0 pixel size (rlnDetectorPixelSize * 1e4 / rlnMagnification): a zero names its column."""
    text = (sim / "particles.star").read_text().replace("_rlnImagePixelSize #3", "_rlnDetectorPixelSize #3")
    text = text.replace("_rlnImageSize #4", "_rlnMagnification #4")
    for name, col, val in [("mag0", "rlnMagnification", "0"), ("det0", "rlnDetectorPixelSize", "0")]:
        f = sim / f"{name}.star"
        f.write_text(_set_column(text, "optics", col, val))
        with pytest.raises(InputError, match=rf"^{re.escape(str(f))}: {col} 0( µm)? in optics group 1; "
                                             "expected > 0"):
            read_star(f)


def test_apix_must_be_positive(sim):
    with pytest.raises(InputError, match=r"apix -1: expected a pixel size > 0") as e:
        read_star(sim / "particles.star", apix=-1.0)
    assert e.value.param == "apix"


# ---------------------------------------------------------------- cryoSPARC .cs
def _write_cs(sim: Path, name: str, **override) -> Path:
    md = read_star(sim / "particles.star")
    n, ctf = len(md), md.ctf
    fields = {
        "blob/path": np.array([b"particles.mrcs"] * n), "blob/idx": md.image_indices.astype(np.uint32),
        "blob/shape": np.tile(np.array([16, 16], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, 3.0, np.float32),
        "ctf/accel_kv": np.asarray(ctf.voltage, np.float32), "ctf/cs_mm": np.asarray(ctf.cs, np.float32),
        "ctf/amp_contrast": np.asarray(ctf.amp_contrast, np.float32),
        "ctf/df1_A": np.asarray(ctf.defocus_u, np.float32), "ctf/df2_A": np.asarray(ctf.defocus_v, np.float32),
        "ctf/df_angle_rad": np.deg2rad(np.asarray(ctf.astig_angle)).astype(np.float32),
    }
    for k, v in override.items():
        fields[k.replace("__", "/")] = np.full(n, v, fields[k.replace("__", "/")].dtype)
    dt = [(k, v.dtype, v.shape[1:]) for k, v in fields.items()]
    arr = np.zeros(n, dtype=dt)
    for k, v in fields.items():
        arr[k] = v
    f = sim / f"{name}.cs"
    with open(f, "wb") as fh:  # np.save on a path would append .npy
        np.save(fh, arr)
    return f


def test_cs_reads_and_impossible_values_named(sim):
    md = read_cs(_write_cs(sim, "ok"))
    assert len(md) == 8 and md.missing_poses == "alignments3D" and md.rotations is None
    np.testing.assert_allclose(md.ctf.voltage, 300.0)
    cases = [("kv0", {"ctf__accel_kv": 0.0}, r"ctf/accel_kv 0 kV in particle 1; expected > 0 kV"),
             ("q0", {"ctf__amp_contrast": 1.5}, r"ctf/amp_contrast 1\.5 in particle 1; expected"),
             ("cs", {"ctf__cs_mm": np.inf}, r"CTF field ctf/cs_mm contains NaN or inf"),
             ("px0", {"blob__psize_A": 0.0}, r"blob/psize_A 0 Å in particle 1; expected a pixel size > 0")]
    for name, override, expect in cases:
        f = _write_cs(sim, name, **override)
        with pytest.raises(InputError) as e:
            read_particles(f)
        assert str(e.value).startswith(f"{f}: ") and re.search(expect, str(e.value)), str(e.value)


# ---------------------------------------------------------------- the checks themselves
def test_validate_ctf_ranges():
    ok = CTFParams.create(defocus_u=[-5000.0, 15000.0], voltage=[100.0, 300.0], cs=[-0.01, 0.0],
                          amp_contrast=[0.0, 0.1], dtype=np.float64)
    validate_ctf(ok, "x.star")  # negative Cs (corrector) and overfocus are physical
    for field, value, match in [("voltage", -300.0, "rlnVoltage -300 kV in particle 2"),
                                ("cs", 25.0, "rlnSphericalAberration 25 mm in particle 2"),
                                ("amp_contrast", 1.0, r"rlnAmplitudeContrast 1 in particle 2"),
                                ("scale", np.nan, "CTF field rlnCtfScalefactor contains NaN")]:
        bad = ok._replace(**{field: np.array([getattr(ok, field)[0], value])})
        with pytest.raises(InputError, match=f"^x.star: {match}"):
            validate_ctf(bad, "x.star")
    with pytest.raises(InputError, match=r"^y.cs: CTF field ctf/accel_kv contains NaN or inf \(inf in row 1\)"):
        validate_ctf(ok._replace(voltage=np.array([np.inf, 300.0])), "y.cs",
                     fields={"voltage": "ctf/accel_kv"}, where=lambda f, i: f"row {i + 1}")
    validate_pixel_size([1.0, 0.5], "x.star")
    for v in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(InputError, match="^x.star: rlnImagePixelSize"):
            validate_pixel_size([1.0, v], "x.star")


# ---------------------------------------------------------------- --platform
def _cli(args, env_platforms=None, timeout=300):
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    if env_platforms is not None:
        env["JAX_PLATFORMS"] = env_platforms
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys\nfrom jaxcryo.cli import main\nrc = main(sys.argv[1:])\n"
            "if rc == 0:\n    import jax\n    print('BACKEND', jax.default_backend(), flush=True)\nsys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def _gpu_present() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.fixture
def maps(tmp_path) -> list:
    """Two small maps: ``fsc`` of them is a quick subcommand that starts JAX."""
    from jaxcryo.io import write_map

    rng = np.random.default_rng(0)
    out = []
    for name in ("a.mrc", "b.mrc"):
        write_map(tmp_path / name, rng.standard_normal((8, 8, 8)).astype(np.float32), 2.0)
        out.append(str(tmp_path / name))
    return out


@pytest.mark.parametrize("form", ["--platform cpu", "--platform=cpu"])
def test_platform_cpu_overrides_jax_platforms(maps, form):
    """``--platform cpu`` must win over a JAX_PLATFORMS naming another platform (``cuda``: absent on a CPU
    machine, the default on a GPU one), so it must be applied before JAX starts."""
    r = _cli([*form.split(), "fsc", *maps], env_platforms="cuda")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BACKEND cpu" in r.stdout, r.stdout


def test_platform_cpu_reconstruct_run_json(sim, tmp_path):
    out = tmp_path / "rec"
    r = _cli(["reconstruct", sim / "particles.star", "--out", out, "--epochs", "1", "--batch-size", "4",
              "--quiet", "--platform", "cpu"], env_platforms="cuda")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["device"] and all("cpu" in d.lower() for d in run["device"]), run["device"]
    assert "BACKEND cpu" in r.stdout


@pytest.mark.parametrize("args", [["--platform", "tpu", "simulate"], ["simulate", "--platform=quantum"],
                                  ["reconstruct", "x.star", "--out", "o", "--platform", "tpu"]])
def test_platform_bogus_exits_2_one_line(args):
    r = _cli(args)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "--platform" in err, err


def test_platform_gpu_without_gpu_exits_2_one_line(tmp_path):
    if _gpu_present():
        pytest.skip("a GPU is present")
    r = _cli(["reconstruct", "x.star", "--out", tmp_path, "--platform", "gpu"])
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "--platform gpu" in err, err


def test_platform_in_process(maps, capsys):
    """Called from Python after JAX has started: the running platform is accepted, another one refused."""
    import jax

    active = "cpu" if jax.default_backend() == "cpu" else "gpu"
    other = "gpu" if active == "cpu" else "cpu"
    assert main(["--platform", active, "fsc", *maps]) == 0
    capsys.readouterr()
    assert main(["--platform", other, "fsc", *maps]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--platform {other}" in err, err
