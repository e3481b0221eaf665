"""Fuzzed readers (issue 20): the STAR, MRC (maps and stacks), cryoSPARC ``.cs`` and cryoDRGN pickle readers
either return valid data or raise :class:`jaxcryo.errors.InputError`, never another exception, for valid
files cut short, with bytes flipped, with random values and types in their columns and fields.

Profiles (``HYPOTHESIS_PROFILE``):

* ``ci`` (default): derandomised (the same examples every run), 25 examples per test, 5 s deadline per example;
  a few seconds in all, run by ``.ci/run`` with the rest of the suite.
* ``long``: random examples, 2,000 per test, no deadline; by hand when a reader changes::

      HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz_readers.py
"""

from __future__ import annotations

import os
import pickle
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jaxcryo.errors import InputError
from jaxcryo.io import read_cs, read_map, read_pose_pickle, read_star, read_volume, stack_shape, write_map
from jaxcryo.io.cryodrgn import read_ctf_pickle
from jaxcryo.io.mrc import StackReader

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=5000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
fuzz = settings(PROFILE)


# ---------------------------------------------------------------- valid files to start from
class _Files(dict):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not the files' bytes
        return f"<valid files in {self['dir']}>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A valid STAR + MRCS pair, a map, a .cs file and a pose pickle; ``work``: a folder for the mutants
    (beside the stack, so a mutated STAR still finds it)."""
    from jaxcryo.data._simulate import simulate
    from jaxcryo.data._sources import write_dataset

    d = tmp_path_factory.mktemp("fuzz")
    s = simulate(n_particles=4, box=8, snr=1.0, seed=0, progress=False)
    star = write_dataset(d, s.metadata, s.images)
    write_map(d / "map.mrc", s.volume, 3.0)
    md = read_star(star)
    n, ctf = len(md), md.ctf
    fields = {
        "blob/path": np.array([b"particles.mrcs"] * n), "blob/idx": np.arange(n, dtype=np.uint32),
        "blob/shape": np.tile(np.array([8, 8], np.uint32), (n, 1)), "blob/psize_A": np.full(n, 3.0, np.float32),
        "blob/sign": np.ones(n, np.float32),
        "ctf/accel_kv": np.asarray(ctf.voltage, np.float32), "ctf/cs_mm": np.asarray(ctf.cs, np.float32),
        "ctf/amp_contrast": np.asarray(ctf.amp_contrast, np.float32),
        "ctf/df1_A": np.asarray(ctf.defocus_u, np.float32), "ctf/df2_A": np.asarray(ctf.defocus_v, np.float32),
        "ctf/df_angle_rad": np.zeros(n, np.float32),
        "alignments3D/pose": np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32),
        "alignments3D/shift": np.zeros((n, 2), np.float32), "alignments3D/split": np.array([0, 1] * (n // 2)),
    }
    rot = np.asarray(md.rotations, np.float64)
    with open(d / "poses.pkl", "wb") as f:
        pickle.dump((rot, np.zeros((n, 2))), f)
    return _Files({"dir": d, "star": star.read_bytes(), "map": (d / "map.mrc").read_bytes(),
            "stack": (d / "particles.mrcs").read_bytes(), "cs_fields": fields,
            "poses": (d / "poses.pkl").read_bytes()})


def _records(fields: dict) -> np.ndarray:
    n = len(next(iter(fields.values())))
    arr = np.zeros(n, [(k, v.dtype, v.shape[1:]) for k, v in fields.items()])
    for k, v in fields.items():
        arr[k] = v
    return arr


def _save_npy(path: Path, arr) -> bytes:
    with open(path, "wb") as f:  # np.save on a path would append .npy
        np.save(f, arr)
    return path.read_bytes()


def _mutate(data: bytes, cut: int | None, flips: list) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


cuts = st.one_of(st.none(), st.integers(0, 5000))
flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)


def _reads_or_input_error(read, path):
    """``read(path)``; an InputError counts as a clean refusal (None), anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(path)
        except InputError as e:
            assert str(e) and "\n" not in str(e).strip()
            return None


# ---------------------------------------------------------------- STAR
def _valid_particles(md) -> None:
    n = len(md)
    assert n > 0 and md.box > 0 and np.isfinite(md.pixel_size) and md.pixel_size > 0
    assert md.image_files.shape == (n,) and md.image_indices.shape == (n,) and (md.image_indices >= 0).all()
    assert np.asarray(md.shifts).shape == (n, 2)
    assert md.rotations is None or np.asarray(md.rotations).shape == (n, 3, 3)


@fuzz
@given(cut=cuts, flips=flips)
def test_star_bytes(base, cut, flips):
    f = base["dir"] / "mutant.star"
    f.write_bytes(_mutate(base["star"], cut, flips))
    md = _reads_or_input_error(read_star, f)
    if md is not None:
        _valid_particles(md)


_token = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "._-@/+", min_size=1, max_size=10),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "NaN", "True", "None", '""', "'x y'", "1_000",
                     "000000@", "@particles.mrcs", "0@particles.mrcs", "-3@particles.mrcs"]),
    st.text(min_size=0, max_size=6),  # anything, whitespace and quotes included (changes the column count)
)


@fuzz
@given(edits=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000), _token), min_size=1, max_size=4))
def test_star_column_values(base, edits):
    """Random values, types and texts in random cells (header names included: a renamed, repeated or
    missing column)."""
    lines = base["star"].decode().splitlines()
    for i, j, tok in edits:
        cells = [(a, b) for a, ln in enumerate(lines) for b in range(len(ln.split()))
                 if ln.strip() and not ln.startswith(("#", "data_", "loop_"))]
        li, tj = cells[(i * 1001 + j) % len(cells)]
        toks = lines[li].split()
        toks[tj] = tok
        lines[li] = "\t".join(toks)
    f = base["dir"] / "mutant_cols.star"
    f.write_text("\n".join(lines) + "\n")
    md = _reads_or_input_error(read_star, f)
    if md is not None:
        _valid_particles(md)


# ---------------------------------------------------------------- MRC maps and stacks
@fuzz
@given(cut=cuts, flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=6),
       data_flips=flips)
def test_mrc_map_bytes(base, cut, flips, data_flips):
    """Header bytes (the first 1024) flipped, data bytes flipped, the file cut short."""
    f = base["dir"] / "mutant.mrc"
    f.write_bytes(_mutate(_mutate(base["map"], None, flips), cut, [(1024 + p, v) for p, v in data_flips]))
    got = _reads_or_input_error(read_map, f)
    if got is not None:
        vol, px = got
        assert vol.ndim == 3 and len(set(vol.shape)) == 1 and vol.dtype == np.float32
        assert px is None or (np.isfinite(px) and px > 0)
    checked = _reads_or_input_error(lambda p: read_volume(p, "reference"), f)
    if checked is not None:
        assert np.isfinite(checked.data).all() and checked.data.shape == (checked.box,) * 3


@fuzz
@given(cut=cuts, flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=6))
def test_mrc_stack_bytes(base, cut, flips):
    f = base["dir"] / "mutant.mrcs"
    f.write_bytes(_mutate(base["stack"], cut, flips))

    def read(p):
        shape = stack_shape(p)
        r = StackReader(p)
        return shape, r[np.arange(len(r))]

    got = _reads_or_input_error(read, f)
    if got is not None:
        shape, imgs = got
        assert len(shape) == 3 and imgs.shape == tuple(shape)


# ---------------------------------------------------------------- cryoSPARC .cs
_dtypes = st.sampled_from(["<f4", "<f8", "<i4", "<u4", "<i8", "|S8", "<U4", "|b1", "<c8"])
_field_shapes = st.sampled_from([(), (2,), (3,), (1,)])


@fuzz
@given(cut=cuts, flips=flips)
def test_cs_bytes(base, cut, flips):
    f = base["dir"] / "mutant_bytes.cs"
    good = _save_npy(f, _records(base["cs_fields"]))
    f.write_bytes(_mutate(good, cut, flips))
    md = _reads_or_input_error(read_cs, f)
    if md is not None:
        _valid_particles(md)


@fuzz
@given(changes=st.lists(st.tuples(st.integers(0, 100), _dtypes, _field_shapes,
                                  st.sampled_from([0.0, -1.0, np.nan, np.inf, 1e30, 7.0])), min_size=1, max_size=3),
       drop=st.lists(st.integers(0, 100), max_size=2))
def test_cs_field_types_and_values(base, changes, drop):
    fields = dict(base["cs_fields"])
    names = list(fields)
    n = len(fields["blob/idx"])
    for k, dt, shape, value in changes:
        name = names[k % len(names)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                v = np.full((n,) + shape, value).astype(dt)
            except (ValueError, OverflowError):
                v = np.zeros((n,) + shape, dt)
        fields[name] = v
    for k in drop:
        fields.pop(names[k % len(names)], None)
    if not fields:
        return
    f = base["dir"] / "mutant_fields.cs"
    _save_npy(f, _records(fields))
    md = _reads_or_input_error(read_cs, f)
    if md is not None:
        _valid_particles(md)


# ---------------------------------------------------------------- cryoDRGN pickles
_arrays = hnp.arrays(dtype=st.sampled_from([np.float64, np.float32, np.int64, np.bool_, np.complex64, "U3"]),
                     shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
_objects = st.recursive(st.one_of(_arrays, st.none(), st.integers(), st.floats(), st.text(max_size=4)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                                st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                        max_leaves=6)


@fuzz
@given(obj=_objects)
def test_pose_pickle_objects(base, obj):
    f = base["dir"] / "mutant_obj.pkl"
    f.write_bytes(pickle.dumps(obj))
    got = _reads_or_input_error(lambda p: read_pose_pickle(p, box=8), f)
    if got is not None:
        rot, trans = got
        assert rot.ndim == 3 and rot.shape[1:] == (3, 3) and np.isfinite(rot).all()
        assert trans is None or trans.shape == (len(rot), 2)
    _reads_or_input_error(read_ctf_pickle, f)


@fuzz
@given(cut=cuts, flips=flips)
def test_pose_pickle_bytes(base, cut, flips):
    f = base["dir"] / "mutant_bytes.pkl"
    f.write_bytes(_mutate(base["poses"], cut, flips))
    got = _reads_or_input_error(lambda p: read_pose_pickle(p, box=8), f)
    if got is not None:
        assert got[0].ndim == 3 and got[0].shape[1:] == (3, 3)


def test_pickle_cannot_run_code(tmp_path):
    """Only numpy arrays and plain data are unpickled: a pickle naming any other callable is refused."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should not run",))

    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match=r"evil.pkl: not a readable pickle .*only numpy arrays are read"):
        read_pose_pickle(f)
