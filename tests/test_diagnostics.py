"""Issue 19 item 3: a refinement says when it failed (``jaxcryo.poses._diagnostics``, run.json's ``warnings``)."""

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from jaxcryo.cli import main
from jaxcryo.data import phantom
from jaxcryo.io.mrc import read_map, write_map
from jaxcryo.ndimage import soft_sphere_mask
from jaxcryo.poses._diagnostics import (DiagnosticThresholds, centre_of_mass_offset, convergence_warnings,
                                        edge_mass_fraction, fsc_to_reference, map_warnings, reference_warnings,
                                        run_warnings)

PX = 3.0


@pytest.fixture(scope="module")
def vol():
    return np.asarray(phantom(32), np.float32)


def test_centred_map_gives_no_warning(vol):
    assert np.linalg.norm(centre_of_mass_offset(vol, PX)) < 2.5  # the phantom is not symmetric
    assert edge_mass_fraction(vol, PX) < 0.1
    assert map_warnings(vol, PX) == []
    assert map_warnings(-vol, PX) == []  # either sign of density (ASPIRE sets read with RELION's CTF sign)


def test_shifted_map_warns(vol):
    moved = ndi.shift(vol, (0, 0, 8), order=1)
    c = centre_of_mass_offset(moved, PX)
    assert c[2] == pytest.approx(8.0 + centre_of_mass_offset(vol, PX)[2], abs=1.0)
    w = map_warnings(moved, PX)
    assert any("off centre" in x for x in w), w


def test_density_at_the_edge_warns():
    v = np.zeros((32,) * 3, np.float32)
    v[2:6, 2:6, 2:6] = 1.0  # a blob in a corner
    v[26:30, 26:30, 26:30] = 1.0  # and the opposite one: centre of mass central, density at the edge
    assert np.linalg.norm(centre_of_mass_offset(v, PX)) < 1.0
    assert edge_mass_fraction(v, PX) > 0.9
    w = map_warnings(v, PX)
    assert len(w) == 1 and "edge" in w[0], w


def test_reference_warnings(vol):
    lp = ndi.gaussian_filter(vol, 2.0)
    assert reference_warnings(vol, lp, PX, 15.0) == []  # the map keeps its reference's low frequencies
    other = np.ascontiguousarray(np.transpose(vol, (2, 1, 0))[::-1])  # another volume
    w = reference_warnings(vol, other, PX, 15.0)
    assert len(w) == 1 and "FSC to the starting reference" in w[0], w
    f = fsc_to_reference(vol, other)
    assert f[0] == pytest.approx(1.0) and np.min(f[1:5]) < 0.5
    sphere = soft_sphere_mask(32, 10, 3)
    assert reference_warnings(vol, sphere, PX, 15.0) != []


def test_convergence_warnings():
    rec = lambda shell, change, step: {"fsc_0143_shell": shell, "resolution": 96.0 / shell,  # noqa: E731
                                       "mean_pose_change_deg": change, "angular_step": step}
    improving = [rec(4, None, 7.5), rec(6, 5.0, 7.5), rec(10, 3.0, 3.75)]
    assert convergence_warnings(improving, 32) == []
    stalled = [rec(4, None, 7.5), rec(6, 5.0, 7.5), rec(6, 3.0, 3.75)]
    w = convergence_warnings(stalled, 32)
    assert len(w) == 1 and "stopped improving" in w[0] and "shell 6 of 16" in w[0], w
    still = [rec(5, 0.2, 1.25)]
    assert "stopped moving" in convergence_warnings(still, 32)[0]
    good_stop = [rec(12, 1.0, 1.25), rec(12, 0.3, 0.625)]  # stopped, but at a good resolution
    assert convergence_warnings(good_stop, 32) == []
    assert convergence_warnings([], 32) == []
    loose = DiagnosticThresholds(poor_shell_fraction=0.25)
    assert convergence_warnings(stalled, 32, loose) == []


def test_run_warnings_combines(vol):
    moved = ndi.shift(vol, (0, 0, 8), order=1)
    hist = [{"fsc_0143_shell": 5, "resolution": 19.2, "mean_pose_change_deg": 0.1, "angular_step": 1.0}]
    w = run_warnings(moved, vol, hist, PX, 15.0)
    assert len(w) >= 3, w
    assert run_warnings(vol, vol, [], PX, 15.0) == []


# ------------------------------------------------------------------------------------------------------
# On refinements: a good one warns of nothing; a wrong or shifted reference is reported in run.json
# ------------------------------------------------------------------------------------------------------
#: a small, clean set (``jaxcryo simulate``) whose good refinement reaches well past half Nyquist
SIM = {"--box": 32, "--n-particles": 400, "--snr": 4, "--max-shift": 6, "--seed": 3}


@pytest.fixture(scope="module")
def simset(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag_sim")
    args = [str(x) for kv in SIM.items() for x in kv]
    assert main(["simulate", "--out", str(d), *args, "--remove-poses", "--quiet"]) == 0
    truth, px = read_map(d / "ground_truth.mrc")
    write_map(d / "sphere.mrc", soft_sphere_mask(32, 10, 3) * truth.std() * 3, px)
    write_map(d / "shifted.mrc", ndi.shift(truth, (0, 0, 8), order=1), px)
    return d


def _refine(simset, out, ref, star, extra=()):
    assert main(["refine", str(simset / star), "--reference", str(simset / ref), "--out", str(out),
                 "--iterations", "3", "--batch-size", "100", "--quiet", *extra]) == 0
    return json.loads((out / "run.json").read_text())["warnings"]


def test_good_refinement_has_no_warnings(simset, tmp_path):
    assert _refine(simset, tmp_path / "good", "ground_truth.mrc", "particles_noposes.star") == []


def test_sphere_reference_warns(simset, tmp_path, capsys):
    w = _refine(simset, tmp_path / "sphere", "sphere.mrc", "particles_noposes.star")
    assert w, "a refinement from a sphere should warn"
    assert "jaxcryo refine: warning:" in capsys.readouterr().err  # also in the log, even with --quiet


def test_shifted_reference_warns(simset, tmp_path):
    w = _refine(simset, tmp_path / "shifted", "shifted.mrc", "particles_noposes.star")
    assert any("off centre" in x for x in w), w
