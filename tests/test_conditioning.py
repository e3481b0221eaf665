"""Conditioning of the Hessian: the assembled operator against HVPs, Lanczos and power iteration against a
dense eigen-decomposition, the predicted growth, and the ``jaxcryo condition`` command (acceptance)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.cli import main
from jaxcryo.data._batch import Batch
from jaxcryo.leastsq._conditioning import condition_report, predicted_condition_number
from jaxcryo.ndimage._fourier import ball_mask
from jaxcryo.leastsq._hessian import exact_diagonal, hessian_operator
from jaxcryo.leastsq._linalg import condition_number, lanczos_extreme_eigs, power_iteration
from jaxcryo.leastsq._linalg import default_threshold
from jaxcryo.forward._projection import Projector
from jaxcryo.rotations._rotations import random_rotations
from jaxcryo.data._simulate import random_ctf_params


def _setup(n, n_poses, method="trilinear", ctf=False, seed=0):
    proj = Projector(n=n, pixel_size=3.0, operator=method)
    rots = random_rotations(jax.random.PRNGKey(seed), n_poses)
    ctfp = random_ctf_params(np.random.default_rng(seed), n_poses) if ctf else None
    shifts = np.random.default_rng(seed + 1).normal(size=(n_poses, 2)) * 4.0
    return proj, rots, ctfp, shifts


def _dense(op, mask, dtype=np.complex128):
    """Dense ``P H P`` on the ball voxels, column by column from unit vectors."""
    idx = np.flatnonzero(mask.ravel())
    cols = []
    for i in idx:
        e = np.zeros(mask.size, dtype)
        e[i] = 1.0
        cols.append(np.asarray(op(e.reshape(mask.shape))).ravel()[idx])
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("method,ctf", [("trilinear", True), ("nearest", False)])
def test_assembled_hessian_matches_hvp(method, ctf):
    proj, rots, ctfp, shifts = _setup(12, 40, method, ctf)
    a = hessian_operator(proj, rots, shifts, ctfp, lam=0.05, mode="stencil")
    b = hessian_operator(proj, rots, shifts, ctfp, lam=0.05, mode="hvp")
    rng = np.random.default_rng(3)
    z = rng.standard_normal((12,) * 3) + 1j * rng.standard_normal((12,) * 3)
    ha, hb = a(z), b(z)
    assert np.abs(ha - hb).max() <= 1e-5 * np.abs(ha).max()
    # Its diagonal is the optimiser's exact diagonal.
    batch = Batch(jnp.zeros((40, 12, 12), jnp.complex64), jnp.asarray(rots), jnp.asarray(shifts, jnp.float32),
                  None if ctfp is None else type(ctfp)(*(jnp.asarray(f, jnp.float32) for f in ctfp)),
                  jnp.ones(40), jnp.ones(40))
    d = np.asarray(exact_diagonal(proj, batch, lam=0.05))
    assert np.abs(a.diagonal() - d).max() <= 1e-5 * d.max()


def test_lanczos_and_power_iteration_match_dense():
    n = 8
    proj, rots, _, shifts = _setup(n, 60)
    mask = ball_mask(n)
    hvp_op = hessian_operator(proj, rots, shifts, mode="hvp")  # complex HVPs of loss.loss
    H = _dense(hvp_op, mask)
    assert np.abs(H - H.conj().T).max() <= 1e-5 * np.abs(H).max()  # Hermitian
    ev = np.linalg.eigvalsh(0.5 * (H + H.conj().T))
    assert ev[0] > 0
    # Complex Lanczos on the HVP operator, real Lanczos on the assembled one.
    st_op = hessian_operator(proj, rots, shifts)
    for op in (hvp_op, st_op):
        lo, hi = lanczos_extreme_eigs(op, mask, key=jax.random.PRNGKey(1), iters=200, rtol=1e-3)
        assert lo == pytest.approx(ev[0], rel=0.03)
        assert hi == pytest.approx(ev[-1], rel=0.01)
    lmax = power_iteration(st_op, (n,) * 3, key=0, iters=200, mask=mask)
    assert lmax == pytest.approx(ev[-1], rel=0.01)
    # Preconditioned: eigenvalues of D^-1 H with D thresholded as the optimiser does.
    dhat = np.maximum(np.abs(st_op.diagonal()), default_threshold(n))[mask]
    s = 1 / np.sqrt(dhat)
    evp = np.linalg.eigvalsh(0.5 * (H + H.conj().T) * s[:, None] * s[None, :])
    kp, plo, phi = condition_number(st_op, mask, key=2, iters=200, preconditioner=st_op.diagonal(), rtol=1e-3)
    assert plo == pytest.approx(evp[0], rel=0.03)
    assert phi == pytest.approx(evp[-1], rel=0.01)
    assert kp == pytest.approx(evp[-1] / evp[0], rel=0.04)


def test_predicted_condition_number_grows_linearly():
    k = [predicted_condition_number(n) for n in (16, 32, 64, 128)]
    assert all(b > a for a, b in zip(k, k[1:]))
    for n, kn in zip((16, 32, 64, 128), k):
        assert kn == pytest.approx(2 * n / 3, rel=0.2)  # 4R/3, R = N/2
    assert predicted_condition_number(32, lam=1.0) < 2.0


def test_report_nearest_small():
    rep = condition_report([8, 12], n_poses=300, method="nearest", seed=1)
    assert set(rep) == {"box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings"}
    assert rep["box"] == [8, 12]
    # Nearest slices: H is diagonal, so D^-1 H is the identity wherever D is above the threshold.
    for k in rep["kappa_DinvH"]:
        assert 1.0 <= k < 1.5
    assert rep["kappa_H"][1] > rep["kappa_H"][0] > 1.0


def test_condition_cli_acceptance(tmp_path, capsys):
    """``jaxcryo condition --box 16 32`` with the defaults: kappa(H) grows with the box and the diagonal
    preconditioner divides it by at least 5 at box 32."""
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["condition", "--box", "16", "32", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "kappa(H)" in out and "32" in out
    rep = json.loads(js.read_text())
    assert list(rep) == ["box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings"]
    assert rep["box"] == [16, 32]
    kh, kp, kpred = rep["kappa_H"], rep["kappa_DinvH"], rep["kappa_predicted"]
    assert kh[1] > kh[0] > 1
    assert kp[1] * 5 <= kh[1]
    assert kpred[1] > kpred[0]
    s = rep["settings"]
    assert s["interp"] == "trilinear" and s["n_poses"] == 2000 and s["ctf"] is False and s["seed"] == 0
    assert s["ball_radius"] == "N/2" and s["lam"] == 0.0 and s["lanczos_iters"] > 0
    assert "default_threshold" in s["D"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_condition_cli_bad_box(capsys):
    assert main(["condition", "--box", "2"]) == 2
    assert "--box" in capsys.readouterr().err
