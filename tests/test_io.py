"""Real file formats (issue 2 acceptance 3-6): RELION conventions, cryoDRGN toy set, STAR/.cs parsing."""

import dataclasses
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.data import ParticleDataset, read_particles, write_dataset
from jaxcryo.errors import InputError
from jaxcryo.fourier import resample_real
from jaxcryo.io.cryosparc import read_cs
from jaxcryo.io.mrc import open_stack, read_map, write_map, write_stack
from jaxcryo.io.star import read_star
from jaxcryo.simulate import project_metadata

ALL_META = ["*.star", "*.cs"]


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("name", ["rln_proj_64_centered", "rln_proj_64_shifted"])
def test_project_reproduces_relion(shared_data, tmp_path, name):
    vol = np.load(shared_data / "aspire" / "clean70SRibosome_vol.npy").astype(np.float32)
    v64 = np.asarray(resample_real(jnp.asarray(vol), 64, 3), np.float32)
    write_map(tmp_path / "vol64.mrc", v64, 1.0)
    out = tmp_path / "proj.mrcs"
    star = shared_data / "aspire" / f"{name}.star"
    assert main(["project", str(tmp_path / "vol64.mrc"), str(star), "--out", str(out), "--quiet"]) == 0
    ours = np.asarray(open_stack(out))
    theirs = np.asarray(open_stack(shared_data / "aspire" / f"{name}.mrcs"))
    corrs = [_corr(a, b) for a, b in zip(ours, theirs)]
    assert len(corrs) == 4 and min(corrs) >= 0.99, corrs
    # The .npy map is accepted directly too (Fourier-cropped 65 -> 64 on the fly).
    assert main(["project", str(shared_data / "aspire" / "clean70SRibosome_vol.npy"), str(star), "--out",
                 str(tmp_path / "p2.mrcs"), "--quiet"]) == 0
    assert min(_corr(a, b) for a, b in zip(np.asarray(open_stack(tmp_path / "p2.mrcs")), theirs)) >= 0.99


def test_cryodrgn_toy_set_reproduced(shared_data):
    d = shared_data / "cryodrgn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = read_particles(d / "toy_projections.star", poses=d / "toy_angles.pkl")
        md = dataclasses.replace(md, ctf=None)
        ref = ParticleDataset(md).images(np.arange(len(md)))
    vol, px = read_map(d / "toymodel_small_nocenter.mrc")
    ours = project_metadata(vol, md, method="trilinear", oversample=2)
    corrs = np.array([_corr(a, b) for a, b in zip(ours, ref)])
    assert len(corrs) == 1000
    assert corrs.min() >= 0.98, (corrs.min(), corrs.argmin())


def test_empiar_star_and_cs_same_ctf(shared_data):
    d = shared_data / "cryodrgn"
    s = read_star(d / "empiar_10076_7.star")
    c = read_cs(d / "empiar_10076_7.cs")
    assert len(s) == len(c) == 7
    for f in ("defocus_u", "defocus_v", "astig_angle", "voltage", "cs", "amp_contrast", "phase_shift"):
        a, b = np.asarray(getattr(s.ctf, f), np.float64), np.asarray(getattr(c.ctf, f), np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2, err_msg=f)
    assert abs(s.pixel_size - c.pixel_size) < 1e-3
    assert np.all(c.contrast_sign == -1)  # blob/sign = -1: opposite contrast, honoured when images are read
    assert s.rotations is None and c.rotations is None and c.extra["missing"] == "alignments3D"


def _all_metadata_files(root: Path):
    return sorted(p for pat in ALL_META for p in root.glob(f"*/{pat}"))


def test_every_shared_file_parses_or_clear_error(shared_data):
    files = _all_metadata_files(shared_data)
    assert len(files) >= 20
    parsed = 0
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                md = read_particles(f)
            except InputError as e:
                assert str(f) in str(e), (f, e)
                continue
        parsed += 1
        assert len(md) > 0 and md.pixel_size > 0 and md.box > 0
        assert md.shifts.shape == (len(md), 2)
        if md.rotations is not None:
            np.testing.assert_allclose(md.rotations @ np.swapaxes(md.rotations, 1, 2),
                                       np.broadcast_to(np.eye(3), md.rotations.shape), atol=1e-6)
    assert parsed >= 12


def test_specific_values(shared_data):
    d = shared_data
    md = read_star(d / "cryodrgn" / "relion31.star")
    assert md.pixel_size == pytest.approx(2.806) and md.box == 256 and len(md) == 5
    assert md.shifts[0] == pytest.approx([0.019324, -0.64686])
    md = read_star(d / "aspire" / "rln_proj_64_shifted.star")  # RELION 3.1 optics block with pixel origins
    assert md.shifts[0] == pytest.approx([6.0, 10.0])
    md = read_star(d / "aspire" / "sample_particles_relion30.star")  # 3.0: DetectorPixelSize / Magnification
    assert md.pixel_size == pytest.approx(1.338, rel=1e-3) and md.ctf is not None
    md = read_star(d / "cryodrgn" / "relion31.6opticsgroups.star")
    assert len(np.unique(md.extra["optics_group"])) == 6
    md = read_cs(d / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs")
    assert len(md) == 2019 and md.rotations is not None and md.pixel_size == pytest.approx(2.95)
    assert md.shifts[0] == pytest.approx(np.array([11.334375, -1.828125]) * 2.95, rel=1e-5)


def test_incomplete_ctf_warns(shared_data):
    with pytest.warns(UserWarning, match="CTF"):
        md = read_star(shared_data / "aspire" / "sample_incomplete_ctf_params.star")
    assert md.ctf is None


def test_bad_maps_rejected(shared_data):
    for name in ("cryodrgn/50S-vol.mrc", "cryodrgn/spike-vol.mrc"):
        with pytest.raises(InputError, match="not a cubic volume"):
            read_map(shared_data / name)
    with pytest.raises(InputError, match="axis order"):
        read_map(shared_data / "mrcfile" / "EMD-3001.map")
    with pytest.warns(UserWarning, match="permissively"):
        s = open_stack(shared_data / "cryodrgn" / "toy_projections.mrcs")
    assert s.shape == (1000, 30, 30)


def test_mrc_pixel_size_round_trip(tmp_path):
    vol = np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32)
    write_map(tmp_path / "v.mrc", vol, 1.234)
    back, px = read_map(tmp_path / "v.mrc")
    assert px == pytest.approx(1.234, rel=1e-6)
    np.testing.assert_array_equal(back, vol)
    write_stack(tmp_path / "s.mrcs", vol[:5], 2.5)
    assert np.asarray(open_stack(tmp_path / "s.mrcs")).shape == (5, 16, 16)


def test_simulate_read_back_project_round_trip(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--box", "16", "--n-particles", "40", "--snr", "1",
                 "--seed", "3", "--quiet"]) == 0
    for f in ("particles.star", "particles.mrcs", "ground_truth.mrc"):
        assert (out / f).exists()
    md = read_particles(out / "particles.star")
    assert len(md) == 40 and md.box == 16 and md.pixel_size == pytest.approx(3.0) and md.ctf is not None
    assert np.abs(md.shifts).max() <= 6.0 + 1e-6  # up to 2 px at 3 A/px
    assert main(["project", str(out / "ground_truth.mrc"), str(out / "particles.star"), "--out",
                 str(out / "clean.mrcs"), "--quiet"]) == 0
    # The clean images of the simulation, reproduced from the written metadata.
    from jaxcryo.simulate import simulate

    sim = simulate(40, 16, snr=1.0, seed=3)
    clean = np.asarray(open_stack(out / "clean.mrcs"))
    err = np.linalg.norm(clean - sim.clean) / np.linalg.norm(sim.clean)
    assert err < 1e-4, err
    # write_dataset -> read back keeps poses, shifts and CTF
    np.testing.assert_allclose(md.rotations, sim.metadata.rotations, atol=1e-5)
    np.testing.assert_allclose(md.shifts, sim.metadata.shifts, atol=1e-5)
    np.testing.assert_allclose(md.ctf.defocus_u, sim.metadata.ctf.defocus_u, rtol=1e-6)


def test_dataset_validation_errors(tmp_path):
    from jaxcryo.simulate import simulate

    sim = simulate(10, 16, snr=1.0, seed=0)
    write_dataset(tmp_path, sim.metadata, sim.images)
    ds = ParticleDataset.from_file(tmp_path / "particles.star")
    ds.validate()
    bad = dataclasses.replace(ds.metadata, image_indices=ds.metadata.image_indices + 5)
    with pytest.raises(InputError, match="out of range"):
        ParticleDataset(bad).validate()
    write_stack(tmp_path / "rect.mrcs", np.zeros((10, 16, 12), np.float32), 3.0)
    rect = dataclasses.replace(ds.metadata, image_files=np.array([str(tmp_path / "rect.mrcs")] * 10, dtype=object))
    with pytest.raises(InputError, match="images are 12x16, expected square 16x16"):
        ParticleDataset(rect).validate()
    imgs = sim.images.copy()
    imgs[3, 2, 2] = np.nan
    write_dataset(tmp_path / "nan", sim.metadata, imgs)
    assert np.flatnonzero(ParticleDataset.from_file(tmp_path / "nan" / "particles.star").find_bad_images()).tolist() == [3]
