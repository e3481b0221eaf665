"""Particle sources at assigned poses: the same images with other poses (hard assignment), and each image
at its top-K candidates with their posterior weights (soft assignment), as the volume updates read them."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
from jaxtyping import Float

from ..data._batch import RawBatch
from ..data._sources import ArrayDataset, ParticleDataset


def with_poses(source, rotations: Float[np.ndarray, "n 3 3"], shifts: Float[np.ndarray, "n 2"]):
    """The same images as ``source`` with other poses (``rotations`` RELION matrices, ``shifts`` Å): a new
    source sharing the images (and, for a :class:`~jaxcryo.data.ParticleDataset`, its open stacks)."""
    md = dataclasses.replace(source.metadata, rotations=np.asarray(rotations, np.float64),
                             shifts=np.asarray(shifts, np.float64), missing_poses=None)
    if isinstance(source, ArrayDataset):
        return ArrayDataset(md, source._images)
    if isinstance(source, ParticleDataset):
        ds = ParticleDataset(md)
        ds._stacks, ds._lock = source._stacks, source._lock  # share the open stacks (and their lock)
        return ds
    new = copy.copy(source)  # another source: the same attributes, other metadata
    new.metadata = md
    return new


class SoftPoses:
    """A particle source for soft assignment: each particle of ``source`` repeated as ``K`` rows (row
    ``i * K + k`` is particle ``i`` at its ``k``-th candidate pose), with per-row ``weights`` (``K`` x the
    posterior weight, so each particle's rows average 1 and the objective keeps its per-image scale). The
    images are read from ``source`` (each distinct image once per batch); :func:`jaxcryo.data.load_batch`
    reads the ``weights`` attribute."""

    def __init__(self, source, rotations: Float[np.ndarray, "n k 3 3"], shifts: Float[np.ndarray, "n k 2"],
                 weights: Float[np.ndarray, "n k"]):
        n, k = np.shape(weights)
        self.base, self.k = source, k
        self.rows = np.repeat(np.arange(n), k)
        md = source.metadata.subset(self.rows)
        self.metadata = dataclasses.replace(md, rotations=np.asarray(rotations, np.float64).reshape(n * k, 3, 3),
                                            shifts=np.asarray(shifts, np.float64).reshape(n * k, 2),
                                            missing_poses=None)
        self.weights = (k * np.asarray(weights, np.float64)).reshape(n * k).astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, idx) -> np.ndarray:
        return self.base.images(self.rows[np.asarray(idx)])

    def row_indices(self, idx) -> np.ndarray:
        """The rows of particles ``idx``."""
        return (np.asarray(idx)[:, None] * self.k + np.arange(self.k)).reshape(-1)


def soft_batch(raw: RawBatch, rotations: Float[np.ndarray, "b k 3 3"], shifts: Float[np.ndarray, "b k 2"],
               weights: Float[np.ndarray, "b k"]) -> RawBatch:
    """The minibatch ``raw`` with each image repeated at its ``K`` candidate poses (row ``i * K + k``), each
    row weighted by ``K`` x its posterior weight (each image's rows average its own weight, as
    :class:`jaxcryo.poses.SoftPoses`); hard assignment is ``K = 1`` with weight 1."""
    b, k = np.shape(weights)

    def rep(x):
        return np.repeat(np.asarray(x), k, axis=0)

    ctf = None if raw.ctf is None else type(raw.ctf)(*(rep(f) for f in raw.ctf))
    w = rep(raw.weights) * (k * np.asarray(weights, np.float32)).reshape(b * k)
    return RawBatch(images=rep(raw.images), rotations=np.asarray(rotations, np.float32).reshape(b * k, 3, 3),
                    shifts=np.asarray(shifts, np.float32).reshape(b * k, 2), ctf=ctf,
                    weights=w.astype(np.float32), mask=rep(raw.mask))
