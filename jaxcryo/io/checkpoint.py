"""Checkpoints as plain data: ``<stem>.npz`` (arrays) plus ``<stem>.json`` (metadata); no pickle anywhere.

Layout of ``<stem>.npz`` (``np.load(path, allow_pickle=False)``): ``"{name}/{i}"`` is leaf ``i`` of pytree
``name`` in ``jax.tree_util.tree_flatten`` order (typed PRNG keys as their ``key_data``); the tree structure is
not stored, the reader supplies a template. ``"__meta__"`` is the full metadata (with ``"format"`` and
``"version"``) and ``"__trees__"`` is ``{name: number of leaves}``, both UTF-8 JSON as ``uint8`` arrays.
``<stem>.json`` holds the same metadata for people and other tools (``json.load``).

Crash safety: each file goes to a temporary file in the same folder, is fsynced and ``os.replace``-d, so each
is always wholly old or wholly new. The npz is written first and is self-contained, and
:func:`load_checkpoint` takes the metadata from it (the json is only checked for its ``"format"``): a run
killed between the two replacements leaves a consistent checkpoint (new npz, stale json), one killed
earlier the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .atomic import atomic_path, atomic_write_text

CHECKPOINT_FORMAT = "jaxcryo-checkpoint"
CHECKPOINT_VERSION = 1

def _paths(stem) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".npz", ".json"):
        stem = stem.with_suffix("")
    return Path(f"{stem}.npz"), Path(f"{stem}.json")


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf, where: str) -> np.ndarray:
    arr = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
    if arr.dtype.hasobject:
        raise TypeError(f"{where}: leaf of type {type(leaf).__name__} is not a numeric array or scalar")
    return arr


def save_checkpoint(stem: str | Path, trees: dict[str, Any], meta: dict) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (the arrays) and ``<stem>.json`` (meta), each atomically; return both paths.

    ``trees`` maps names to pytrees; ``meta`` is JSON-serialisable, without the keys ``"format"``/``"version"``.
    """
    npz, js = _paths(stem)
    if "format" in meta or "version" in meta:
        raise ValueError("checkpoint meta must not contain the reserved keys 'format' and 'version'")
    full = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta}
    text = json.dumps(full, indent=1)  # fails before anything is written if meta is not serialisable
    arrays, counts = {}, {}
    for name, tree in trees.items():
        leaves = jax.tree_util.tree_leaves(tree)
        counts[name] = len(leaves)
        for i, leaf in enumerate(leaves):
            arrays[f"{name}/{i}"] = _to_numpy(leaf, f"{npz}: tree '{name}'")
    for key, obj in (("__meta__", full), ("__trees__", counts)):
        arrays[key] = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    atomic_write_text(js, text + "\n")
    with contextlib.suppress(OSError, AttributeError):  # make the renames durable (POSIX only)
        fd = os.open(npz.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return npz, js


def _restore(arr: np.ndarray, tmpl, where: str):
    """``arr`` in the type of template leaf ``tmpl``; InputError if shape or dtype differ."""
    want = jax.random.key_data(tmpl) if _is_key(tmpl) else tmpl
    if isinstance(want, (np.ndarray, np.generic, jax.Array)):
        shape, dtype = tuple(want.shape), np.dtype(want.dtype)
        if arr.dtype.kind == "V" and arr.dtype.itemsize == dtype.itemsize:  # e.g. bfloat16 saved as void
            arr = arr.view(dtype)
        ok = arr.shape == shape and arr.dtype == dtype
    else:
        shape, dtype = (), np.asarray(want).dtype
        ok = arr.shape == () and arr.dtype.kind == dtype.kind
    if not ok:
        raise InputError(f"{where} has shape {arr.shape} dtype {arr.dtype}, expected shape {shape} dtype {dtype}")
    if _is_key(tmpl):
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=jax.random.key_impl(tmpl))
    if isinstance(tmpl, jax.Array):
        return jnp.asarray(arr)
    if isinstance(tmpl, np.ndarray):
        return arr
    if isinstance(tmpl, np.generic):
        return arr[()]
    if isinstance(tmpl, (numbers.Number, str)):
        return type(tmpl)(arr.item())  # type: ignore[call-arg]  # int, float, complex, bool, str
    return arr.item()


def _read_json(data: bytes, path: Path, check_format: bool = True):
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:  # includes UnicodeDecodeError
        raise InputError(f"{path}: not a jaxcryo checkpoint (unreadable JSON: {e})") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if check_format and fmt != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a jaxcryo checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})")
    return obj


def load_checkpoint(stem: str | Path, templates: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict]:
    """Read back ``(trees, meta)`` written by :func:`save_checkpoint`; ``meta`` comes from the npz.

    With ``templates`` (pytrees of the expected structure, e.g. a fresh ``optimizer.init(v0)``) each tree is
    unflattened into its template's structure, checking leaf count, shapes and dtypes; leaves take the
    template leaf's kind (jax array, numpy array or scalar, Python scalar). Trees without a template come back
    as the list of their leaves (``np.ndarray``). Raises :class:`~jaxcryo.errors.InputError` (one line,
    naming the file) on a missing file, a file that is not a checkpoint, another version or a mismatch.
    """
    npz, js = _paths(stem)
    if not npz.is_file():
        raise InputError(f"{npz}: checkpoint file not found")
    try:
        z = np.load(npz, allow_pickle=False)
    except OSError as e:
        raise InputError(f"{npz}: cannot read checkpoint ({e.strerror or e})") from None
    except (ValueError, EOFError, zipfile.BadZipFile):  # numpy refuses pickles with a ValueError
        raise InputError(f"{npz}: not a jaxcryo checkpoint (not an .npz archive; pickles are not read)") from None
    if not isinstance(z, np.lib.npyio.NpzFile) or not {"__meta__", "__trees__"} <= set(z.files):
        raise InputError(f"{npz}: not a jaxcryo checkpoint (no '__meta__'/'__trees__' entries)")
    try:
        with z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{npz}: damaged checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    meta = _read_json(arrays.pop("__meta__").tobytes(), npz)
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{npz}: checkpoint version {meta.get('version')!r}, this jaxcryo reads version "
                         f"{CHECKPOINT_VERSION} (written by another jaxcryo release?)")
    if js.is_file():  # informational copy; may be stale after a crash, but must be ours
        _read_json(js.read_bytes(), js)
    counts = _read_json(arrays.pop("__trees__").tobytes(), npz, check_format=False)
    templates = templates or {}
    missing = [k for k in templates if k not in counts]
    if missing:
        raise InputError(f"{npz}: checkpoint has no tree {missing[0]!r} (it has {sorted(counts)})")
    trees = {}
    for name, n in counts.items():
        got = [arrays.get(f"{name}/{i}") for i in range(n)]
        leaves = [a for a in got if a is not None]
        if len(leaves) != n:
            raise InputError(f"{npz}: tree '{name}' is incomplete (damaged checkpoint?)")
        if name not in templates:
            trees[name] = leaves
            continue
        tleaves, treedef = jax.tree_util.tree_flatten(templates[name])
        if len(tleaves) != n:
            raise InputError(f"{npz}: tree '{name}' has {n} arrays, expected {len(tleaves)} "
                             "(checkpoint from another optimiser or version?)")
        restored = [_restore(a, t, f"{npz}: tree '{name}' array {i}") for i, (a, t) in enumerate(zip(leaves, tleaves))]
        trees[name] = jax.tree_util.tree_unflatten(treedef, restored)
    return trees, meta
