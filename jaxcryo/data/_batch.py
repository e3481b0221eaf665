"""Minibatches as the jitted steps consume them: the one batch builder and the one epoch batcher.

* :class:`RawBatch`: host-side (NumPy) real-space images and metadata of a minibatch, read from a particle
  source by :func:`load_batch`;
* :class:`Batch`: the device-side batch (Fourier images, JAX arrays), built by :func:`make_batch` (from
  arrays) or :func:`to_batch` (from a :class:`RawBatch`, inside jit);
* :func:`epoch_batches`: the particle indices of one epoch in batches of a *static* size: the ragged last
  batch is padded (cycling its own indices) and masked, so every image is used exactly once per epoch and
  a jitted step sees one shape;
* :func:`prefetch`: reads the next batches in a background thread (bounded queue) while a step computes;
* :func:`check_batch_inputs`: after a step's loss came back non-finite, which input of the step was at fault
  (an image, a pose, an origin, a CTF field, a weight, the starting volume), named as an ``InputError``.

Non-finite images cost nothing to find while a run goes well: a NaN or inf pixel makes the minibatch loss,
which every step reduces on the device and returns, non-finite; only then are the step's inputs scanned.
"""

from __future__ import annotations

import queue
import threading
from typing import Generator, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int

from ..errors import InputError
from ..forward._ctf import CTFParams
from ..ndimage._fourier import fft2c


def complex_dtype(dtype):
    """complex128 for float64, else complex64."""
    return jnp.complex128 if dtype == jnp.float64 else jnp.complex64


class Batch(NamedTuple):
    """A minibatch of images and their metadata (all leading dimensions ``B``; static for jit).

    Attributes:
        images_f: ``(B, n, n)`` complex centred Fourier transforms of the images.
        rotations: ``(B, 3, 3)`` RELION matrices.
        shifts: ``(B, 2)`` RELION origins in Å.
        ctf: :class:`CTFParams` with ``(B,)`` fields, or ``None`` (no CTF).
        weights: ``(B,)`` inverse noise variances (1 if unknown).
        mask: ``(B,)`` 1 for real entries, 0 for padding of a ragged last batch.
    """

    images_f: jax.Array
    rotations: jax.Array
    shifts: jax.Array
    ctf: CTFParams | None
    weights: jax.Array
    mask: jax.Array


class RawBatch(NamedTuple):
    """Host-side batch: real-space images and metadata, NumPy, leading dimension ``B``."""

    images: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    ctf: CTFParams | None
    weights: np.ndarray
    mask: np.ndarray


def make_batch(images: Float[ArrayLike, "b n n"], rotations: Float[ArrayLike, "b 3 3"],
               shifts: Float[ArrayLike, "b 2"], ctf: CTFParams | None = None,
               weights: Float[ArrayLike, " b"] | None = None, mask: Float[ArrayLike, " b"] | None = None,
               dtype=jnp.float32) -> Batch:
    """Build a :class:`Batch` from real-space images ``(B, n, n)`` (Fourier-transformed here) and metadata.

    jit-friendly; ``weights`` and ``mask`` default to ones.
    """
    images = jnp.asarray(images, dtype)
    b = images.shape[0]
    return Batch(
        images_f=fft2c(images),  # real input: one real-input FFT (fftc), half the work of a complex one
        rotations=jnp.asarray(rotations, dtype),
        shifts=jnp.asarray(shifts, dtype),
        ctf=None if ctf is None else CTFParams(*(jnp.asarray(f, dtype) for f in ctf)),
        weights=jnp.ones((b,), dtype) if weights is None else jnp.asarray(weights, dtype),
        mask=jnp.ones((b,), dtype) if mask is None else jnp.asarray(mask, dtype),
    )


def to_batch(raw: RawBatch, dtype=jnp.float32) -> Batch:
    """The device :class:`Batch` of a :class:`RawBatch` (:func:`make_batch` of its fields)."""
    return make_batch(raw.images, raw.rotations, raw.shifts, raw.ctf, raw.weights, raw.mask, dtype)


def epoch_batches(indices: Int[ArrayLike, " k"], batch_size: int, rng: np.random.Generator | None = None,
                  multiple: int = 1) -> list:
    """Split ``indices`` (shuffled with ``rng`` if given) into batches of ``batch_size`` particles.

    The ragged last batch is padded by cycling its own indices, with ``mask = 0`` on the padding.
    ``multiple``: every batch is padded (masked) to a multiple of it, e.g. the device count of a data-parallel
    step (:mod:`jaxcryo.parallel`): the particles of each batch, and the data order, do not depend on it.

    Returns:
        A list of ``(idx, mask)``: ``idx`` int64 ``(size,)`` particle indices, ``mask`` float32 (1 = real,
        0 = padding), ``size`` = ``batch_size`` rounded up to a multiple of ``multiple``. Empty for empty
        ``indices``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    size = -(-batch_size // multiple) * multiple
    idx = np.asarray(indices, np.int64).reshape(-1)
    if rng is not None:
        idx = idx[rng.permutation(idx.size)]
    out = []
    for s in range(0, idx.size, batch_size):
        part = idx[s:s + batch_size]
        mask = np.zeros(size, np.float32)
        mask[:part.size] = 1.0
        if part.size < size:
            part = np.resize(part, size)
        out.append((part.astype(np.int64), mask))
    return out


_END = object()


def prefetch(items: Iterable, depth: int = 1) -> Generator:
    """Iterate ``items`` (e.g. a generator of :func:`load_batch` calls) in a background thread that keeps up
    to ``depth`` items ready in a bounded queue, so the reads of the next batch overlap the current step.

    The items and their order are those of ``items``: only *when* they are produced changes, so a run is the
    same with and without prefetching. An exception raised while producing an item (also
    ``KeyboardInterrupt``) is raised here, in the consumer, at that item. ``depth=0``: no thread, ``items``
    as is. Close the iterator (``contextlib.closing``) when stopping early: that stops the thread and waits
    for its current read.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, e))

    thread = threading.Thread(target=work, name="jaxcryo-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def load_batch(source, idx: Int[ArrayLike, " k"], mask: Float[ArrayLike, " k"] | None = None,
               weights: Float[ArrayLike, " n"] | None = None) -> RawBatch:
    """Read the images and metadata of particles ``idx`` from ``source`` into a :class:`RawBatch`.

    Each distinct image is read once (padding repeats indices). ``weights`` are per particle of the source
    (default: the source's ``weights`` attribute if it has one, e.g. :class:`jaxcryo.poses.SoftPoses`,
    else 1). Particles without poses (``metadata.rotations is None``: a pose search) get identity rotations.
    """
    md = source.metadata
    if weights is None:
        weights = getattr(source, "weights", None)
    idx = np.asarray(idx)
    uniq, inv = np.unique(idx, return_inverse=True)
    imgs = np.asarray(source.images(uniq), np.float32)[inv]
    return RawBatch(
        images=imgs,
        rotations=(np.broadcast_to(np.eye(3, dtype=np.float32), (len(idx), 3, 3)).copy() if md.rotations is None
                   else np.asarray(md.rotations[idx], np.float32)),
        shifts=np.asarray(md.shifts[idx], np.float32),
        ctf=None if md.ctf is None else CTFParams(*(np.asarray(f[idx], np.float32) for f in md.ctf)),
        weights=np.ones(len(idx), np.float32) if weights is None else np.asarray(weights[idx], np.float32),
        mask=np.ones(len(idx), np.float32) if mask is None else np.asarray(mask, np.float32),
    )


def iterate_batches(source, batch_size: int, indices: Int[ArrayLike, " k"] | None = None, rng: np.random.Generator | None = None
                    ) -> Iterator[RawBatch]:
    """Yield :class:`RawBatch` es covering ``indices`` (default all) once, padded to ``batch_size``."""
    if indices is None:
        indices = np.arange(len(source.metadata))
    for idx, mask in epoch_batches(indices, batch_size, rng):
        yield load_batch(source, idx, mask)


def _first_bad(values, n: int) -> int | None:
    """Row of the first non-finite entry of ``values`` (leading dimension ``n``), or None; None also when the
    values cannot be read here (e.g. a batch sharded over other processes)."""
    try:
        v = np.asarray(values).reshape(n, -1)
    except Exception:  # noqa: BLE001 - not addressable from this process, or an odd shape: nothing to tell
        return None
    bad = ~np.isfinite(v).all(axis=1)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def check_batch_inputs(raw: RawBatch, idx: Int[ArrayLike, " batch"], metadata,
                       volume: ArrayLike | None = None) -> None:
    """Raise :class:`InputError` naming the first non-finite input of a step whose loss was not finite: the
    image of a particle (its index in ``metadata``, its stack and image number), its pose, origin, a CTF field
    or weight, or ``volume`` (the starting volume). Returns (nothing found: the fault is the step size) when
    all are finite. ``idx``: the particle indices of the batch (as :func:`epoch_batches` gives them).

    Runs on the host, once, after the fact; the steps themselves check nothing.
    """
    idx = np.asarray(idx).reshape(-1)
    n = len(idx)
    src = getattr(metadata, "source", None) or "particles"
    k = _first_bad(raw.images, n)
    if k is not None:
        p = int(idx[k])
        files, where = getattr(metadata, "image_files", None), ""
        if files is not None and len(files) > p:
            where = f" ({files[p]}, image {int(metadata.image_indices[p]) + 1})"
        raise InputError(f"{src}: the image of particle {p + 1}{where} contains NaN or inf; the loss of its "
                         "batch is not finite")
    fields = [("pose", raw.rotations), ("origin", raw.shifts), ("weight", raw.weights)]
    if raw.ctf is not None:
        fields += [(f"CTF {name}", v) for name, v in zip(raw.ctf._fields, raw.ctf)]
    for what, values in fields:
        k = _first_bad(values, n)
        if k is not None:
            raise InputError(f"{src}: the {what} of particle {int(idx[k]) + 1} is not finite; the loss of its "
                             "batch is not finite")
    if volume is not None:
        try:
            v = np.asarray(volume)
        except Exception:  # noqa: BLE001 - not addressable here
            return
        bad = int(v.size - np.isfinite(v).sum())
        if bad:
            raise InputError(f"the starting volume: {bad} of {v.size} voxels are NaN or inf")
