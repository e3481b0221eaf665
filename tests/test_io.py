"""Real file formats: RELION STAR 3.0/3.1/5, cryoSPARC .cs, cryoDRGN pickles, MRC; RELION conventions."""

import dataclasses
import pickle
import warnings
from pathlib import Path

import jax.numpy as jnp
import mrcfile
import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.forward._ctf import CTFParams
from jaxcryo.data._sources import ParticleDataset, read_particles, require_poses
from jaxcryo.errors import InputError
from jaxcryo.ndimage._fourier import resample_real
from jaxcryo.io import (apply_poses, open_stack, read_cs, read_ctf_pickle, read_map, read_pose_pickle, read_star,
                        stack_pixel_size, write_map, write_stack, write_star)
from jaxcryo.forward._particles import ParticleMetadata
from jaxcryo.rotations._rotations import axis_angle_to_matrix, cryosparc_pose_to_relion, euler_to_matrix, matrix_to_euler
from jaxcryo.forward._operators import Trilinear
from jaxcryo.data._simulate import project_metadata


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
    if name.endswith("centered"):
        return
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
    ours = project_metadata(vol, md, operator=Trilinear(oversample=2))
    corrs = np.array([_corr(a, b) for a, b in zip(ours, ref)])
    assert len(corrs) == 1000
    assert corrs.min() >= 0.98, (corrs.min(), corrs.argmin())


def _particles(n=6, box=16, px=2.0, seed=0):
    """Small synthetic particle metadata (random poses, shifts, full CTF)."""
    rng = np.random.default_rng(seed)
    rot = euler_to_matrix(rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n))
    ctf = CTFParams.create(defocus_u=rng.uniform(8000, 20000, n), defocus_v=rng.uniform(8000, 20000, n),
                           astig_angle=rng.uniform(-90, 90, n), voltage=300.0, cs=2.7, amp_contrast=0.07,
                           phase_shift=rng.uniform(0, 90, n), bfactor=rng.uniform(0, 50, n),
                           scale=rng.uniform(0.5, 1.5, n), dtype=np.float64)
    return ParticleMetadata(rotations=rot, shifts=rng.uniform(-5, 5, (n, 2)), ctf=ctf,
                            image_files=np.array(["x.mrcs"] * n, dtype=object), image_indices=np.arange(n),
                            pixel_size=px, box=box)


# ---------------------------------------------------------------- (a) the same 7 particles, STAR and .cs
def test_empiar_star_and_cs_same_ctf(shared_data):
    d = shared_data / "cryodrgn"
    s = read_star(d / "empiar_10076_7.star")
    c = read_cs(d / "empiar_10076_7.cs")
    assert len(s) == len(c) == 7
    for f in ("defocus_u", "defocus_v", "astig_angle", "voltage", "cs", "amp_contrast", "phase_shift"):
        a, b = np.asarray(getattr(s.ctf, f), np.float64), np.asarray(getattr(c.ctf, f), np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2, err_msg=f)
    np.testing.assert_allclose(s.ctf.defocus_u[:2], [15301.1, 15303.0], rtol=1e-6)
    np.testing.assert_allclose(c.ctf.astig_angle, 5.28, atol=1e-3)  # 0.092153385 rad
    assert s.ctf.voltage[0] == 300 and s.ctf.cs[0] == pytest.approx(2.7)
    assert s.ctf.amp_contrast[0] == pytest.approx(0.07)
    # 5 um detector pixel / magnification 38168 = blob/psize_A
    assert s.pixel_size == pytest.approx(5e4 / 38168) and c.pixel_size == pytest.approx(s.pixel_size, rel=1e-6)
    assert s.box == c.box == 320
    assert list(s.image_files) == list(c.image_files)
    assert list(s.image_indices) == list(c.image_indices) == list(range(7))
    assert np.all(c.contrast_sign == -1) and s.contrast_sign is None  # blob/sign = -1: opposite contrast
    assert s.rotations is None and c.rotations is None and c.missing_poses == "alignments3D"
    with pytest.raises(InputError, match=r"empiar_10076_7\.cs.*alignments3D"):
        require_poses(c)


# ---------------------------------------------------------------- (b) every metadata file: parses or names itself
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_META = sorted(str(p.relative_to(_SHARED)) for pat in ("*.star", "*.cs") for p in _SHARED.glob(f"*/{pat}")) \
    if _SHARED.is_dir() else ["(shared data absent)"]


@pytest.mark.parametrize("rel", _META)
def test_every_metadata_file_parses_or_names_itself(shared_data, rel):
    f = shared_data / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            md = read_particles(f)
        except InputError as e:  # any other exception type fails the test
            assert str(f) in str(e), e
            return
    n = len(md)
    assert n > 0 and md.pixel_size > 0 and md.box > 0
    assert md.shifts.shape == (n, 2) and md.shifts.dtype == np.float64 and np.all(np.isfinite(md.shifts))
    assert md.image_indices.min() >= 0 and all(Path(p).is_absolute() for p in md.image_files)
    if md.rotations is not None:
        assert md.rotations.shape == (n, 3, 3) and md.rotations.dtype == np.float64
        np.testing.assert_allclose(md.rotations @ np.swapaxes(md.rotations, 1, 2),
                                   np.broadcast_to(np.eye(3), md.rotations.shape), atol=1e-6)
    if md.ctf is not None:
        assert all(np.shape(v) == (n,) for v in md.ctf)


def test_unreadable_files_say_why(shared_data, tmp_path):
    with pytest.raises(InputError, match="empty_loop.star: no particle table"):
        read_star(shared_data / "starfile" / "empty_loop.star")
    with pytest.raises(InputError, match=r"rln3.1_data_style.star: no pixel size.*give apix"):
        read_star(shared_data / "starfile" / "rln3.1_data_style.star")
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
                   "_rlnImagePixelSize\n_rlnImageSize\n1@a.mrcs 10 abc 30 1.0 16\n2@a.mrcs 10 20 30 1.0 16\n")
    with pytest.raises(InputError, match=r"bad.star: column rlnAngleTilt: expected numbers"):
        read_star(bad)
    empty = tmp_path / "empty.star"
    empty.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnImagePixelSize\n")
    with pytest.raises(InputError, match="empty.star: no particle"):
        read_star(empty)
    noname = tmp_path / "noname.star"
    noname.write_text("data_particles\n\nloop_\n_rlnAngleRot\n_rlnImagePixelSize\n1 1.0\n")
    with pytest.raises(InputError, match="noname.star: no particle table with an rlnImageName"):
        read_star(noname)
    with pytest.raises(InputError, match="nothing.star: no such file"):
        read_particles(tmp_path / "nothing.star")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(InputError, match=r"p.txt: unknown particle file type"):
        read_particles(tmp_path / "p.txt")
    (tmp_path / "junk.cs").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="junk.cs: not a cryoSPARC"):
        read_particles(tmp_path / "junk.cs")


# ---------------------------------------------------------------- (c) incomplete CTF
def test_incomplete_ctf_warns(shared_data):
    with pytest.warns(UserWarning, match=r"incomplete CTF parameters, missing rlnVoltage; the CTF is off"):
        md = read_star(shared_data / "aspire" / "sample_incomplete_ctf_params.star")
    assert md.ctf is None and len(md) == 1
    assert md.rotations is not None  # the poses are still read


def test_no_ctf_columns_warn(shared_data):
    with pytest.warns(UserWarning, match=r"no defocus columns.*CTF is off"):
        md = read_star(shared_data / "aspire" / "rln_proj_64_shifted.star")
    assert md.ctf is None


# ---------------------------------------------------------------- (d), (e), (f) MRC
def test_mrc_pixel_size_round_trip(tmp_path):
    vol = np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32)
    write_map(tmp_path / "v.mrc", vol, 1.234)
    back, px = read_map(tmp_path / "v.mrc")
    assert px == pytest.approx(1.234, rel=1e-6) and back.dtype == np.float32
    np.testing.assert_array_equal(back, vol)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert float(m.header.origin.x) == float(m.header.origin.y) == float(m.header.origin.z) == 0.0
    write_map(tmp_path / "v.mrc", 2 * vol, 0.9)  # overwriting is atomic: no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mrc"]
    assert read_map(tmp_path / "v.mrc")[1] == pytest.approx(0.9)
    write_stack(tmp_path / "s.mrcs", vol[:5], 2.5)
    s = open_stack(tmp_path / "s.mrcs")
    assert isinstance(s, np.memmap) and s.shape == (5, 16, 16)
    np.testing.assert_array_equal(s[3], vol[3])
    assert stack_pixel_size(tmp_path / "s.mrcs") == pytest.approx(2.5)
    write_stack(tmp_path / "one.mrcs", vol[:1], 2.5)
    with mrcfile.new(tmp_path / "single.mrc") as m:  # a single 2D image is a stack of one
        m.set_data(vol[0])
    assert open_stack(tmp_path / "single.mrc").shape == (1, 16, 16)


def test_missing_pixel_size_is_none(tmp_path, shared_data):
    write_map(tmp_path / "v.mrc", np.zeros((8, 8, 8), np.float32), None)
    with pytest.warns(UserWarning, match="no pixel size"):
        assert read_map(tmp_path / "v.mrc")[1] is None
    with pytest.warns(UserWarning, match="pointmass.mrc: no pixel size"):
        vol, px = read_map(shared_data / "simplecryoem" / "pointmass.mrc")
    assert px is None and vol.shape == (64, 64, 64)
    assert np.unravel_index(np.argmax(vol), vol.shape) == (32, 32, 49)  # z, y, x as the README says


def test_bad_maps_rejected(shared_data):
    with pytest.raises(InputError, match=r"50S-vol.mrc: map is 32x32x128 .*not a cubic volume"):
        read_map(shared_data / "cryodrgn" / "50S-vol.mrc")
    with pytest.raises(InputError, match=r"spike-vol.mrc: map is 16x16x128 .*not a cubic volume"):
        read_map(shared_data / "cryodrgn" / "spike-vol.mrc")
    with pytest.raises(InputError, match=r"EMD-3001.map: .*anisotropic voxels.*axis order mapc/mapr/maps = 3,1,2"):
        read_map(shared_data / "mrcfile" / "EMD-3001.map")
    vol, px = read_map(shared_data / "mrcfile" / "EMD-3197.map")
    assert vol.shape == (20, 20, 20) and px == pytest.approx(11.4, abs=0.01)
    vol, px = read_map(shared_data / "relion" / "ref_model_betagal_100.mrc")
    assert vol.shape == (100, 100, 100) and px == pytest.approx(3.54, abs=1e-3)


def test_axis_order_transposed(tmp_path):
    v = np.random.default_rng(1).standard_normal((8, 8, 8)).astype(np.float32)  # [z, y, x]
    # Columns along z (mapc=3), rows along x (mapr=1), sections along y (maps=2): stored[s, r, c] = v[c, s, r].
    with mrcfile.new(tmp_path / "perm.mrc") as m:
        m.set_data(np.ascontiguousarray(v.transpose(1, 2, 0)))
        m.header.mapc, m.header.mapr, m.header.maps = 3, 1, 2
        m.voxel_size = 1.5
    with pytest.warns(UserWarning, match="axis order mapc/mapr/maps = 3,1,2; transposed"):
        back, px = read_map(tmp_path / "perm.mrc")
    np.testing.assert_array_equal(back, v)
    assert px == pytest.approx(1.5)


def test_toy_projections_open_permissively(shared_data, monkeypatch):
    import jaxcryo.io.mrc as mrc

    monkeypatch.setattr(mrc, "_WARNED", set())  # the warning is given once per file and process
    with pytest.warns(UserWarning, match="toy_projections.mrcs: .*opened permissively"):
        s = open_stack(shared_data / "cryodrgn" / "toy_projections.mrcs")
    assert s.shape == (1000, 30, 30) and np.all(np.isfinite(s[:10]))
    assert float(np.abs(s[0]).max()) > 0



def test_library_deprecation_warning_keeps_strict_open(tmp_path, monkeypatch):
    """A DeprecationWarning raised inside mrcfile (NumPy 2.5 deprecates what mrcfile 1.5.4 does to every header)
    is not a fault of the file: a valid map still opens strictly, without the permissive-mode warning."""
    import jaxcryo.io.mrc as mrc

    v = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    write_map(tmp_path / "ok.mrc", v, 2.0)
    real_open = mrcfile.open

    def open_warning(*a, **k):
        warnings.warn("Setting the dtype on a NumPy array has been deprecated", DeprecationWarning)
        return real_open(*a, **k)

    monkeypatch.setattr(mrc, "_WARNED", set())
    monkeypatch.setattr(mrc.mrcfile, "open", open_warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        back, px = read_map(tmp_path / "ok.mrc")
    np.testing.assert_array_equal(back, v)
    assert px == pytest.approx(2.0)


# ---------------------------------------------------------------- (g) STAR round trip
def test_write_star_read_star_round_trip(tmp_path):
    md = _particles(n=7)
    (tmp_path / "sub").mkdir()
    md = dataclasses.replace(md, image_files=np.array([str(tmp_path / "sub" / "x.mrcs")] * 7, dtype=object),
                             image_indices=np.arange(7)[::-1].copy(),
                             random_subset=np.array([1, 2] * 3 + [1]))
    write_star(tmp_path / "p.star", md)
    text = (tmp_path / "p.star").read_text()
    assert "data_optics" in text and "data_particles" in text and "000007@sub/x.mrcs" in text
    back = read_star(tmp_path / "p.star", apix=None)
    assert len(back) == 7 and back.pixel_size == pytest.approx(2.0) and back.box == 16
    np.testing.assert_allclose(back.rotations, md.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts, md.shifts, atol=1e-6)
    for f in CTFParams._fields:
        np.testing.assert_allclose(getattr(back.ctf, f), getattr(md.ctf, f), rtol=1e-6, atol=1e-6, err_msg=f)
    assert list(back.image_files) == list(md.image_files) and list(back.image_indices) == list(md.image_indices)
    np.testing.assert_array_equal(back.random_subset, md.random_subset)
    # Two optics groups (different voltage and pixel size) survive the round trip.
    volt = np.array([300.0] * 4 + [200.0] * 3)
    md2 = dataclasses.replace(md, ctf=md.ctf._replace(voltage=volt),
                              pixel_size_per_particle=np.array([2.0] * 4 + [1.5] * 3))
    write_star(tmp_path / "p2.star", md2)
    with pytest.warns(UserWarning, match="different pixel sizes"):
        back2 = read_star(tmp_path / "p2.star")
    np.testing.assert_allclose(back2.ctf.voltage, volt)
    np.testing.assert_allclose(back2.pixel_size_per_particle, md2.pixel_size_per_particle)
    assert back2.mixed_optics and back2.pixel_size == pytest.approx(2.0)


def test_datadir_resolution(tmp_path):
    (tmp_path / "stacks").mkdir()
    write_stack(tmp_path / "stacks" / "a.mrcs", np.zeros((3, 8, 8), np.float32), 1.5)
    star = tmp_path / "meta" / "p.star"
    star.parent.mkdir()
    star.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnOriginX\n_rlnOriginY\n"
                    "2@Extract/job1/a.mrcs 1.0 -2.0\n")
    with pytest.warns(UserWarning, match="CTF is off"):
        md = read_star(star, datadir=tmp_path / "stacks")  # datadir/basename; pixel size and box from the stack
    assert md.image_files[0] == str((tmp_path / "stacks" / "a.mrcs").resolve()) and md.image_indices[0] == 1
    assert md.pixel_size == pytest.approx(1.5) and md.box == 8
    np.testing.assert_allclose(md.shifts, [[1.5, -3.0]])  # pixel origins times the pixel size
    with pytest.warns(UserWarning):
        assert read_star(star, datadir=tmp_path / "stacks", apix=2.0).shifts[0, 0] == pytest.approx(2.0)


# ---------------------------------------------------------------- (i) RELION versions, concrete values
def test_relion_versions(shared_data):
    d = shared_data
    md = read_star(d / "cryodrgn" / "relion31.star")
    assert md.pixel_size == pytest.approx(2.806) and md.box == 256 and len(md) == 5
    np.testing.assert_allclose(md.shifts[:2], [[0.019324, -0.64686], [-0.25248, 0.403454]])
    np.testing.assert_allclose(md.rotations[0], euler_to_matrix(-102.30296, 82.318041, 124.706463), atol=1e-12)
    np.testing.assert_allclose(md.ctf.voltage, 300.0)
    assert Path(md.image_files[0]).name == "relion31.mrcs" and md.image_indices[1] == 1

    md = read_star(d / "cryodrgn" / "relion5.star")
    assert len(md) == 17 and md.pixel_size == pytest.approx(0.89) and md.box == 448
    np.testing.assert_allclose(md.shifts[0], [-3.12578, -1.41031])
    np.testing.assert_allclose(matrix_to_euler(md.rotations[:1]), [[111.508618], [36.742536], [141.158035]], atol=1e-6)
    assert md.ctf.voltage[0] == 100.0 and md.ctf.cs[0] == pytest.approx(1.6)
    assert md.random_subset[:2].tolist() == [1, 2]

    with pytest.warns(UserWarning, match="different pixel sizes"):
        md = read_star(d / "cryodrgn" / "relion31.6opticsgroups.star")
    assert len(md) == 139 and md.mixed_optics and md.box == 196
    assert md.pixel_size == pytest.approx(1.25)  # optics group 1
    og, px = md.optics_group, md.pixel_size_per_particle
    assert np.bincount(og).tolist() == [0, 48, 29, 5, 7, 26, 24]
    assert set(px[og == 2]) == {1.24} and set(px[og == 6]) == {1.25} and og[0] == 6
    assert md.shifts[0, 0] == pytest.approx(13.284554) and md.ctf.voltage[0] == 200.0

    md30 = read_star(d / "aspire" / "sample_particles_relion30.star")  # 3.0: DetectorPixelSize / Magnification
    assert md30.pixel_size == pytest.approx(5e4 / 37369.207031) and md30.box == 200 and len(md30) == 17
    np.testing.assert_allclose(md30.shifts[:2, 0], np.array([0.1996, -0.0504]) * md30.pixel_size)
    np.testing.assert_allclose(md30.ctf.defocus_u[0], 21186.804688)
    md31 = read_star(d / "aspire" / "sample_particles_relion31.star")  # voltage from the optics group
    assert md31.pixel_size == pytest.approx(1.4) and md31.box == 200
    np.testing.assert_allclose(md31.shifts[:2, 0], [0.1996, -0.0504])
    np.testing.assert_allclose(md31.rotations[:14], md30.rotations[:14], atol=1e-12)  # the files differ from row 15
    assert set(md31.ctf.voltage.tolist()) <= {300.0, 200.0} and md31.ctf.voltage[0] == 300.0

    with pytest.warns(UserWarning):
        md = read_star(d / "aspire" / "rln_proj_64_shifted.star")  # RELION 3.1 optics block with pixel origins
    assert md.shifts[0] == pytest.approx([6.0, 10.0])


# ---------------------------------------------------------------- cryoSPARC and cryoDRGN conventions
def test_cryosparc_poses_and_shifts(shared_data):
    f = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(f)
    md = read_cs(f)
    assert len(md) == 2019 and md.pixel_size == pytest.approx(2.95) and md.box == 180
    # RELION A = expm(skew(pose)).T (cryoDRGN parse_pose_csparc); a rotation about z by t: cryoSPARC's Rz(t).
    expm = axis_angle_to_matrix(raw["alignments3D/pose"])
    np.testing.assert_allclose(md.rotations, np.swapaxes(expm, 1, 2), atol=1e-12)
    z = cryosparc_pose_to_relion(np.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(z, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # Shifts in pixels, same sign as RELION's origin (pyem csparc2star, cryoDRGN parse_pose_csparc).
    assert md.shifts[0] == pytest.approx(np.array([11.334375, -1.828125]) * 2.95, rel=1e-5)
    np.testing.assert_array_equal(md.random_subset, raw["alignments3D/split"] + 1)
    assert np.all(md.contrast_sign == -1)
    assert md.ctf.voltage[0] == 200.0 and md.ctf.defocus_u[0] == pytest.approx(45591.37)
    assert md.ctf.astig_angle[0] == pytest.approx(np.rad2deg(-1.3636448), rel=1e-6)
    md2 = read_cs(shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs")  # 2D only, '>' path prefix
    assert md2.rotations is None and md2.missing_poses == "alignments3D" and md2.box == 300
    assert not Path(md2.image_files[0]).name.startswith(">")


def test_cryodrgn_pickles(shared_data, tmp_path):
    d = shared_data / "cryodrgn"
    rot, trans = read_pose_pickle(d / "toy_angles.pkl")
    assert rot.shape == (1000, 3, 3) and trans is None
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    rot2, trans2 = read_pose_pickle(d / "toy_rot_trans.pkl", box=30)
    np.testing.assert_allclose(rot2, rot, atol=1e-6)
    assert trans2.shape == (1000, 2) and np.abs(trans2).max() < 0.5
    # The CTF pickle describes the same toy set as toy_projections.star.
    ctf = read_ctf_pickle(d / "test_ctf.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = read_star(d / "toy_projections.star")
    for f in ("defocus_u", "defocus_v", "astig_angle", "voltage", "cs", "amp_contrast", "phase_shift"):
        np.testing.assert_allclose(getattr(ctf, f), getattr(md.ctf, f), rtol=1e-6, err_msg=f)
    assert ctf.phase_shift[0] == 90.0 and ctf.cs[0] == pytest.approx(0.001)
    # Translations (box fractions, RELION's sign) -> origins in Å.
    md = dataclasses.replace(md, pixel_size=2.0)
    md2 = apply_poses(md, d / "toy_rot_trans.pkl")
    np.testing.assert_allclose(md2.rotations, rot2)
    np.testing.assert_allclose(md2.shifts, trans2 * 30 * 2.0)
    md3 = apply_poses(md, d / "toy_angles.pkl")  # rotations only: shifts kept
    np.testing.assert_array_equal(md3.shifts, md.shifts)
    with open(tmp_path / "short.pkl", "wb") as fh:
        pickle.dump(rot[:10], fh)
    with pytest.raises(InputError, match=r"short.pkl: 10 poses for 1000 particles"):
        apply_poses(md, tmp_path / "short.pkl")
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump(np.zeros((4, 3)), fh)
    with pytest.raises(InputError, match=r"bad.pkl: rotations have shape"):
        read_pose_pickle(tmp_path / "bad.pkl")


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
    from jaxcryo.data._simulate import simulate

    sim = simulate(40, 16, snr=1.0, seed=3)
    clean = np.asarray(open_stack(out / "clean.mrcs"))
    err = np.linalg.norm(clean - sim.clean) / np.linalg.norm(sim.clean)
    assert err < 1e-4, err
    # write_dataset -> read back keeps poses, shifts and CTF
    np.testing.assert_allclose(md.rotations, sim.metadata.rotations, atol=1e-5)
    np.testing.assert_allclose(md.shifts, sim.metadata.shifts, atol=1e-5)
    np.testing.assert_allclose(md.ctf.defocus_u, sim.metadata.ctf.defocus_u, rtol=1e-6)
