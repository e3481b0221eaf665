"""Particle sources: where images and their metadata come from.

Everything downstream takes a :class:`ParticleSource` (metadata in RELION conventions + ``images(idx)``):

* :class:`ParticleDataset`: a RELION ``.star`` / cryoSPARC ``.cs`` file (:func:`read_particles`), images
  read lazily a batch at a time from the stacks, so memory does not grow with the number of particles;
* :class:`ArrayDataset`: images already in memory (tests, notebooks, benchmarks);
* :class:`CroppedSource`: another source Fourier-cropped to a smaller box.

Also the one half-set split (:func:`split_halves`) and :func:`write_dataset` (STAR + MRCS).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int

from ..errors import InputError
from ..ndimage._fourier import resample_real
from ..io.cryodrgn import apply_poses
from ..io.cryosparc import read_cs
from ..io.mrc import StackReader, write_stack
from ..io.star import read_star, write_star
from ..forward._particles import ParticleMetadata


@runtime_checkable
class ParticleSource(Protocol):
    """What every consumer of particles needs: the metadata (RELION conventions) and the images.

    ``images(idx)`` returns real-space images ``(len(idx), box, box)`` float32 with the contrast sign
    applied. Implementations: :class:`ParticleDataset` (file-backed), :class:`ArrayDataset` (in memory),
    :class:`CroppedSource` (a Fourier-cropped view of another source).
    """

    metadata: ParticleMetadata

    def __len__(self) -> int: ...

    def images(self, idx: Int[ArrayLike, " k"]) -> Float[np.ndarray, "k n n"]: ...


def read_particles(path, datadir=None, apix: float | None = None, poses=None) -> ParticleMetadata:
    """Read particle metadata from a RELION ``.star`` or cryoSPARC ``.cs`` file (and optionally replace the
    poses by a cryoDRGN pose pickle)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".star":
        md = read_star(path, datadir=datadir, apix=apix)
    elif path.suffix == ".cs":
        md = read_cs(path, datadir=datadir, apix=apix)
    else:
        raise InputError(f"{path}: unknown particle file type {path.suffix!r}; expected .star or .cs")
    if poses is not None:
        md = apply_poses(md, poses)
    return md


def require_poses(md: ParticleMetadata) -> ParticleMetadata:
    """Return ``md``, or raise :class:`InputError` naming the file if it has no poses."""
    if md.rotations is None:
        src = md.source or "particles"
        if md.missing_poses == "alignments3D":
            raise InputError(f"{src}: has no alignments3D (no 3D poses); use a refinement's particles .cs "
                             "or give {param} (a cryoDRGN pose pickle)", param="poses")
        raise InputError(f"{src}: no poses (rlnAngleRot/rlnAngleTilt/rlnAnglePsi missing); "
                         "give {param} (a cryoDRGN pose pickle)", param="poses")
    return md


class ParticleDataset:
    """Particle metadata plus lazy access to the images: each :meth:`images` call reads just those images
    from their stacks (:class:`~jaxcryo.io.mrc.StackReader`: plain file reads, nothing memory-mapped).

    Args:
        metadata: :class:`ParticleMetadata`.
        max_open: readers (a stack's header layout; no open file or map) kept at once, least recently used
            dropped beyond. The default keeps every stack of a large set (one per micrograph) known: a random
            batch touches many stacks, and re-reading a header costs about a millisecond.
    """

    def __init__(self, metadata: ParticleMetadata, max_open: int = 100_000):
        self.metadata = metadata
        self._stacks: OrderedDict = OrderedDict()
        self._max_open = max_open
        self._lock = threading.RLock()  # images() may be called from several threads (halves, prefetch)

    @classmethod
    def from_file(cls, path, datadir=None, apix: float | None = None, poses=None) -> "ParticleDataset":
        return cls(read_particles(path, datadir=datadir, apix=apix, poses=poses))

    def __len__(self) -> int:
        return len(self.metadata)

    def _stack(self, f):
        if f in self._stacks:
            self._stacks.move_to_end(f)
            return self._stacks[f]
        if not Path(f).exists():
            raise InputError(f"{f}: image stack not found (referenced by {self.metadata.source}); "
                             "check the path or give {param}", param="datadir")
        s = StackReader(f)
        self._stacks[f] = s
        if len(self._stacks) > self._max_open:
            self._stacks.popitem(last=False)
        return s

    def images(self, idx: Int[ArrayLike, " k"]) -> Float[np.ndarray, "k n n"]:
        """Real-space images ``(k, box, box)`` float32 for particle indices ``idx`` (contrast sign applied).
        Thread-safe."""
        with self._lock:
            return self._images(idx)

    def _images(self, idx) -> np.ndarray:
        md = self.metadata
        idx = np.atleast_1d(np.asarray(idx))
        out = np.empty((len(idx), md.box, md.box), np.float32)
        files = md.image_files[idx]
        for f in np.unique(files):
            sel = np.flatnonzero(files == f)
            stack = self._stack(f)
            j = md.image_indices[idx[sel]]
            if j.max() >= stack.shape[0] or j.min() < 0:
                bad = int(j[(j >= stack.shape[0]) | (j < 0)][0])
                raise InputError(f"{f}: image index {bad + 1} out of range (stack has {stack.shape[0]} images)")
            if stack.shape[1:] != (md.box, md.box):
                raise InputError(f"{f}: images are {stack.shape[2]}x{stack.shape[1]}, expected {md.box}x{md.box}")
            order = np.argsort(j)  # sorted reads are friendlier to memory maps
            out[sel[order]] = stack[j[order]]
        if md.contrast_sign is not None:
            out *= np.asarray(md.contrast_sign, np.float32)[idx, None, None]
        return out

    def validate(self, check_images: bool = True) -> None:
        """Check the metadata and, with ``check_images``, that every stack exists, every index is in range
        and the images are square and of the metadata's box (per particle for mixed optics groups).

        Raises :class:`InputError` naming the file and the problem. Reads stack headers only; use
        :meth:`find_bad_images` to scan the pixel values.
        """
        md = self.metadata
        src = md.source or "particles"
        n = len(md)
        if n == 0:
            raise InputError(f"{src}: no particles")
        if np.any(np.asarray(md.image_indices) < 0):
            raise InputError(f"{src}: negative image index")
        if md.rotations is not None and not np.all(np.isfinite(md.rotations)):
            first = int(np.flatnonzero(~np.isfinite(md.rotations).all(axis=(1, 2)))[0])
            raise InputError(f"{src}: poses contain NaN or inf (particle {first})")
        if not np.all(np.isfinite(md.shifts)):
            raise InputError(f"{src}: shifts contain NaN or inf")
        if md.ctf is not None:
            for name, v in zip(md.ctf._fields, md.ctf):
                if not np.all(np.isfinite(np.asarray(v))):
                    raise InputError(f"{src}: CTF field {name} contains NaN or inf")
        if not check_images:
            return
        box_per = md.box_per_particle
        if not (isinstance(box_per, np.ndarray) and box_per.shape == (n,)):
            box_per = np.full(n, md.box)
        for f in np.unique(md.image_files):
            sel = md.image_files == f
            stack = self._stack(f)
            count, h, w = stack.shape
            expect = np.unique(box_per[sel])
            if h != w:
                raise InputError(f"{f}: images are {w}x{h}, expected square {int(expect[0])}x{int(expect[0])}")
            if len(expect) != 1 or int(expect[0]) != h:
                raise InputError(f"{f}: images are {w}x{h}, expected {int(expect[0])}x{int(expect[0])} "
                                 f"(the image size in {src})")
            j = md.image_indices[sel]
            if j.size and j.max() >= count:
                raise InputError(f"{f}: image index {int(j.max()) + 1} out of range (stack has {count} images)")

    def find_bad_images(self, chunk: int = 1024) -> Bool[np.ndarray, " n"]:
        """Boolean mask of the particles whose image contains NaN or inf.

        Streams through the data ``chunk`` images at a time (in file order), so memory stays bounded.
        """
        bad = np.zeros(len(self), bool)
        order = np.lexsort((self.metadata.image_indices, self.metadata.image_files.astype(str)))
        for s in range(0, len(self), chunk):
            idx = order[s:s + chunk]
            imgs = self.images(idx)
            bad[idx] = ~np.isfinite(imgs).all(axis=(1, 2))
        return bad


    def split_halves(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:func:`split_halves` of this set's metadata."""
        return split_halves(self.metadata, seed)


class ArrayDataset:
    """Particles whose images are already in memory (``(n, box, box)`` float32)."""

    def __init__(self, metadata: ParticleMetadata, images: Float[ArrayLike, "n box box"]):
        if len(images) != len(metadata):
            raise ValueError(f"{len(images)} images for {len(metadata)} particles")
        self.metadata = metadata
        self._images = np.asarray(images, np.float32)

    def __len__(self) -> int:
        return len(self.metadata)

    def images(self, idx: Int[ArrayLike, " k"]) -> Float[np.ndarray, "k n n"]:
        idx = np.asarray(idx)
        imgs = self._images[idx]
        if self.metadata.contrast_sign is not None:
            imgs = imgs * np.asarray(self.metadata.contrast_sign, np.float32)[idx, None, None]
        return imgs


class CroppedSource:
    """A view of a particle source with the images Fourier-cropped to ``box`` (pixel size scaled)."""

    def __init__(self, source: ParticleSource, box: int):
        md = source.metadata
        if box > md.box:
            raise InputError(f"{{param}} {box} is larger than the images ({md.box} px)", param="box")
        self.source = source
        self.box = box
        self.metadata = dataclasses.replace(md, box=box, pixel_size=md.pixel_size * md.box / box)

    def __len__(self) -> int:
        return len(self.metadata)

    def images(self, idx: Int[ArrayLike, " k"]) -> Float[np.ndarray, "k n n"]:
        imgs = self.source.images(idx)
        return np.asarray(resample_real(jnp.asarray(imgs), self.box, 2), np.float32)


def split_halves(md: ParticleMetadata, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the particle indices (sorted): RELION's ``rlnRandomSubset`` (1/2, the
    metadata's ``random_subset``) when present and valid, else a permutation seeded by ``seed``."""
    sub = md.random_subset
    if isinstance(sub, np.ndarray) and sub.shape == (len(md),) and set(np.unique(sub).tolist()) == {1, 2}:
        return np.flatnonzero(sub == 1), np.flatnonzero(sub == 2)
    perm = np.random.default_rng([seed, 12345]).permutation(len(md))
    h = len(perm) // 2
    return np.sort(perm[:h]), np.sort(perm[h:])


def write_dataset(out_dir, metadata: ParticleMetadata, images: Float[ArrayLike, "k n n"],
                  stack_name: str = "particles.mrcs",
                  star_name: str = "particles.star") -> Path:
    """Write images as ``out_dir/stack_name`` and metadata as a RELION 3.1 ``out_dir/star_name``.

    ``images`` are ``(n, box, box)`` as stored (before ``contrast_sign``); they are written multiplied by
    ``metadata.contrast_sign`` where present, so the pair reads back (by RELION or :func:`read_particles`)
    to the same images. Both files are written atomically. Returns the STAR path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, np.float32)
    if images.ndim != 3 or len(images) != len(metadata):
        raise ValueError(f"write_dataset: {images.shape} images for {len(metadata)} particles")
    if metadata.contrast_sign is not None:  # RELION has no sign field: write the images in its contrast
        images = images * np.asarray(metadata.contrast_sign, np.float32)[:, None, None]
    write_stack(out / stack_name, images, metadata.pixel_size)
    md = dataclasses.replace(
        metadata, image_files=np.array([str((out / stack_name).resolve())] * len(metadata), dtype=object),
        image_indices=np.arange(len(metadata)), contrast_sign=None,
    )
    write_star(out / star_name, md)
    return out / star_name
