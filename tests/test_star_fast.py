"""The numpy STAR reader (``jaxcryo.io.star._read_blocks_fast``) against the ``starfile`` package it stands in
for: the same tables and the same :class:`ParticleMetadata` (or warnings, or error) for every shared STAR
file, for the files jaxcryo writes, and for odd-but-plain spellings; unusual files go to ``starfile``."""

import dataclasses
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxcryo.forward._ctf import CTFParams
from jaxcryo.errors import InputError
from jaxcryo.io import star
from jaxcryo.io.star import read_star, write_star
from jaxcryo.forward._particles import ParticleMetadata
from jaxcryo.rotations._rotations import euler_to_matrix

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_STARS = sorted(str(p.relative_to(_SHARED)) for p in _SHARED.glob("*/*.star")) if _SHARED.is_dir() \
    else ["(shared data absent)"]

# Real RELION particle files (3.0, 3.1, 5, other packages' exports): these must take the fast path.
_MUST_BE_FAST = [
    "aspire/rln_proj_64_centered.star", "aspire/rln_proj_64_shifted.star", "aspire/rln_proj_65_centered.star",
    "aspire/rln_proj_65_shifted.star", "aspire/sample_particles_relion30.star",
    "aspire/sample_particles_relion31.star", "aspire/sample_relion_one_image.star",
    "aspire/sample_incomplete_ctf_params.star", "cryodrgn/relion31.star", "cryodrgn/relion31.6opticsgroups.star",
    "cryodrgn/relion5.star", "cryodrgn/empiar_10076_7.star", "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star",
    "cryodrgn/toy_projections.star", "cryojax/test_starfile.star", "relion/ref_it002_data.star",
    "simplecryoem/relion_proj_batch.star", "simplecryoem/relion_proj_batch_pfac2.star",
    "starfile/optics_group_inter1965.star",
]


def _starfile_only(monkeypatch):
    monkeypatch.setattr(star, "_read_blocks_fast", lambda path: None)


def _outcome(path, **kw):
    """("ok", metadata, warnings) or ("error", message, warnings) of ``read_star(path)``."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            res = ("ok", read_star(path, **kw))
        except InputError as e:
            res = ("error", str(e))
    # The STAR reader's own warnings (a stack's, e.g. mrcfile's, may come once per process only).
    return res + ([str(w.message) for w in ws if str(w.message).startswith(f"{path}: ")],)


def _assert_same_array(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), what


def _assert_same_metadata(a: ParticleMetadata, b: ParticleMetadata):
    for f in dataclasses.fields(ParticleMetadata):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, CTFParams) or isinstance(vb, CTFParams):
            assert isinstance(va, CTFParams) and isinstance(vb, CTFParams), f.name
            for g in CTFParams._fields:
                _assert_same_array(getattr(va, g), getattr(vb, g), f"ctf.{g}")
        elif isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            _assert_same_array(va, vb, f.name)
        else:
            assert type(va) is type(vb) and va == vb, (f.name, va, vb)


def _assert_same_outcome(path, monkeypatch, **kw):
    fast = _outcome(path, **kw)
    with monkeypatch.context() as m:
        _starfile_only(m)
        slow = _outcome(path, **kw)
    assert fast[0] == slow[0], (fast, slow)
    assert fast[2] == slow[2]  # the same warnings
    if fast[0] == "ok":
        _assert_same_metadata(fast[1], slow[1])
    else:
        assert fast[1] == slow[1]


def _assert_same_blocks(path):
    """The fast reader's blocks hold what starfile's do: names, columns, types (int/float/str), values."""
    import starfile

    fast = star._read_blocks_fast(Path(path))
    assert fast is not None, path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = starfile.read(path, always_dict=True)
    assert list(fast) == list(ref)
    for name, block in ref.items():
        if isinstance(block, dict):
            assert fast[name] == block, name
            continue
        t = fast[name]
        assert t.columns == list(block.columns) and len(t) == len(block), name
        for col in block.columns:
            a, b = t[col].to_numpy(), block[col].to_numpy()
            if b.dtype.kind in "iuf":
                _assert_same_array(a, b, f"{name}/{col}")
            else:
                assert a.dtype.kind == "U" and a.tolist() == block[col].astype(str).tolist(), f"{name}/{col}"


# ---------------------------------------------------------------- every shared STAR file
@pytest.mark.parametrize("rel", _STARS)
def test_shared_star_fast_equals_starfile(shared_data, rel, monkeypatch):
    f = shared_data / rel
    if star._read_blocks_fast(f) is not None:
        _assert_same_blocks(f)
    _assert_same_outcome(f, monkeypatch)  # (identical by construction where the fast reader declined)


def test_main_relion_files_take_fast_path(shared_data):
    slow = [rel for rel in _MUST_BE_FAST if star._read_blocks_fast(shared_data / rel) is None]
    assert not slow, f"left to starfile: {slow}"
    # Quoted strings are starfile's.
    assert star._read_blocks_fast(shared_data / "starfile" / "loop_double_quote.star") is None


# ---------------------------------------------------------------- synthetic files
_HEAD = "data_particles\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n_rlnAngleRot #3\n_rlnAngleTilt #4\n" \
        "_rlnAnglePsi #5\n_rlnImagePixelSize #6\n_rlnImageSize #7\n"
_ROW1 = "000001@a.mrcs mic1.mrc 10.5 20 30 1.5 16\n"
_ROW2 = "000002@a.mrcs mic2.mrc -10 40.25 -30 1.5 16\n"


def _write(tmp_path, name, text):
    f = tmp_path / name
    f.write_bytes(text.encode())
    return f


@pytest.mark.parametrize("name,text", [
    ("double_quote", _HEAD + _ROW1 + '000002@a.mrcs "mic 2.mrc" -10 40.25 -30 1.5 16\n'),
    ("single_quote", _HEAD + _ROW1 + "000002@a.mrcs 'mic2.mrc' -10 40.25 -30 1.5 16\n"),
    ("short_row", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc -10 40.25 -30 1.5\n"),
    ("long_row", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc -10 40.25 -30 1.5 16 7\n"),
    ("comment_in_row", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc -10 40.25 -30 1.5 16 # two\n"),
    ("multiline_value", _HEAD + _ROW1 + ";\nsome text\n;\n"),
    ("save_frame", "save_x\n" + _HEAD + _ROW1),
    ("save_in_loop", _HEAD + _ROW1 + "save_\n"),
    ("two_loops", _HEAD + _ROW1 + "\nloop_\n_rlnFoo #1\n1\n"),
    ("loop_after_pairs", "data_particles\n\n_rlnFoo 1\nloop_\n_rlnImageName #1\n1@a.mrcs\n"),
    ("empty_loop", _HEAD),
    ("comment_only_loop", _HEAD + "# nothing\n"),
    ("nan", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc nan 40.25 -30 1.5 16\n"),
    ("inf", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc -inf 40.25 -30 1.5 16\n"),
    ("underscore_number", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc 1_000 40.25 -30 1.5 16\n"),
    ("boolean_column", _HEAD.replace("_rlnMicrographName #2", "_rlnFlag #2") + _ROW1.replace("mic1.mrc", "True")),
    ("numeric_image_name", _HEAD + _ROW1.replace("000001@a.mrcs", "1")),
    ("huge_integer", _HEAD + _ROW1.replace(" 16", " 123456789012345678901234")),
    ("non_ascii", _HEAD + _ROW1.replace("mic1", "mïc1")),
    ("lone_cr", _HEAD + _ROW1 + "\r" + _ROW2),
    ("duplicate_column", _HEAD.replace("_rlnMicrographName", "_rlnImageName") + _ROW1),
    ("duplicate_block", _HEAD + _ROW1 + "\n" + _HEAD + _ROW2),
    ("empty_block", "data_empty\n\n" + _HEAD + _ROW1),
    ("not_star", "hello\n" + _HEAD + _ROW1),
])
def test_unusual_files_go_to_starfile(tmp_path, monkeypatch, name, text):
    f = _write(tmp_path, f"{name}.star", text)
    assert star._read_blocks_fast(f) is None
    _assert_same_outcome(f, monkeypatch)


def test_quoted_string_still_reads(tmp_path):
    f = _write(tmp_path, "q.star", _HEAD + _ROW1 + '000002@a.mrcs "mic 2.mrc" -10 40.25 -30 1.5 16\n')
    with pytest.warns(UserWarning, match="no defocus columns"):
        md = read_star(f)
    assert len(md) == 2 and md.box == 16 and md.pixel_size == 1.5


@pytest.mark.parametrize("name,text", [
    ("plain", _HEAD + _ROW1 + _ROW2),
    ("crlf_tabs", (_HEAD + _ROW1 + _ROW2).replace(" ", "\t").replace("\n", "\r\n")),
    ("spellings", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc .5 5. +1 1E+00 000016\n"
                  "3@a.mrcs 0003 -.5e-3 -0 1e2 +.15e1 +16\n"),
    ("no_numbers_in_header", re.sub(r" #\d+", "", _HEAD) + _ROW1 + _ROW2),
    ("header_comments", _HEAD.replace("#6", "#6 [pixel size, Å]".replace("Å", "A")) + _ROW1 + _ROW2),
    ("comments_blank_lines", "# version 30001\n\n" + _HEAD + "\n\n# a comment\n" + _ROW1 + "\n  \n" + _ROW2 + "\n"),
    ("no_final_newline", _HEAD + _ROW1 + _ROW2.rstrip("\n")),
    ("pairs_block", "# version 50001\n\ndata_general\n\n_rlnTomoSubTomosAre2DStacks 1\n_rlnName abc\n\n"
                    "# version 50001\n\n" + _HEAD + _ROW1 + _ROW2),
    ("optics_relion31", "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n"
                        "_rlnImageSize\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
                        "1 og1 1.5 16 300 2.7 0.1\n2 og2 2.0 16 200.0 2.7 0.07\n\ndata_particles\nloop_\n"
                        "_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
                        "_rlnOriginX\n_rlnOriginY\n1@a.mrcs 1 10000 11000 5 1 -2\n2@a.mrcs 2 12000.5 12500 -3 0 0\n"
                        "3@a.mrcs 2 9000 9100 0 0.5 0.25\n"),
    ("data_only_block_name", _HEAD.replace("data_particles", "data_") + _ROW1 + _ROW2),
])
def test_plain_files_fast_and_identical(tmp_path, monkeypatch, name, text):
    f = _write(tmp_path, f"{name}.star", text)
    _assert_same_blocks(f)
    _assert_same_outcome(f, monkeypatch)


def test_bad_number_is_input_error(tmp_path, monkeypatch):
    f = _write(tmp_path, "bad.star", _HEAD + _ROW1 + "000002@a.mrcs mic2.mrc -10 abc -30 1.5 16\n")
    assert star._read_blocks_fast(f) is not None  # a string column: the error comes when it is read as numbers
    with pytest.raises(InputError, match=r"bad.star: column rlnAngleTilt: expected numbers"):
        read_star(f)
    _assert_same_outcome(f, monkeypatch)
    g = _write(tmp_path, "badog.star", _HEAD.replace("_rlnImageSize #7", "_rlnImageSize #7\n_rlnOpticsGroup #8")
               + _ROW1.replace("\n", " 1\n") + _ROW2.replace("\n", " x\n"))
    assert star._read_blocks_fast(g) is not None
    _assert_same_outcome(g, monkeypatch)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="nothing.star: no such file"):
        read_star(tmp_path / "nothing.star")


# ---------------------------------------------------------------- what jaxcryo writes
def _metadata(n=9, seed=0, poses=True, ctf=True, **kw):
    rng = np.random.default_rng(seed)
    rot = euler_to_matrix(rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n))
    c = CTFParams.create(defocus_u=rng.uniform(8000, 20000, n), defocus_v=rng.uniform(8000, 20000, n),
                         astig_angle=rng.uniform(-90, 90, n), voltage=300.0, cs=2.7, amp_contrast=0.07,
                         phase_shift=rng.uniform(0, 90, n), bfactor=rng.uniform(0, 50, n),
                         scale=rng.uniform(0.5, 1.5, n), dtype=np.float64)
    md = ParticleMetadata(rotations=rot if poses else None, shifts=rng.uniform(-5, 5, (n, 2)),
                          ctf=c if ctf else None, image_files=np.array(["x.mrcs"] * n, dtype=object),
                          image_indices=np.arange(n), pixel_size=2.0, box=16,
                          random_subset=rng.integers(1, 3, n))
    return dataclasses.replace(md, **kw)


@pytest.mark.parametrize("case", ["one_group", "two_groups", "no_poses_no_ctf", "abs_paths"])
def test_written_star_fast_and_identical(tmp_path, monkeypatch, case):
    n = 9
    kw = {}
    if case == "two_groups":
        kw = dict(pixel_size_per_particle=np.array([2.0] * 4 + [1.5] * 5), box_per_particle=np.full(n, 16))
    if case == "abs_paths":
        kw = dict(image_files=np.array([str(tmp_path.parent / f"s{i % 2}.mrcs") for i in range(n)], dtype=object))
    md = _metadata(n, poses=case != "no_poses_no_ctf", ctf=case != "no_poses_no_ctf", **kw)
    f = tmp_path / "p.star"
    write_star(f, md)
    _assert_same_blocks(f)
    _assert_same_outcome(f, monkeypatch)


def test_fast_path_keeps_pandas_out(tmp_path):
    f = tmp_path / "p.star"
    write_star(f, _metadata())
    code = ("import sys; from jaxcryo.io.star import read_star; md = read_star(sys.argv[1]); "
            "assert len(md) == 9; print(sorted(m for m in ('pandas', 'starfile') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
