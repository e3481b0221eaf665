"""Checkpoints as data (npz + json, no pickle): round trip, plain readers, clear errors, crash safety."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcryo.errors import InputError
from jaxcryo.io import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint


def _state():
    opt = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))
    v0 = (jnp.arange(64, dtype=jnp.float32) + 1j * jnp.ones(64)).astype(jnp.complex64).reshape(4, 4, 4)
    _, st = opt.update(0.5 * v0, opt.init(v0), v0)
    return opt, v0, st


def _trees():
    opt, v0, st = _state()
    extra = {"eta": 0.25, "epoch": 3, "diag": np.linspace(0, 1, 5), "none": None, "empty": optax.EmptyState(),
             "key": jax.random.PRNGKey(7), "typed": jax.random.key(3), "i32": jnp.arange(3, dtype=jnp.int32)}
    return opt, v0, {"opt_state/half1": st, "extra": extra}


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert type(x) is type(y)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_round_trip_optax_state_and_rng(tmp_path):
    opt, v0, trees = _trees()
    rng = np.random.default_rng(12345)
    rng.random(7)
    meta = {"epoch": 3, "rng": rng.bit_generator.state, "history": [{"loss": 1.5}]}
    npz, js = save_checkpoint(tmp_path / "checkpoint", trees, meta)
    assert (npz, js) == (tmp_path / "checkpoint.npz", tmp_path / "checkpoint.json")
    templates = {"opt_state/half1": opt.init(v0), "extra": _trees()[2]["extra"]}
    loaded, lmeta = load_checkpoint(tmp_path / "checkpoint", templates)
    for name in trees:
        _assert_same(trees[name], loaded[name])
    assert lmeta == {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta}
    again = np.random.default_rng()
    again.bit_generator.state = lmeta["rng"]
    assert np.array_equal(again.random(10), rng.random(10))
    # the restored optimiser state is usable
    upd, _ = opt.update(v0, loaded["opt_state/half1"], v0)
    assert upd.dtype == jnp.complex64
    # without templates: lists of numpy leaves
    raw, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert len(raw["opt_state/half1"]) == len(jax.tree_util.tree_leaves(trees["opt_state/half1"]))
    assert all(isinstance(x, np.ndarray) for x in raw["extra"])


def test_plain_readers(tmp_path):
    _, _, trees = _trees()
    stem = tmp_path / "checkpoint"
    save_checkpoint(stem, trees, {"n": 2**100 + 1})
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert all(a.dtype != object for a in arrays.values())
    assert arrays["opt_state/half1/1"].dtype == np.complex64
    assert json.loads(arrays["__meta__"].tobytes())["n"] == 2**100 + 1
    with open(stem.with_suffix(".json")) as f:
        assert json.load(f) == {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "n": 2**100 + 1}
    assert not list(tmp_path.glob(".*tmp*"))


def test_template_mismatch(tmp_path):
    _, v0, trees = _trees()
    stem = tmp_path / "checkpoint"
    save_checkpoint(stem, trees, {})
    more = optax.chain(optax.scale_by_adam(), optax.scale_by_adam()).init(v0)
    with pytest.raises(InputError, match=r"checkpoint\.npz: tree 'opt_state/half1' has 3 arrays, expected 6 \("):
        load_checkpoint(stem, {"opt_state/half1": more})
    real = optax.chain(optax.scale_by_adam(), optax.scale(-1.0)).init(v0.real)
    with pytest.raises(InputError, match=r"array 1 has shape \(4, 4, 4\) dtype complex64, expected .* float32"):
        load_checkpoint(stem, {"opt_state/half1": real})
    wrong_shape = optax.chain(optax.scale_by_adam(), optax.scale(-1.0)).init(jnp.zeros((2, 2), jnp.complex64))
    with pytest.raises(InputError, match=r"checkpoint\.npz: tree 'opt_state/half1' array \d+ has shape"):
        load_checkpoint(stem, {"opt_state/half1": wrong_shape})
    with pytest.raises(InputError, match="no tree 'missing'"):
        load_checkpoint(stem, {"missing": [jnp.zeros(1)]})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="nothere.npz: checkpoint file not found"):
        load_checkpoint(tmp_path / "nothere")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="foreign.npz: not a jaxcryo checkpoint"):
        load_checkpoint(tmp_path / "foreign")
    (tmp_path / "p").mkdir()
    with open(tmp_path / "p" / "checkpoint.npz", "wb") as f:
        pickle.dump({"runs": [np.zeros(3)]}, f)
    with pytest.raises(InputError, match="checkpoint.npz: not a jaxcryo checkpoint") as e:
        load_checkpoint(tmp_path / "p" / "checkpoint")
    assert "\n" not in str(e.value)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="garbage.npz: not a jaxcryo checkpoint"):
        load_checkpoint(tmp_path / "garbage")
    save_checkpoint(tmp_path / "ok", {"a": [1.0]}, {})
    (tmp_path / "ok.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="ok.json: not a jaxcryo checkpoint"):
        load_checkpoint(tmp_path / "ok")


def test_wrong_version(tmp_path):
    stem = tmp_path / "checkpoint"
    save_checkpoint(stem, {"a": [jnp.ones(2)]}, {})
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    meta["version"] = CHECKPOINT_VERSION + 1
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(stem.with_suffix(".npz"), **arrays)
    with pytest.raises(InputError, match=f"checkpoint.npz: checkpoint version {CHECKPOINT_VERSION + 1}"):
        load_checkpoint(stem)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(stem, {}, {"version": 3})


def test_stale_json_after_crash(tmp_path):
    stem = tmp_path / "checkpoint"
    save_checkpoint(stem, {"v": [jnp.zeros(3)]}, {"epoch": 1})
    old_json = stem.with_suffix(".json").read_bytes()
    save_checkpoint(stem, {"v": [jnp.ones(3)]}, {"epoch": 2})
    stem.with_suffix(".json").write_bytes(old_json)  # killed after replacing the npz, before the json
    trees, meta = load_checkpoint(stem, {"v": [jnp.zeros(3)]})
    assert meta["epoch"] == 2 and np.array_equal(trees["v"][0], np.ones(3))
