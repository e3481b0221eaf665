"""Streaming from disk (issue 12): ``jaxcryo reconstruct --prefetch N`` and what the stacks give back.

The prefetch depth only changes *when* batches are read, so the map is the same bit for bit with and without
it; run.json records the depth used. Images read from several stacks, a batch at a time and in any order,
are the images that were written. (The 200k-particle measurement is ``benchmarks/streaming.py``.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.errors import InputError
from jaxcryo.io import mrc as mrc_io
from jaxcryo.io.mrc import StackReader, read_map, write_stack
from jaxcryo.io.star import write_star
from jaxcryo.forward._particles import ParticleMetadata
from jaxcryo.data._simulate import simulate
from jaxcryo.data._sources import ParticleDataset


def _multi_stack_set(folder, n=48, box=16, per_stack=20):
    """A simulated set written as several stacks (the last one shorter) plus one STAR; returns (star, images)."""
    sim = simulate(n_particles=n, box=box, snr=1.0, seed=3)
    folder.mkdir(parents=True, exist_ok=True)
    files = np.empty(n, dtype=object)
    index = np.empty(n, np.int64)
    for k, lo in enumerate(range(0, n, per_stack)):
        hi = min(n, lo + per_stack)
        path = folder / f"stack_{k}.mrcs"
        write_stack(path, sim.images[lo:hi], sim.metadata.pixel_size)
        files[lo:hi] = str(path)
        index[lo:hi] = np.arange(hi - lo)
    md = ParticleMetadata(rotations=sim.metadata.rotations, shifts=sim.metadata.shifts, ctf=sim.metadata.ctf,
                          image_files=files, image_indices=index, pixel_size=sim.metadata.pixel_size, box=box,
                          source="multi")
    write_star(folder / "particles.star", md)
    return folder / "particles.star", sim.images


def test_images_from_several_stacks_read_back_exactly(tmp_path):
    star, images = _multi_stack_set(tmp_path / "data")
    ds = ParticleDataset.from_file(star)
    assert len(set(ds.metadata.image_files)) == 3
    rng = np.random.default_rng(0)
    for _ in range(5):  # random batches across the stacks, unsorted, with repeats
        idx = rng.integers(0, len(ds), 17)
        np.testing.assert_array_equal(ds.images(idx), images[idx])
    np.testing.assert_array_equal(ds.images(np.arange(len(ds))), images)
    bad = ds.find_bad_images(chunk=7)
    assert bad.shape == (len(ds),) and not bad.any()


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.dtype(">f4")])
def test_stack_reader_matches_mrcfile(tmp_path, dtype):
    """Runs of consecutive indices, unsorted and repeated indices, a single index: the images in the file."""
    import mrcfile

    rng = np.random.default_rng(1)
    data = (rng.standard_normal((40, 6, 5)) * 100).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.set_image_stack()
    with mrcfile.open(path) as m:
        ref = np.array(m.data)
    np.testing.assert_array_equal(ref, data)
    r = StackReader(path)
    assert r.shape == (40, 6, 5) and len(r) == 40
    for idx in ([0], [39], [3, 4, 5, 9, 10, 2, 1], [7, 7, 8, 0, 39, 38], rng.integers(0, 40, 64),
                rng.permutation(40), np.arange(40), []):
        got = r[np.asarray(idx, np.int64)]
        assert got.shape == (len(idx), 6, 5) and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref[np.asarray(idx, np.int64)])
    np.testing.assert_array_equal(r[17], ref[17])
    with pytest.raises(IndexError):
        r[[40]]


def test_stack_reader_truncated_file(tmp_path):
    path = tmp_path / "t.mrcs"
    write_stack(path, np.ones((10, 8, 8), np.float32), 1.0)
    r = StackReader(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    np.testing.assert_array_equal(r[[0, 1]], np.ones((2, 8, 8), np.float32))
    with pytest.raises(InputError, match="truncated"):
        r[[8, 9]]


def test_many_stacks_headers_read_once(tmp_path, monkeypatch):
    """A random batch touches many stacks (real sets have one per micrograph): each header is read once,
    not at every batch (the reader cache used to hold 16, so 20 stacks re-read every header every batch)."""
    star, images = _multi_stack_set(tmp_path / "data", n=60, per_stack=3)  # 20 stacks
    calls = []
    layout = mrc_io._stack_layout
    monkeypatch.setattr(mrc_io, "_stack_layout", lambda p: calls.append(p) or layout(p))
    ds = ParticleDataset.from_file(star)
    rng = np.random.default_rng(2)
    for _ in range(4):
        idx = rng.permutation(len(ds))[:30]
        np.testing.assert_array_equal(ds.images(idx), images[idx])
    assert len(calls) == len(set(calls)) == len(set(ds.metadata.image_files))


def test_prefetch_flag_same_map_and_recorded(tmp_path, capsys):
    star, _ = _multi_stack_set(tmp_path / "data")
    maps = {}
    for depth in (0, 2):
        out = tmp_path / f"p{depth}"
        rc = main(["reconstruct", str(star), "--out", str(out), "--optimizer", "psgd", "--epochs", "2",
                   "--batch-size", "8", "--prior", "tikhonov", "--quiet", "--prefetch", str(depth)])
        assert rc == 0, capsys.readouterr().err
        maps[depth] = read_map(out / "map.mrc")[0]
        assert json.loads((out / "run.json").read_text())["args"]["prefetch"] == depth
    np.testing.assert_array_equal(maps[0], maps[2])


def test_prefetch_negative_is_an_input_error(tmp_path, capsys):
    star, _ = _multi_stack_set(tmp_path / "data", n=8, per_stack=8)
    rc = main(["reconstruct", str(star), "--out", str(tmp_path / "o"), "--optimizer", "psgd", "--quiet",
               "--prefetch", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prefetch -1" in err and "Traceback" not in err
    from jaxcryo import reconstruct

    with pytest.raises(InputError) as e:
        reconstruct(ParticleDataset.from_file(star), optimizer="psgd", prefetch=-1, progress=False)
    assert e.value.param == "prefetch"
