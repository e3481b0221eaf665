"""Masks (issue 18): the particle-diameter sphere, RELION's relion_mask_create algorithm (low-pass, threshold,
extension, raised-cosine soft edge) and the ``jaxcryo mask`` command."""

import numpy as np
import pytest

from jaxcryo import read_map, write_map
from jaxcryo.cli import main
from jaxcryo.errors import InputError
from jaxcryo.ndimage import (auto_mask, auto_threshold, frequency_edge, low_pass, radius_grid, raised_cosine,
                             shell_of, spherical_mask)


def _relion_auto_mask(binary: np.ndarray, extend: float, width: float) -> np.ndarray:
    """relion_mask_create's autoMask (mask.cpp, RELION 3.1), brute force: a 0 voxel with a 1 voxel at squared
    distance < extend^2 becomes 1; then a 0 voxel at distance d < width from the extended mask gets
    0.5 + 0.5 cos(pi d / width)."""
    idx = np.argwhere(binary)
    pos = np.indices(binary.shape).reshape(3, -1).T
    d2 = ((pos[:, None, :] - idx[None, :, :]) ** 2).sum(-1).min(1).reshape(binary.shape)
    ext = binary | (d2 < extend * extend)
    idx = np.argwhere(ext)
    d2 = ((pos[:, None, :] - idx[None, :, :]) ** 2).sum(-1).min(1).reshape(binary.shape)
    soft = np.where(d2 < width * width, 0.5 + 0.5 * np.cos(np.pi * np.sqrt(d2) / width), 0.0)
    return np.where(ext, 1.0, soft)


def test_spherical_mask_soft_edge_has_the_stated_width():
    n, px, diameter, edge = 48, 1.5, 45.0, 5.0
    m = spherical_mask(n, diameter, px, soft_edge=edge)
    r = radius_grid(n, 3)
    radius = diameter / (2 * px)  # 15 voxels
    assert m.dtype == np.float32 and m.min() == 0.0 and m.max() == 1.0
    assert np.all(m[r <= radius] == 1.0)
    assert np.all(m[r >= radius + edge] == 0.0)
    between = (m > 0) & (m < 1)
    assert r[between].min() > radius and r[between].max() < radius + edge
    assert r[between].max() - r[between].min() > edge - 1.0  # the edge spans its full width on the grid
    np.testing.assert_allclose(m, raised_cosine(r, radius, edge), atol=1e-6)
    # the value at mid-edge is 0.5 (voxel on the x axis at radius + 2.5 is off-grid: interpolate two voxels)
    c = n // 2
    prof = m[c, c, c + 15:c + 21].astype(float)
    np.testing.assert_allclose(prof, 0.5 * (1 + np.cos(np.pi * np.arange(6) / edge)), atol=1e-6)


def test_auto_mask_matches_relion_mask_create_algorithm():
    rng = np.random.default_rng(0)
    n = 20
    vol = np.zeros((n,) * 3, np.float32)
    vol[7:12, 6:10, 8:14] = 1.0
    vol[12:14, 9:11, 9:11] = 0.6
    vol += 0.05 * rng.standard_normal(vol.shape).astype(np.float32)
    for extend, width in ((3.0, 3.0), (2.5, 4.0), (0.0, 2.0)):
        m = auto_mask(vol, 2.0, lowpass=None, threshold=0.5, extend=extend, soft_edge=width)
        ref = _relion_auto_mask(vol >= 0.5, extend, width)
        np.testing.assert_allclose(m, ref, atol=1e-5)
    shrunk = auto_mask(vol, 2.0, lowpass=None, threshold=0.5, extend=-1.5, soft_edge=0)
    assert set(np.unique(shrunk)) <= {0.0, 1.0} and 0 < shrunk.sum() < (vol >= 0.5).sum()


def test_auto_mask_soft_edge_width_and_extension():
    n = 32
    vol = np.zeros((n,) * 3, np.float32)
    vol[12:20, 12:20, 12:20] = 1.0
    m = auto_mask(vol, 1.0, lowpass=None, threshold=0.5, extend=3, soft_edge=4)
    # along +x from the cube's face (last 1 voxel at x = 19): voxels closer than 3 join (x = 20, 21; RELION's
    # strict r^2 < extend^2), then the edge at distances 1, 2, 3 from x = 21
    prof = m[16, 16, 19:28].astype(float)
    np.testing.assert_allclose(prof[:3], 1.0)
    np.testing.assert_allclose(prof[3:], 0.5 * (1 + np.cos(np.pi * np.minimum(np.arange(1, 7), 4) / 4)),
                               atol=1e-6)
    assert np.count_nonzero((prof > 0) & (prof < 1)) == 3  # distances 1, 2, 3 < 4 voxels


def test_low_pass_is_relions_shell_edge_and_threshold_from_statistics():
    rng = np.random.default_rng(1)
    n, px = 32, 2.0
    v = rng.standard_normal((n,) * 3)
    out = low_pass(v, px, 8.0)
    k = shell_of(n, px, 8.0)
    assert k == 8
    r = np.fft.ifftshift(radius_grid(n, 3))
    ratio = np.abs(np.fft.fftn(out)) / np.abs(np.fft.fftn(v))
    np.testing.assert_allclose(ratio, frequency_edge(r, k, 2.0), atol=1e-5)
    assert shell_of(64, 1.0, 2 * 64 / 21) == 11  # a half rounds up, as RELION's ROUND
    # the automatic threshold sits well above the solvent and below the particle
    vol = np.zeros((n,) * 3)
    vol[10:22, 10:22, 10:22] = 1.0
    vol += 0.01 * rng.standard_normal(vol.shape)
    t = auto_threshold(vol)
    assert 0.05 < t < 0.5
    with pytest.raises(InputError, match="threshold"):
        auto_mask(vol, px, threshold=5.0)


def test_mask_cli_round_trip_and_bad_input(tmp_path, capsys):
    n, px = 32, 2.5
    vol = np.zeros((n,) * 3, np.float32)
    vol[10:22, 12:20, 11:21] = 1.0
    write_map(tmp_path / "map.mrc", vol, px)
    assert main(["mask", str(tmp_path / "map.mrc"), "--out", str(tmp_path / "mask.mrc"), "--lowpass", "10",
                 "--extend", "2", "--soft-edge", "3"]) == 0
    m, mpx = read_map(tmp_path / "mask.mrc")
    assert mpx == pytest.approx(px) and m.min() >= 0.0 and m.max() == 1.0
    assert (m > 0.5).sum() > (vol > 0.5).sum()  # extended
    ref = auto_mask(vol, px, lowpass=10, extend=2, soft_edge=3)
    np.testing.assert_allclose(m, ref, atol=1e-6)
    vol[3, 3, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's, on writing
        write_map(tmp_path / "nan.mrc", vol, px)
    capsys.readouterr()
    assert main(["mask", str(tmp_path / "nan.mrc"), "--out", str(tmp_path / "m2.mrc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.mrc" in err[0]
    assert main(["mask", str(tmp_path / "map.mrc"), "--out", str(tmp_path / "m3.mrc"), "--threshold", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "map.mrc" in err[0] and "threshold" in err[0]


def test_auto_mask_refuses_non_finite_extension_and_edge_and_a_box_without_solvent(tmp_path, capsys):
    """Review fixes: a NaN extension or soft edge was silently ignored (no extension, a hard edge); a box too
    small to have solvent corners gave a NaN threshold and numpy warnings."""
    vol = np.zeros((16,) * 3, np.float32)
    vol[5:11, 5:11, 5:11] = 1.0
    with pytest.raises(InputError, match="extend"):
        auto_mask(vol, 1.0, lowpass=None, threshold=0.5, extend=float("nan"))
    with pytest.raises(InputError, match="soft_edge"):
        auto_mask(vol, 1.0, lowpass=None, threshold=0.5, soft_edge=float("nan"))
    with pytest.raises(InputError, match="no solvent"):
        auto_threshold(np.ones((1, 1, 1)))
    write_map(tmp_path / "map.mrc", vol, 1.0)
    for flag in ("--extend", "--soft-edge", "--lowpass"):
        capsys.readouterr()
        assert main(["mask", str(tmp_path / "map.mrc"), "--out", str(tmp_path / "m.mrc"), flag, "nan"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], (flag, err)
    assert not (tmp_path / "m.mrc").exists()
