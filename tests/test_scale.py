"""Issue 19: a reference on another intensity scale is brought to the particles' before the pose search."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.data import ArrayDataset, simulate
from jaxcryo.forward import Projector, volume_to_fourier
from jaxcryo.io.mrc import read_map, write_map
from jaxcryo.poses._scale import reference_scale
from jaxcryo.rotations import align_rotations
from jaxcryo.data._sources import read_particles


def test_reference_scale_undoes_a_factor():
    sim = simulate(n_particles=300, box=24, snr=1.0, seed=4)
    ds = ArrayDataset(sim.metadata, sim.images)
    proj = Projector(n=24, pixel_size=sim.metadata.pixel_size)
    vf = volume_to_fourier(jnp.asarray(sim.volume))
    a1 = reference_scale(ds, vf, proj, 20.0, n_images=300)
    a50 = reference_scale(ds, 50.0 * vf, proj, 20.0, n_images=300)
    assert 0.8 < a1 < 1.3, a1  # the truth is (nearly) on the images' scale already
    assert a50 * 50.0 == pytest.approx(a1, rel=1e-4)
    assert reference_scale(ds, vf, proj, 20.0, n_images=300, seed=1) == pytest.approx(a1, rel=0.1)


@pytest.fixture(scope="module")
def strong_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale_sim")
    assert main(["simulate", "--out", str(d), "--box", "32", "--n-particles", "400", "--snr", "1",
                 "--max-shift", "6", "--perturb-angle", "5", "--perturb-shift", "1.5", "--seed", "5",
                 "--quiet"]) == 0
    truth, px = read_map(d / "ground_truth.mrc")
    write_map(d / "strong.mrc", 60.0 * truth, px)  # e.g. another program's projection normalisation
    return d


@pytest.mark.parametrize("scale", [True, False])
def test_local_refinement_from_a_strong_reference(strong_ref, tmp_path, scale):
    out = tmp_path / "out"
    assert main(["refine", str(strong_ref / "particles_perturbed.star"), "--reference", str(strong_ref / "strong.mrc"),
                 "--out", str(out), "--local-only", "--iterations", "2", "--batch-size", "100", "--quiet"]
                + ([] if scale else ["--no-scale-reference"])) == 0
    err = align_rotations(read_particles(out / "particles.star").rotations,
                          read_particles(strong_ref / "particles.star").rotations, mirror=True).median_deg
    hist = json.loads((out / "history.json").read_text())
    if scale:
        assert hist[0]["reference_scale"] == pytest.approx(1 / 60, rel=0.25)
        assert err < 3.5, err  # from 5 deg
    else:
        assert "reference_scale" not in hist[0]
        assert err > 4.0, err  # the unscaled reference biases the poses: no better than the start
