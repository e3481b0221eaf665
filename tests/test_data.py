"""ParticleDataset: lazy memory-mapped images, validation, bad images, halves and static-shape batches."""

import dataclasses
import warnings

import numpy as np
import pytest

from jaxcryo.forward._ctf import CTFParams
from jaxcryo.data._batch import epoch_batches
from jaxcryo.data._sources import ParticleDataset, read_particles, require_poses, write_dataset
from jaxcryo.errors import InputError
from jaxcryo.io import read_star, write_stack
from jaxcryo.forward._particles import ParticleMetadata
from jaxcryo.rotations._rotations import euler_to_matrix


def _metadata(n=10, box=16, px=3.0, seed=0) -> ParticleMetadata:
    rng = np.random.default_rng(seed)
    rot = euler_to_matrix(rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n))
    ctf = CTFParams.create(defocus_u=rng.uniform(1e4, 2e4, n), defocus_v=rng.uniform(1e4, 2e4, n),
                           astig_angle=rng.uniform(-90, 90, n), dtype=np.float64)
    return ParticleMetadata(rotations=rot, shifts=rng.uniform(-3, 3, (n, 2)), ctf=ctf,
                            image_files=np.array(["none.mrcs"] * n, dtype=object), image_indices=np.arange(n),
                            pixel_size=px, box=box)


@pytest.fixture
def dataset(tmp_path):
    md = _metadata()
    imgs = np.random.default_rng(1).standard_normal((10, 16, 16)).astype(np.float32)
    star = write_dataset(tmp_path, md, imgs)
    return ParticleDataset.from_file(star), md, imgs


def test_write_dataset_reads_back(dataset, tmp_path):
    ds, md, imgs = dataset
    assert len(ds) == 10 and ds.metadata.box == 16 and ds.metadata.pixel_size == pytest.approx(3.0)
    np.testing.assert_allclose(ds.metadata.rotations, md.rotations, atol=1e-6)
    np.testing.assert_allclose(ds.metadata.shifts, md.shifts, atol=1e-6)
    np.testing.assert_allclose(ds.metadata.ctf.defocus_u, md.ctf.defocus_u, rtol=1e-9)
    ds.validate(check_images=True)
    out = ds.images([7, 2, 2, 9])
    assert out.dtype == np.float32 and out.shape == (4, 16, 16)
    np.testing.assert_array_equal(out, imgs[[7, 2, 2, 9]])
    assert "000001@particles.mrcs" in (tmp_path / "particles.star").read_text()  # relative, 1-based


def test_contrast_sign_applied_and_written(tmp_path, shared_data):
    # cryoSPARC blob/sign = -1: the images are served with inverted contrast.
    c = ParticleDataset.from_file(shared_data / "cryodrgn" / "empiar_10076_7.cs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ParticleDataset.from_file(shared_data / "cryodrgn" / "empiar_10076_7.star")
    c.validate()
    np.testing.assert_array_equal(c.images([0, 6]), -s.images([0, 6]))
    # write_dataset bakes the sign into the written images (RELION has no sign field).
    md = dataclasses.replace(_metadata(4), contrast_sign=np.array([-1.0, 1.0, -1.0, 1.0]))
    imgs = np.ones((4, 16, 16), np.float32)
    ds = ParticleDataset.from_file(write_dataset(tmp_path, md, imgs))
    assert ds.metadata.contrast_sign is None
    np.testing.assert_array_equal(ds.images(np.arange(4))[:, 0, 0], [-1, 1, -1, 1])


def test_validate_errors(dataset, tmp_path):
    ds, _, _ = dataset
    md = ds.metadata
    bad = dataclasses.replace(md, image_indices=md.image_indices + 6)
    with pytest.raises(InputError, match=r"particles.mrcs: image index 16 out of range \(stack has 10 images\)"):
        ParticleDataset(bad).validate()
    with pytest.raises(InputError, match="out of range"):
        ParticleDataset(bad).images([9])
    write_stack(tmp_path / "rect.mrcs", np.zeros((10, 16, 12), np.float32), 3.0)
    rect = dataclasses.replace(md, image_files=np.array([str(tmp_path / "rect.mrcs")] * 10, dtype=object))
    with pytest.raises(InputError, match=r"rect.mrcs: images are 12x16, expected square 16x16"):
        ParticleDataset(rect).validate()
    write_stack(tmp_path / "small.mrcs", np.zeros((10, 8, 8), np.float32), 3.0)
    small = dataclasses.replace(md, image_files=np.array([str(tmp_path / "small.mrcs")] * 10, dtype=object))
    with pytest.raises(InputError, match=r"small.mrcs: images are 8x8, expected 16x16"):
        ParticleDataset(small).validate()
    gone = dataclasses.replace(md, image_files=np.array([str(tmp_path / "gone.mrcs")] * 10, dtype=object))
    with pytest.raises(InputError, match=r"gone.mrcs: image stack not found"):
        ParticleDataset(gone).validate()
    ParticleDataset(gone).validate(check_images=False)  # metadata only
    nan_pose = dataclasses.replace(md, rotations=np.where(np.arange(10)[:, None, None] == 3, np.nan, md.rotations))
    with pytest.raises(InputError, match="poses contain NaN"):
        ParticleDataset(nan_pose).validate(check_images=False)


def test_find_bad_images_streams_in_chunks(tmp_path):
    md = _metadata(10)
    imgs = np.random.default_rng(0).standard_normal((10, 16, 16)).astype(np.float32)
    imgs[3, 2, 2] = np.nan
    imgs[8, 0, 15] = np.inf
    ds = ParticleDataset.from_file(write_dataset(tmp_path, md, imgs))
    for chunk in (1, 3, 1024):
        assert np.flatnonzero(ds.find_bad_images(chunk=chunk)).tolist() == [3, 8]


def test_batches_static_shape_and_mask(dataset):
    ds, _, _ = dataset
    batches = epoch_batches(np.arange(len(ds)), 4)
    assert len(batches) == 3 and all(len(b) == 4 and len(m) == 4 for b, m in batches)
    assert batches[0][0].tolist() == [0, 1, 2, 3] and batches[2][0].tolist() == [8, 9, 8, 9]
    assert batches[2][1].tolist() == [1, 1, 0, 0] and batches[0][1].dtype == np.float32
    assert batches[0][0].dtype == np.int64
    # Shuffled: every index exactly once among the real entries; reproducible per (seed, epoch).
    b1 = epoch_batches(np.arange(len(ds)), 3, np.random.default_rng([5, 0]))
    real = np.concatenate([b[m > 0] for b, m in b1])
    assert sorted(real.tolist()) == list(range(10)) and len(b1) == 4
    again = np.concatenate([b for b, _ in epoch_batches(np.arange(len(ds)), 3, np.random.default_rng([5, 0]))])
    other = np.concatenate([b for b, _ in epoch_batches(np.arange(len(ds)), 3, np.random.default_rng([5, 1]))])
    assert np.array_equal(np.concatenate([b for b, _ in b1]), again) and not np.array_equal(again, other)
    # A subset of indices; a batch larger than the subset is one padded batch.
    (b, m), = epoch_batches([2, 5, 7], 8)
    assert b.tolist() == [2, 5, 7, 2, 5, 7, 2, 5] and m.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert epoch_batches([], 4) == []
    # images() of a padded batch have the static shape
    assert ds.images(b).shape == (8, 16, 16)


def test_split_halves(dataset, shared_data):
    ds, _, _ = dataset
    h1, h2 = ds.split_halves(seed=0)
    assert len(h1) == 5 and len(h2) == 5 and sorted(np.concatenate([h1, h2]).tolist()) == list(range(10))
    assert np.array_equal(ds.split_halves(seed=0)[0], h1) and not np.array_equal(ds.split_halves(seed=1)[0], h1)
    md = read_star(shared_data / "cryodrgn" / "relion5.star")  # rlnRandomSubset is used when present
    a, b = ParticleDataset(md).split_halves(seed=0)
    np.testing.assert_array_equal(a, np.flatnonzero(md.random_subset == 1))
    np.testing.assert_array_equal(b, np.flatnonzero(md.random_subset == 2))
    assert len(a) + len(b) == 17 and a[0] == 0 and b[0] == 1


def test_read_particles_with_poses_and_require_poses(shared_data):
    d = shared_data / "cryodrgn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = read_particles(d / "toy_projections.star")
        with pytest.raises(InputError, match="toy_projections.star: no poses"):
            require_poses(md)
        md = read_particles(d / "toy_projections.star", poses=d / "toy_angles.pkl")
    assert require_poses(md) is md and md.rotations.shape == (1000, 3, 3)
    with pytest.raises(InputError, match=r"empiar_10076_7.cs: has no alignments3D"):
        require_poses(read_particles(d / "empiar_10076_7.cs"))
    with pytest.raises(InputError, match=r"toy_angles.pkl: 1000 poses for 7 particles"):
        read_particles(d / "empiar_10076_7.cs", poses=d / "toy_angles.pkl")
