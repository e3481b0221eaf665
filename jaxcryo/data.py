"""Particle data sets: read any supported file, serve images lazily from memory-mapped stacks.

``ParticleDataset.from_file("particles.star")`` reads the metadata only; images are read on demand, a
batch at a time, from memory-mapped MRC stacks, so memory does not grow with the number of particles.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import InputError
from .particles import ParticleMetadata


def read_particles(path, datadir=None, apix: float | None = None, poses=None) -> ParticleMetadata:
    """Read particle metadata from a RELION ``.star`` or cryoSPARC ``.cs`` file (and optionally replace the
    poses by a cryoDRGN pose pickle)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".star":
        from .io.star import read_star

        md = read_star(path, datadir=datadir, apix=apix)
    elif path.suffix == ".cs":
        from .io.cryosparc import read_cs

        md = read_cs(path, datadir=datadir, apix=apix)
    else:
        raise InputError(f"{path}: unknown particle file type {path.suffix!r}; expected .star or .cs")
    if poses is not None:
        from .io.cryodrgn import apply_poses

        md = apply_poses(md, poses)
    return md


def require_poses(md: ParticleMetadata) -> ParticleMetadata:
    """Raise :class:`InputError` naming the file if ``md`` has no poses."""
    if md.rotations is None:
        why = md.extra.get("missing", "rlnAngleRot/rlnAngleTilt/rlnAnglePsi")
        raise InputError(f"{md.source or 'particles'}: no poses ({why}); give --poses POSES.pkl")
    return md


class ParticleDataset:
    """Particle metadata plus lazy, memory-mapped access to the images.

    Args:
        metadata: :class:`ParticleMetadata`.
        max_open: number of stacks kept open (memory-mapped) at once.
    """

    def __init__(self, metadata: ParticleMetadata, max_open: int = 16):
        self.metadata = metadata
        self._stacks: OrderedDict = OrderedDict()
        self._max_open = max_open

    @classmethod
    def from_file(cls, path, datadir=None, apix: float | None = None, poses=None) -> "ParticleDataset":
        return cls(read_particles(path, datadir=datadir, apix=apix, poses=poses))

    def __len__(self) -> int:
        return len(self.metadata)

    def _stack(self, f):
        from .io.mrc import open_stack

        if f in self._stacks:
            self._stacks.move_to_end(f)
            return self._stacks[f]
        if not Path(f).exists():
            raise InputError(f"{f}: image stack not found (referenced by {self.metadata.source}); "
                             "check the path or give --datadir")
        s = open_stack(f)
        self._stacks[f] = s
        if len(self._stacks) > self._max_open:
            self._stacks.popitem(last=False)
        return s

    def images(self, idx) -> np.ndarray:
        """Real-space images ``(k, box, box)`` float32 for particle indices ``idx`` (contrast sign applied)."""
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
        """Check that every stack exists, indices are in range, and images are square of the metadata box.

        Raises :class:`InputError` naming the stack and the problem. Reads headers only.
        """
        md = self.metadata
        for f in np.unique(md.image_files):
            stack = self._stack(f)
            n, h, w = stack.shape
            if h != w:
                raise InputError(f"{f}: images are {w}x{h}, not square")
            if h != md.box:
                raise InputError(f"{f}: images are {w}x{h}, but the particle file says box {md.box}")
            j = md.image_indices[md.image_files == f]
            if j.size and (j.max() >= n or j.min() < 0):
                bad = int(j[(j >= n) | (j < 0)][0])
                raise InputError(f"{f}: image index {bad + 1} out of range (stack has {n} images)")

    def find_bad_images(self, chunk: int = 1024) -> np.ndarray:
        """Boolean mask of the particles whose image contains NaN or inf (streams through the stacks)."""
        bad = np.zeros(len(self), bool)
        for s in range(0, len(self), chunk):
            idx = np.arange(s, min(s + chunk, len(self)))
            imgs = self.images(idx)
            bad[idx] = ~np.all(np.isfinite(imgs), axis=(1, 2))
        return bad


def write_dataset(out_dir, metadata: ParticleMetadata, images, stack_name: str = "particles.mrcs",
                  star_name: str = "particles.star") -> Path:
    """Write images as ``out_dir/stack_name`` and metadata as a RELION 3.1 ``out_dir/star_name``."""
    import dataclasses

    from .io.mrc import write_stack
    from .io.star import write_star

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_stack(out / stack_name, images, metadata.pixel_size)
    md = dataclasses.replace(
        metadata, image_files=np.array([str((out / stack_name).resolve())] * len(metadata), dtype=object),
        image_indices=np.arange(len(metadata)),
    )
    write_star(out / star_name, md)
    return out / star_name
