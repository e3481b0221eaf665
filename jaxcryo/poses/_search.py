"""The pose-search engine: a search method as a type, run by one loop.

A **search method** (:class:`AbstractSearchMethod`) says which candidate poses each image is scored at and
how the candidates are turned into an assignment; it is a small :class:`equinox.Module` traced inside one
jitted function per batch:

* :class:`GlobalSearch`: a rotation grid (:func:`jaxcryo.rotations.so3_grid`) x a shift grid
  (:func:`jaxcryo.rotations.shift_grid`) shared by every image;
* :class:`LocalSearch`: each image's own local grid (:func:`jaxcryo.rotations.local_grid`, ``+- radius``
  in steps of ``step``) around its current pose, and a shift grid around its current origin;
* :class:`Cascade`: methods run one after the other, each starting from the best pose of the one before
  (a global search refined by local searches at finer steps).

A branch-and-bound search or a marginalised one is one more subclass: it implements
:meth:`~AbstractSearchMethod.search` (what to score, from the :class:`Scorer`) and
:meth:`~AbstractSearchMethod.candidates_per_image` (for the memory bound).

The **score** (:class:`Scorer`) is the one place where the likelihood is defined: the Gaussian
log-likelihood of :mod:`jaxcryo.poses` (:func:`~jaxcryo.poses.score_poses`,
:func:`~jaxcryo.poses.score_local`) at ``|k| <= kmax``. A per-shell noise spectrum (a whitened likelihood),
a prior on the offsets, or a mask on the reference belong there, once, for every method.

The **loop** (:class:`PoseSearch`) runs a method over particles of a source (or over a batch already
read): images in chunks whose score entries (``images x candidates``) stay below a stated ``memory`` bound,
each chunk padded to a static shape and split over the devices of a mesh under :func:`jax.shard_map` (pose
scoring is independent per image: the map is replicated, nothing is reduced), hard (``top_k = 1``) or
top-K assignment (:func:`assign_poses`), and a typed :class:`SearchResult` (NumPy, float64).
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float
from tqdm.auto import tqdm

from .. import parallel
from ..data._batch import Batch, RawBatch, epoch_batches, to_batch
from ..forward._projection import Projector
from ..rotations._grids import local_grid, local_offsets
from ._scoring import best_poses, score_local, score_pixels, score_poses, soft_weights


class SearchResult(NamedTuple):
    """Each image's ``K`` most likely candidates, best first (``K = 1``: hard assignment).

    Attributes:
        rotations: ``(B, K, 3, 3)`` RELION matrices.
        shifts: ``(B, K, 2)`` origins (Å).
        scores: ``(B, K)`` their log-likelihood scores.
        weights: ``(B, K)`` posterior weights (summing to 1 per image; ones for ``K = 1``).
    """

    rotations: Any
    shifts: Any
    scores: Any
    weights: Any


#: The name of the assignment before the engine (same tuple).
Assignment = SearchResult


def assign_poses(scores: Float[Array, "b r t"], rotations: Float[Array, "r 3 3"] | Float[Array, "b r 3 3"],
                 shifts: Float[Array, "t 2"] | Float[Array, "b t 2"], top_k: int = 1,
                 n_pixels: int | None = None, log_prior: Float[Array, "b 1 t"] | None = None) -> SearchResult:
    """Hard (``top_k=1``: :func:`jaxcryo.poses.best_poses`) or soft assignment from the scores of
    :func:`jaxcryo.poses.score_poses` / :func:`~jaxcryo.poses.score_local` (``rotations``, ``shifts``: the
    candidates, shared or per image).

    Soft: the scores are log-likelihoods for unit noise variance (the objective's), so before the softmax of
    :func:`jaxcryo.poses.soft_weights` each image's scores are divided by its own noise variance estimated
    from its best residual, ``sigma_i^2 = -2 max L_i / n_pixels`` (the mean squared residual per scored pixel
    at the best pose, an upper bound on the noise variance: weights at least as broad as the data's, as
    RELION's residual-based noise estimate). Per image, so the result does not depend on the batch or the
    number of devices. ``log_prior`` (broadcast to the scores): the part of ``scores`` that is a prior (the
    :class:`Scorer`'s offset prior, already added to them): it is left out of the noise estimate and not
    divided by it, so the weights are ``softmax((scores - log_prior) / sigma_i^2 + log_prior)``. Pure,
    jittable (``top_k`` and ``n_pixels`` static)."""
    rotations, shifts = jnp.asarray(rotations), jnp.asarray(shifts)
    scores = jnp.asarray(scores)
    if top_k == 1:
        b = best_poses(scores, rotations, shifts)
        ones = jnp.ones((b.rotations.shape[0], 1), scores.dtype)
        return SearchResult(b.rotations[:, None], b.shifts[:, None], b.score[:, None], ones)
    if n_pixels is None:
        raise ValueError("soft assignment (top_k > 1) needs n_pixels, the number of scored pixels")
    like = scores if log_prior is None else scores - log_prior
    best = jnp.max(like, axis=(1, 2))
    sigma2 = jnp.maximum(-2.0 * best / n_pixels, jnp.finfo(scores.dtype).tiny)  # padding (score 0): no matter
    pw = soft_weights(like / sigma2[:, None, None] + (0.0 if log_prior is None else log_prior), top_k)
    rows = jnp.arange(scores.shape[0])[:, None]
    rot = rotations[pw.rotation_index] if rotations.ndim == 3 else rotations[rows, pw.rotation_index]
    sh = shifts[pw.shift_index] if shifts.ndim == 2 else shifts[rows, pw.shift_index]
    return SearchResult(rot, sh, scores[rows, pw.rotation_index, pw.shift_index], pw.weights)


class Scorer(eqx.Module, strict=True):
    """The score of a candidate pose: the Gaussian log-likelihood of :mod:`jaxcryo.poses` over the image
    pixels with ``|k| <= kmax`` (static: one compilation per value). Every search method scores through it,
    so a change of the likelihood is made here once:

    * ``shell_weights`` ``(S,)``: each pixel's term weighted by its Fourier shell's weight (e.g. the inverse
      of a per-shell noise power relative to the images' own: a whitened likelihood); ``None``: ones;
    * ``offset_sigma`` (Å): a Gaussian prior on the origin, ``-|o - o_i|^2 / (2 sigma^2)`` added to the
      log-likelihood, centred at each image's current origin ``o_i`` (the batch's shifts); ``None``: flat.
    """

    projector: Projector = eqx.field(static=True)
    kmax: float = eqx.field(static=True)
    shell_weights: Float[Array, " s"] | None = None
    offset_sigma: float | None = eqx.field(static=True, default=None)

    @property
    def n_pixels(self) -> int:
        """The number of scored pixels per image (:func:`jaxcryo.poses.score_pixels`)."""
        return int(score_pixels(self.projector, self.kmax).size)

    def assign(self, scores: Float[Array, "b r t"], batch: Batch, rotations, shifts, top_k: int) -> SearchResult:
        """:func:`assign_poses` of this scorer's ``scores`` (the offset prior, if any, kept out of the noise
        estimate of soft assignment)."""
        prior = None if self.offset_sigma is None else self._prior(batch, shifts)
        return assign_poses(scores, rotations, shifts, top_k, self.n_pixels, log_prior=prior)

    def _prior(self, batch: Batch, shifts: Float[Array, "t 2"] | Float[Array, "b t 2"]) -> Float[Array, "b 1 t"]:
        """The offset prior's log density ``(B, 1, T)`` (0 for padding images)."""
        assert self.offset_sigma is not None
        d = shifts - batch.shifts[:, None, :].astype(shifts.dtype)  # (B, T, 2)
        return (-0.5 * jnp.sum(d * d, axis=-1) / self.offset_sigma ** 2 * batch.mask[:, None])[:, None, :]

    def shared(self, vol_f: Complex[Array, "n n n"], batch: Batch, rotations: Float[Array, "r 3 3"],
               shifts: Float[Array, "t 2"]) -> Float[Array, "b r t"]:
        """Scores at rotations and shifts shared by the batch."""
        sc = score_poses(vol_f, batch, self.projector, rotations, shifts, kmax=self.kmax,
                         shell_weights=self.shell_weights)
        return sc if self.offset_sigma is None else sc + self._prior(batch, shifts)

    def per_image(self, vol_f: Complex[Array, "n n n"], batch: Batch, rotations: Float[Array, "b q 3 3"],
                  shifts: Float[Array, "b t 2"]) -> Float[Array, "b q t"]:
        """Scores at each image's own candidate rotations and shifts."""
        sc = score_local(vol_f, batch, self.projector, rotations, shifts, kmax=self.kmax,
                         shell_weights=self.shell_weights)
        return sc if self.offset_sigma is None else sc + self._prior(batch, shifts)


class AbstractSearchMethod(eqx.Module, strict=True):
    """Which candidates each image is scored at, and how they become an assignment (module docstring)."""

    @property
    @abc.abstractmethod
    def needs_start(self) -> bool:
        """The method starts from each image's current pose (``rotations``, ``shifts`` of :meth:`search`)."""

    @abc.abstractmethod
    def search(self, scorer: Scorer, vol_f: Complex[Array, "n n n"], batch: Batch,
               rotations: Float[Array, "b 3 3"] | None, shifts: Float[Array, "b 2"] | None) -> SearchResult:
        """The assignment of every image of ``batch`` (traced inside the engine's jitted function);
        ``rotations``/``shifts``: the current poses (``None`` unless :attr:`needs_start`)."""

    @abc.abstractmethod
    def candidates_per_image(self) -> int:
        """Score entries (candidate rotations x shifts) held at once per image: the memory bound's unit."""


class GlobalSearch(AbstractSearchMethod, strict=True):
    """Every image at every rotation of ``rotations`` ``(R, 3, 3)`` x every shift of ``shifts`` ``(T, 2)``
    (Å); the ``top_k`` best kept."""

    rotations: Float[Array, "r 3 3"]
    shifts: Float[Array, "t 2"]
    top_k: int = eqx.field(static=True, default=1)

    @property
    def needs_start(self) -> bool:
        return False

    def search(self, scorer, vol_f, batch, rotations=None, shifts=None) -> SearchResult:
        sc = scorer.shared(vol_f, batch, self.rotations, self.shifts)
        return scorer.assign(sc, batch, self.rotations, self.shifts, self.top_k)

    def candidates_per_image(self) -> int:
        return int(self.rotations.shape[0] * self.shifts.shape[0])


class LocalSearch(AbstractSearchMethod, strict=True):
    """Each image at :func:`jaxcryo.rotations.local_grid` ``(step, radius)`` (degrees) around its current
    rotation x its current origin plus ``shifts`` ``(T, 2)`` (Å offsets); the ``top_k`` best kept."""

    step: float = eqx.field(static=True)
    radius: float = eqx.field(static=True)
    shifts: Float[Array, "t 2"]
    top_k: int = eqx.field(static=True, default=1)

    @property
    def needs_start(self) -> bool:
        return True

    def search(self, scorer, vol_f, batch, rotations=None, shifts=None) -> SearchResult:
        assert rotations is not None and shifts is not None  # needs_start: the engine passes them
        cand = local_grid(rotations, self.step, self.radius)
        csh = shifts[:, None, :] + self.shifts[None].astype(shifts.dtype)
        sc = scorer.per_image(vol_f, batch, cand, csh)
        return scorer.assign(sc, batch, cand, csh, self.top_k)

    def candidates_per_image(self) -> int:
        return int(local_offsets(self.step, self.radius).shape[0] * self.shifts.shape[0])


class Cascade(AbstractSearchMethod, strict=True):
    """``stages`` one after the other, each from the best pose of the one before; the last one's assignment
    (its ``top_k``) is the result."""

    stages: tuple[AbstractSearchMethod, ...]

    @property
    def needs_start(self) -> bool:
        return self.stages[0].needs_start

    def search(self, scorer, vol_f, batch, rotations=None, shifts=None) -> SearchResult:
        res = None
        for stage in self.stages:
            res = stage.search(scorer, vol_f, batch, rotations, shifts)
            rotations, shifts = res.rotations[:, 0], res.shifts[:, 0]
        assert res is not None
        return res

    def candidates_per_image(self) -> int:
        return max(s.candidates_per_image() for s in self.stages)


def orthonormalise(r: Float[np.ndarray, "... 3 3"]) -> Float[np.ndarray, "... 3 3"]:
    """The nearest rotation matrices (SVD; determinant +1) to ``r`` (float32 products drift off SO(3))."""
    u, _, vt = np.linalg.svd(np.asarray(r, np.float64))
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, -1] *= d[..., None]
    return u @ vt


def _take(raw: RawBatch, pos: np.ndarray, mask: np.ndarray) -> RawBatch:
    """Rows ``pos`` of a batch read already, with ``mask`` (padding) on top of its own."""
    rows = jax.tree_util.tree_map(lambda x: np.asarray(x)[pos], raw)
    return rows._replace(mask=rows.mask * mask)


class PoseSearch:
    """The one loop of every pose search (module docstring).

    Args:
        projector: the scoring forward model (box, pixel size, slice operator).
        batch_size: images per jitted call at most.
        memory: score entries (images x candidates per image) held at once at most: each call scores
            ``min(batch_size, memory // method.candidates_per_image())`` images (at least one).
        mesh: a 1-D device mesh (:func:`jaxcryo.parallel.resolve_mesh`): each call's images (padded to a
            multiple of its size) are split over its devices; ``None``: one device.

    ``traced_batch_shapes``: the per-device batch each trace of the search saw (``B / D`` on ``D`` devices).
    """

    def __init__(self, projector: Projector, batch_size: int, memory: int = 1 << 26, mesh=None):
        self.projector, self.batch_size, self.memory = projector, int(batch_size), int(memory)
        self.mesh = mesh if parallel.mesh_size(mesh) > 1 else None
        self.traced_batch_shapes: list[int] = []

        def body(method, scorer, vol_f, raw, rotations, shifts):
            self.traced_batch_shapes.append(int(raw.images.shape[0]))
            return method.search(scorer, vol_f, to_batch(raw), rotations, shifts)

        if self.mesh is None:
            self._fn = jax.jit(body)
        else:
            rep, spec = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(parallel.AXIS)
            self._fn = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(rep, rep, rep, spec, spec, spec),
                                             out_specs=spec))

    def chunk(self, method: AbstractSearchMethod) -> int:
        """Images per call for ``method`` under the memory bound."""
        return int(max(1, min(self.batch_size, self.memory // max(1, method.candidates_per_image()))))

    def __call__(self, method: AbstractSearchMethod, vol_f: Complex[Array, "n n n"], kmax: float, images,
                 indices: np.ndarray | None = None, rotations: Float[np.ndarray, "m 3 3"] | None = None,
                 shifts: Float[np.ndarray, "m 2"] | None = None, progress: bool = False,
                 desc: str = "pose search", shell_weights: Float[ArrayLike, " s"] | None = None,
                 offset_sigma: float | None = None) -> SearchResult:
        """Run ``method`` on the particles ``indices`` of the source ``images`` (or on every row of a
        :class:`~jaxcryo.data.RawBatch` read already) against ``vol_f`` at ``kmax``.

        ``rotations`` ``(M, 3, 3)`` and ``shifts`` ``(M, 2)`` (Å): each image's current pose, in the order of
        ``indices`` (needed by methods that start from one). Returns a :class:`SearchResult` of NumPy arrays
        (float64, rotations orthonormalised) in the same order; padding rows of a batch get their results too.
        ``shell_weights``, ``offset_sigma``: the likelihood's options (:class:`Scorer`).
        """
        mesh = self.mesh
        n = len(images.mask) if isinstance(images, RawBatch) else (
            len(images.metadata) if indices is None else len(indices))
        idx = np.arange(n) if indices is None else np.asarray(indices)

        def read(pos: np.ndarray, mask: np.ndarray):
            if isinstance(images, RawBatch):
                return parallel.shard_batch(_take(images, pos, mask), mesh)
            return parallel.load_sharded(images, idx[pos], mask, mesh)

        if method.needs_start and (rotations is None or shifts is None):
            raise ValueError(f"{type(method).__name__} starts from the current poses: pass rotations and shifts")
        weights = None if shell_weights is None else jnp.asarray(shell_weights, jnp.float32)
        scorer = Scorer(self.projector, float(kmax), weights, None if offset_sigma is None else float(offset_sigma))
        vol_f = parallel.replicate(vol_f, mesh)
        out: list[np.ndarray] | None = None
        batches = epoch_batches(np.arange(n), self.chunk(method), multiple=parallel.mesh_size(mesh))
        for pos, mask in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            raw = read(pos, mask)
            r0 = s0 = None
            if method.needs_start and rotations is not None and shifts is not None:
                r0, s0 = parallel.shard_batch((np.asarray(rotations[pos], np.float32),
                                               np.asarray(shifts[pos], np.float32)), mesh)
            res = self._fn(method, scorer, vol_f, raw, r0, s0)
            res = [np.asarray(x, np.float64) for x in res]
            if out is None:
                out = [np.zeros((n,) + x.shape[1:]) for x in res]
            keep = np.asarray(mask) > 0
            for o, x in zip(out, res):
                o[pos[keep]] = x[keep]
        assert out is not None, "no images to search"
        return SearchResult(orthonormalise(out[0]), out[1], out[2], out[3])
