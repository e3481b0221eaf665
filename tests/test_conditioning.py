"""Conditioning (issue 3 acceptance 6): Lanczos against dense eigenvalues; kappa grows with the box and the
preconditioner shrinks it."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.cli import main
from jaxcryo.conditioning import hessian_operator, lanczos_extreme_eigs, power_iteration, predicted_condition_number
from jaxcryo.fourier import ball_mask
from jaxcryo.projection import Projector
from jaxcryo.rotations import random_rotations


def test_lanczos_matches_dense_on_tiny_problem():
    n = 8
    proj = Projector(n=n, pixel_size=1.0, method="trilinear")
    mv, d = hessian_operator(proj, random_rotations(jax.random.PRNGKey(0), 50))
    m = ball_mask(n, n / 2)
    idx = np.flatnonzero(m.ravel())
    cols = []
    for j in idx:
        e = np.zeros(n**3, np.float32)
        e[j] = 1
        cols.append(np.asarray(mv(jnp.asarray(e.reshape((n,) * 3)))).ravel()[idx])
    H = np.array(cols)
    ev = np.linalg.eigvalsh((H + H.T) / 2)
    lo, hi, _ = lanczos_extreme_eigs(mv, m, iters=200)
    assert abs(lo - ev[0]) <= 0.02 * ev[0] and abs(hi - ev[-1]) <= 0.02 * ev[-1]
    assert abs(power_iteration(mv, (n,) * 3, iters=100) - ev[-1]) <= 0.02 * ev[-1]
    np.testing.assert_allclose(np.asarray(d).ravel()[idx], np.diag(H), rtol=1e-5, atol=1e-7)


def test_condition_command_box_16_32(tmp_path, capsys):
    out = tmp_path / "kappa.json"
    assert main(["condition", "--box", "16", "32", "--lanczos-iters", "60", "--json", str(out),
                 "--plot", str(tmp_path / "kappa.png")]) == 0
    r = json.loads(out.read_text())
    assert r["box"] == [16, 32]
    assert set(r) >= {"box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings"}
    assert r["settings"]["interp"] == "trilinear" and r["settings"]["n_poses"] == 2000 and r["settings"]["ctf"] is False
    k16, k32 = r["kappa_H"]
    assert k32 > k16 > 1
    assert r["kappa_DinvH"][1] * 5 <= k32, r
    assert r["kappa_predicted"][1] > r["kappa_predicted"][0]
    assert (tmp_path / "kappa.png").stat().st_size > 1000
    print(capsys.readouterr().out)


def test_predicted_grows_linearly():
    k = [predicted_condition_number(n) for n in (16, 32, 64, 128)]
    ratios = np.array(k[1:]) / np.array(k[:-1])
    assert np.all(np.abs(ratios - 2) < 0.2)
