"""The in-memory description of a particle set: poses, shifts, CTF and where each image lives.

Every reader (RELION STAR, cryoSPARC .cs, cryoDRGN pickles) converts its file's conventions into a
:class:`ParticleMetadata`; everything downstream sees only this, in RELION's conventions:

* ``rotations``: RELION matrices ``A`` (see :mod:`jaxcryo.rotations`), ``(n, 3, 3)`` float64;
* ``shifts``: RELION origins ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å, ``(n, 2)`` float64 (the particle
  sits at ``-origin`` from the box centre, so the image is the projection shifted by ``-origin``);
* ``ctf``: :class:`jaxcryo.forward.CTFParams` with ``(n,)`` NumPy fields, or ``None`` (CTF off);
* ``image_files`` / ``image_indices``: absolute path of the stack holding each image and the 0-based index
  of the image in it;
* ``pixel_size`` (Å/px) and ``box`` (px) of the images;
* ``contrast_sign``: +1, or -1 where the images have inverted contrast (cryoSPARC ``blob/sign``).

What the readers find beyond that is kept in typed fields (``None`` / ``False`` when the file says nothing):

* ``random_subset``: ``(n,)`` int64 half-set 1 or 2 (RELION ``rlnRandomSubset``, cryoSPARC
  ``alignments3D/split + 1``);
* ``missing_poses``: why ``rotations`` is ``None`` (``"alignments3D"`` for a ``.cs`` without it, or the
  missing STAR columns, e.g. ``"rlnAngleRot/rlnAngleTilt/rlnAnglePsi"``);
* ``optics_group``, ``box_per_particle``, ``pixel_size_per_particle``: ``(n,)`` per particle (STAR optics
  groups); ``mixed_optics``: the groups differ in pixel size or box (``pixel_size``/``box`` are then those
  of the first group);
* ``poses_from``: the cryoDRGN pose pickle whose poses replaced the file's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from jaxtyping import ArrayLike, Bool, Int

from ._ctf import CTFParams


@dataclass
class ParticleMetadata:
    rotations: np.ndarray | None
    shifts: np.ndarray
    ctf: CTFParams | None
    image_files: np.ndarray
    image_indices: np.ndarray
    pixel_size: float
    box: int
    contrast_sign: np.ndarray | None = None
    source: str = ""
    random_subset: np.ndarray | None = None
    missing_poses: str | None = None
    optics_group: np.ndarray | None = None
    box_per_particle: np.ndarray | None = None
    pixel_size_per_particle: np.ndarray | None = None
    mixed_optics: bool = False
    poses_from: str | None = None

    def __len__(self) -> int:
        return int(len(self.image_indices))

    @property
    def has_poses(self) -> bool:
        return self.rotations is not None

    def subset(self, idx: Int[ArrayLike, " k"] | Bool[ArrayLike, " n"]) -> "ParticleMetadata":
        """The particles selected by ``idx`` (integer array or boolean mask)."""
        idx = np.asarray(idx)

        def per(v):  # a per-particle array, sliced; anything else kept
            return v[idx] if isinstance(v, np.ndarray) and v.shape[:1] == (len(self),) else v

        return dataclasses.replace(
            self,
            rotations=None if self.rotations is None else self.rotations[idx],
            shifts=self.shifts[idx],
            ctf=None if self.ctf is None else self.ctf.take(idx),
            image_files=self.image_files[idx],
            image_indices=self.image_indices[idx],
            contrast_sign=None if self.contrast_sign is None else self.contrast_sign[idx],
            random_subset=per(self.random_subset),
            optics_group=per(self.optics_group),
            box_per_particle=per(self.box_per_particle),
            pixel_size_per_particle=per(self.pixel_size_per_particle),
        )
