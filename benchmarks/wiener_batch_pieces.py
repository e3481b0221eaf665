"""Per-batch pieces of the box-128 one-pass Wiener accumulation (``jaxcryo reconstruct``'s whole cost), timed on
synthetic batches of 256 images: the fused step as shipped, the numerator and the weights alone, both as two
independent jitted calls, and the batch split into two scatters into two accumulators in one step. Prints
seconds per batch and writes results/wiener_batch_pieces.json.

    python benchmarks/wiener_batch_pieces.py
"""
import time, numpy as np, jax, jax.numpy as jnp
from functools import partial
from jaxcryo.solvers._wiener import _wiener_steps
from jaxcryo.solvers._reconstruct import DEFAULTS
from jaxcryo.forward._projection import Projector
from jaxcryo.data._batch import RawBatch, to_batch
from jaxcryo.forward._ctf import CTFParams
from jaxcryo.leastsq._hessian import weight_backprojection
from jaxcryo.rotations._rotations import random_rotations
import inspect
n, b = 128, 256
proj = Projector(n=n, pixel_size=1.5, operator=DEFAULTS["interp"])
rng = np.random.default_rng(0)
rots = random_rotations(b, seed=0) if "seed" in str(inspect.signature(random_rotations)) else random_rotations(jax.random.PRNGKey(0), b)
raws = [RawBatch(rng.normal(size=(b, n, n)).astype(np.float32), np.asarray(rots, np.float32),
                 rng.normal(0, 2, (b, 2)).astype(np.float32), CTFParams.create(rng.uniform(1e4, 2.5e4, b)),
                 np.ones(b, np.float32), np.ones(b, np.float32)) for _ in range(4)]
add, fin = _wiener_steps(proj, jnp.float32, True)
pixels = proj.hermitian_pixels()
shape = proj.lifted_shape()

def t(f, reps=12):
    f(0); jax.block_until_ready(f(1))
    t0 = time.perf_counter()
    for i in range(reps):
        out = f(i)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps

state = [jnp.zeros(shape, jnp.complex64), jnp.zeros((n,) * 3, jnp.float32)]
def fused(i):
    state[0], state[1] = add(state[0], state[1], raws[i % 4]); return state
RESULTS = {}
RESULTS["fused"] = t(fused); print("fused add_batch", RESULTS["fused"])

@partial(jax.jit, donate_argnums=0)
def num_only(num, raw):
    bb = to_batch(raw, jnp.float32)
    y = bb.images_f * (bb.weights * bb.mask)[:, None, None]
    filt = proj.filters(bb.shifts, bb.ctf, dtype=jnp.complex64)
    return num + proj.backproject_lifted(y, bb.rotations, filt, pixels)

@partial(jax.jit, donate_argnums=0)
def den_only(den, raw):
    bb = to_batch(raw, jnp.float32)
    return den + weight_backprojection(proj, bb, squared=False, pixels=pixels)

st = [jnp.zeros(shape, jnp.complex64), jnp.zeros((n,) * 3, jnp.float32)]
def n_only(i):
    st[0] = num_only(st[0], raws[i % 4]); return st[0]
def d_only(i):
    st[1] = den_only(st[1], raws[i % 4]); return st[1]
RESULTS["numerator_only"] = t(n_only); print("numerator_only", RESULTS["numerator_only"])
RESULTS["weights_only"] = t(d_only); print("weights_only", RESULTS["weights_only"])
def both(i):
    st[0] = num_only(st[0], raws[i % 4]); st[1] = den_only(st[1], raws[i % 4]); return st
RESULTS["two_calls"] = t(both); print("two_calls", RESULTS["two_calls"])


def half(raw, sl):
    return RawBatch(raw.images[sl], raw.rotations[sl], raw.shifts[sl], type(raw.ctf)(*(f[sl] for f in raw.ctf)),
                    raw.weights[sl], raw.mask[sl])

def one(num, den, raw):
    bb = to_batch(raw, jnp.float32)
    y = bb.images_f * (bb.weights * bb.mask)[:, None, None]
    filt = proj.filters(bb.shifts, bb.ctf, dtype=jnp.complex64)
    return (num + proj.backproject_lifted(y, bb.rotations, filt, pixels),
            den + weight_backprojection(proj, bb, squared=False, pixels=pixels))

@partial(jax.jit, donate_argnums=(0, 1))
def split2(num2, den2, raw):
    h = b // 2
    a = one(num2[0], den2[0], half(raw, slice(0, h)))
    c = one(num2[1], den2[1], half(raw, slice(h, b)))
    return jnp.stack([a[0], c[0]]), jnp.stack([a[1], c[1]])

st = [jnp.zeros((2,) + shape, jnp.complex64), jnp.zeros((2,) + (n,) * 3, jnp.float32)]
def s2(i):
    st[0], st[1] = split2(st[0], st[1], raws[i % 4]); return st
RESULTS["two_accumulators"] = t(s2); print("two_accumulators", RESULTS["two_accumulators"])

import json, os
from pathlib import Path
res = {k: v for k, v in RESULTS.items()}
out = Path(__file__).parent / "results" / "wiener_batch_pieces.json"
out.write_text(json.dumps({"box": n, "batch": b, "cpus": os.cpu_count(), "seconds_per_batch": res}, indent=1) + "\n")
