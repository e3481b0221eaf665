"""Minibatches of particles as the jitted steps consume them: static shapes, padded last batch.

A *source* is anything with ``metadata`` (:class:`jaxcryo.particles.ParticleMetadata`) and
``images(idx) -> (k, box, box) float32`` real-space images: :class:`ArrayDataset` (images in memory, for
tests, notebooks and benchmarks) or :class:`jaxcryo.data.ParticleDataset` (memory-mapped stacks).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .ctf import CTFParams
from .fourier import fft2c
from .loss import Batch
from .particles import ParticleMetadata


class ArrayDataset:
    """Particles whose images are already in memory (``(n, box, box)`` float32)."""

    def __init__(self, metadata: ParticleMetadata, images: np.ndarray):
        if len(images) != len(metadata):
            raise ValueError(f"{len(images)} images for {len(metadata)} particles")
        self.metadata = metadata
        self._images = np.asarray(images, np.float32)

    def __len__(self) -> int:
        return len(self.metadata)

    def images(self, idx) -> np.ndarray:
        imgs = self._images[np.asarray(idx)]
        if self.metadata.contrast_sign is not None:
            imgs = imgs * np.asarray(self.metadata.contrast_sign, np.float32)[np.asarray(idx), None, None]
        return imgs


class RawBatch(NamedTuple):
    """Host-side batch: real-space images and metadata, NumPy, leading dimension ``B``."""

    images: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    ctf: CTFParams | None
    weights: np.ndarray
    mask: np.ndarray


def epoch_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None = None):
    """Split ``indices`` (shuffled with ``rng`` if given) into batches of exactly ``batch_size``.

    The ragged last batch is *padded* by repeating its first index, with ``mask = 0`` on the padding, so
    every batch has the same static shape and every image is used once per epoch.

    Returns a list of ``(idx, mask)`` with ``idx`` int64 ``(batch_size,)`` and ``mask`` float32.
    """
    idx = np.asarray(indices)
    if rng is not None:
        idx = idx[rng.permutation(len(idx))]
    out = []
    for s in range(0, len(idx), batch_size):
        part = idx[s : s + batch_size]
        mask = np.ones(batch_size, np.float32)
        if len(part) < batch_size:
            mask[len(part) :] = 0
            part = np.concatenate([part, np.full(batch_size - len(part), part[0])])
        out.append((part, mask))
    return out


def load_batch(source, idx: np.ndarray, mask: np.ndarray | None = None, weights: np.ndarray | None = None) -> RawBatch:
    """Read the images and metadata of ``idx`` from ``source`` into a :class:`RawBatch`."""
    md = source.metadata
    idx = np.asarray(idx)
    # Read each distinct image once (padding repeats indices).
    uniq, inv = np.unique(idx, return_inverse=True)
    imgs = np.asarray(source.images(uniq), np.float32)[inv]
    return RawBatch(
        images=imgs,
        rotations=np.asarray(md.rotations[idx], np.float32),
        shifts=np.asarray(md.shifts[idx], np.float32),
        ctf=None if md.ctf is None else CTFParams(*(np.asarray(f[idx], np.float32) for f in md.ctf)),
        weights=np.ones(len(idx), np.float32) if weights is None else np.asarray(weights[idx], np.float32),
        mask=np.ones(len(idx), np.float32) if mask is None else np.asarray(mask, np.float32),
    )


def to_batch(raw: RawBatch, dtype=jnp.float32) -> Batch:
    """Device :class:`~jaxcryo.loss.Batch` from a :class:`RawBatch` (FFT of the images; jit-friendly)."""
    cdt = jnp.complex128 if dtype == jnp.float64 else jnp.complex64
    return Batch(
        images_f=fft2c(jnp.asarray(raw.images, dtype).astype(cdt)),
        rotations=jnp.asarray(raw.rotations, dtype),
        shifts=jnp.asarray(raw.shifts, dtype),
        ctf=None if raw.ctf is None else CTFParams(*(jnp.asarray(f, dtype) for f in raw.ctf)),
        weights=jnp.asarray(raw.weights, dtype),
        mask=jnp.asarray(raw.mask, dtype),
    )


def iterate_batches(source, batch_size: int, indices=None, rng=None):
    """Yield :class:`RawBatch` es covering ``indices`` (default all) once, padded to ``batch_size``."""
    if indices is None:
        indices = np.arange(len(source.metadata))
    for idx, mask in epoch_batches(indices, batch_size, rng):
        yield load_batch(source, idx, mask)
