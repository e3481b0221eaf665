"""The pose-search engine (issue 17): one loop for every search method, the same assignment whatever the
memory bound's chunking, top-K weights; validated settings of refine and ab initio; the strategies' pattern."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.errors import InputError
from jaxcryo.poses import (AbinitioSettings, Cascade, GlobalSearch, LocalSearch, PoseSearch, RefineSettings,
                           best_poses, score_poses)
from jaxcryo.rotations import shift_grid, so3_grid
from jaxcryo.solvers import MinibatchStrategy, PSGD, SGD, make_strategy, scale_by_shell_schedule


@pytest.fixture(scope="module")
def small():
    sim = jc.simulate(n_particles=30, box=16, snr=4.0, seed=5, operator="trilinear")
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=16, pixel_size=float(sim.metadata.pixel_size), operator="trilinear")
    return ds, proj, jc.volume_to_fourier(jnp.asarray(sim.volume))


def test_global_search_is_chunk_independent_and_matches_best_poses(small):
    ds, proj, vol = small
    px = proj.pixel_size
    method = GlobalSearch(jnp.asarray(so3_grid(30.0), jnp.float32), jnp.asarray(shift_grid(2 * px, px), jnp.float32))
    whole = PoseSearch(proj, batch_size=64)(method, vol, 6.0, ds)
    engine = PoseSearch(proj, batch_size=64, memory=7 * method.candidates_per_image())
    assert engine.chunk(method) == 7
    chunked = engine(method, vol, 6.0, ds)
    for name in ("rotations", "shifts", "weights"):  # the same candidates, whatever the chunks
        np.testing.assert_array_equal(getattr(whole, name), getattr(chunked, name))
    # scores: float32 sums of large terms whose rounding depends on the batch shape (module _scoring)
    np.testing.assert_allclose(whole.scores, chunked.scores, rtol=1e-4)
    batch = jc.to_batch(jc.load_batch(ds, np.arange(30)))
    direct = best_poses(score_poses(vol, batch, proj, method.rotations, method.shifts, kmax=6.0), method.rotations,
                        method.shifts)
    np.testing.assert_allclose(whole.rotations[:, 0], np.asarray(direct.rotations), atol=1e-5)
    np.testing.assert_array_equal(whole.shifts[:, 0], np.asarray(direct.shifts))
    np.testing.assert_allclose(whole.scores[:, 0], np.asarray(direct.score), rtol=1e-4)
    assert np.all(whole.weights == 1.0) and whole.rotations.shape == (30, 1, 3, 3)


def test_local_top_k_and_cascade(small):
    ds, proj, vol = small
    md = ds.metadata
    grid = jnp.asarray(shift_grid(proj.pixel_size, proj.pixel_size), jnp.float32)
    engine = PoseSearch(proj, batch_size=16)
    hard = engine(LocalSearch(5.0, 10.0, grid), vol, 6.0, ds, None, md.rotations, md.shifts)
    soft = engine(LocalSearch(5.0, 10.0, grid, top_k=3), vol, 6.0, ds, None, md.rotations, md.shifts)
    assert soft.weights.shape == (30, 3) and np.allclose(soft.weights.sum(1), 1.0)
    assert np.all(np.diff(soft.weights, axis=1) <= 1e-12) and np.all(np.diff(soft.scores, axis=1) <= 0)
    np.testing.assert_allclose(soft.rotations[:, 0], hard.rotations[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="current poses"):
        engine(LocalSearch(5.0, 10.0, grid), vol, 6.0, ds)
    glob = GlobalSearch(jnp.asarray(so3_grid(30.0), jnp.float32), grid)
    cascade = Cascade((glob, LocalSearch(15.0, 30.0, grid)))
    assert not cascade.needs_start and cascade.candidates_per_image() == glob.candidates_per_image()
    first = engine(glob, vol, 6.0, ds)
    both = engine(cascade, vol, 6.0, ds)
    assert np.all(both.scores[:, 0] >= first.scores[:, 0] - 1e-3 * np.abs(first.scores[:, 0]))


def test_settings_validate_themselves():
    for kw, param in ((dict(iterations=0), "iterations"), (dict(min_step=0.0), "min_step"),
                      (dict(top_k=0), "top_k"), (dict(optimizer="cg", reestimate=False), "optimizer"),
                      (dict(optimizer="nope"), "optimizer"), (dict(max_shift_px=-1.0), "max_shift_px")):
        with pytest.raises(InputError) as e:
            RefineSettings(**kw)
        assert e.value.param == param, (kw, e.value.param)
    assert RefineSettings(optimizer=SGD()).to_dict()["optimizer"] == "sgd"
    # half maps re-estimated each iteration (the default): any one-pass strategy (CG included) is a valid update
    assert RefineSettings(optimizer="cg").to_dict()["optimizer"] == "cg"
    with pytest.raises(InputError) as e:
        AbinitioSettings(final_resolution=50.0)
    assert e.value.param == "final_resolution"
    assert AbinitioSettings.for_epochs(2.0, 100, batch_size=30).steps == 7
    assert AbinitioSettings.for_epochs(0.01, 100, batch_size=30).steps == 1
    with pytest.raises(InputError) as e:
        AbinitioSettings.for_epochs(0, 100)
    assert e.value.param == "epochs"


def test_strategies_are_abstract_final_values():
    with pytest.raises(TypeError):
        MinibatchStrategy()  # abstract: its methods and fields are declared, not defined
    s = make_strategy("psgd", probes=0, batch_diagonal=True, harmonic=True)  # options a class lacks are ignored
    assert isinstance(s, PSGD) and s.batch_diagonal and s.probes == 0
    assert isinstance(make_strategy("sgd", probes=0, harmonic=True), SGD)
    rates = np.array([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]], np.float32)
    tx = scale_by_shell_schedule(rates, 8)
    ones = jnp.ones((8, 8, 8), jnp.complex64)
    state = tx.init(ones)
    u0, state = tx.update(ones, state)
    u1, state = tx.update(ones, state)
    u2, _ = tx.update(ones, state)  # beyond the table: its last row
    from jaxcryo.ndimage._fourier import shell_index

    sh = np.minimum(shell_index(8, 3), 2)
    np.testing.assert_array_equal(np.real(np.asarray(u0)), rates[0][sh])
    np.testing.assert_array_equal(np.real(np.asarray(u1)), rates[1][sh])
    np.testing.assert_array_equal(np.real(np.asarray(u2)), rates[1][sh])


def test_likelihood_options_shell_weights_and_offset_prior(small):
    """The Scorer's options: per-shell weights multiply each pixel's term (ones change nothing, a constant c
    scales the scores by c), and the offset prior adds -|o - o_i|^2 / (2 sigma^2)."""
    from jaxcryo.poses import Scorer, score_local

    ds, proj, vol = small
    batch = jc.to_batch(jc.load_batch(ds, np.arange(12)))
    rots = jnp.asarray(so3_grid(60.0), jnp.float32)
    shifts = jnp.asarray(shift_grid(2 * proj.pixel_size, proj.pixel_size), jnp.float32)
    plain = np.asarray(score_poses(vol, batch, proj, rots, shifts, kmax=6.0))
    ones = np.asarray(score_poses(vol, batch, proj, rots, shifts, kmax=6.0, shell_weights=np.ones(9)))
    twice = np.asarray(score_poses(vol, batch, proj, rots, shifts, kmax=6.0, shell_weights=np.full(3, 2.0)))
    np.testing.assert_array_equal(ones, plain)
    np.testing.assert_allclose(twice, 2 * plain, rtol=1e-5)
    local = jnp.broadcast_to(rots[:5], (12, 5, 3, 3))
    per = jnp.broadcast_to(shifts, (12,) + shifts.shape)
    np.testing.assert_allclose(np.asarray(score_local(vol, batch, proj, local, per, kmax=6.0, shell_weights=[2.0])),
                               2 * plain[:, :5], rtol=1e-5)
    sigma = 3.0
    with_prior = np.asarray(Scorer(proj, 6.0, None, sigma).shared(vol, batch, rots, shifts))
    d = np.asarray(shifts)[None] - np.asarray(batch.shifts)[:, None]
    np.testing.assert_allclose(with_prior - plain, np.broadcast_to((-0.5 * (d ** 2).sum(-1) / sigma ** 2)[:, None],
                                                                   plain.shape), rtol=1e-4, atol=1e-3)


def test_cli_maps_settings_errors_to_flags(tmp_path, capsys):
    """The library names the parameter; the command line shows its flag (one line, exit code 2)."""
    from jaxcryo.cli import main

    ref = tmp_path / "ref.mrc"
    ref.write_bytes(b"")  # not read: the settings are refused first
    for argv, flag in ((["--max-shift", "-1"], "--max-shift -1.0"), (["--min-step", "0"], "--min-step 0.0"),
                       (["--iterations", "0"], "--iterations 0")):
        assert main(["refine", str(tmp_path / "none.star"), "--reference", str(ref), "--out", str(tmp_path / "o"),
                     "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1, err
    assert main(["abinitio", str(tmp_path / "none.star"), "--out", str(tmp_path / "a"), "--epochs", "0",
                 "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err  # the particles are read first (their count sets the steps)
