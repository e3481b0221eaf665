"""`jaxcryo simulate --perturb-angle/--perturb-shift/--remove-poses/--poses preferred` (issue 11 test data)."""

import numpy as np

from jaxcryo.cli import main
from jaxcryo.rotations._rotations import perturb_rotations, preferred_orientations
from jaxcryo.data._sources import read_particles


def angle_deg(a, b):
    c = (np.trace(np.swapaxes(a, -1, -2) @ b, axis1=-2, axis2=-1) - 1) / 2
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


def test_perturbed_and_poseless_copies(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--box", "16", "--n-particles", "40", "--perturb-angle", "5",
                 "--perturb-shift", "1.5", "--remove-poses", "--poses", "preferred", "--quiet"]) == 0
    true = read_particles(out / "particles.star")
    pert = read_particles(out / "particles_perturbed.star")
    nop = read_particles(out / "particles_noposes.star")
    # STAR stores angles at 6 decimals: the written perturbation is 5 degrees to ~1e-4
    np.testing.assert_allclose(angle_deg(true.rotations, pert.rotations), 5.0, atol=1e-3)
    d = np.linalg.norm(pert.shifts - true.shifts, axis=1) / true.pixel_size
    np.testing.assert_allclose(d, 1.5, atol=1e-4)
    assert nop.rotations is None and np.all(nop.shifts == 0)
    assert list(nop.image_files) == list(true.image_files) and np.all(nop.image_indices == true.image_indices)


def test_perturb_rotations_exact_angle_and_preferred_orientations_are_rotations():
    r = preferred_orientations(3, 500)
    np.testing.assert_allclose(np.swapaxes(r, -1, -2) @ r, np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    # concentrated: more viewing directions near the two preferred views than a uniform set would have
    near = np.maximum(np.abs(r[:, 2, 2]), np.abs(r[:, 2, 0])) > 0.9
    assert near.mean() > 0.35  # uniform: about 0.2
    p = perturb_rotations(r, 7.0, seed=1)
    np.testing.assert_allclose(angle_deg(r, p), 7.0, atol=1e-3)
