"""The in-memory description of a particle set: poses, shifts, CTF and where each image lives.

Every reader (RELION STAR, cryoSPARC .cs, cryoDRGN pickles) converts its file's conventions into a
:class:`ParticleMetadata`; everything downstream sees only this, in RELION's conventions:

* ``rotations``: RELION matrices ``A`` (see :mod:`jaxcryo.rotations`), ``(n, 3, 3)`` float64;
* ``shifts``: RELION origins ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å, ``(n, 2)`` float64 (the particle
  sits at ``-origin`` from the box centre, so the image is the projection shifted by ``-origin``);
* ``ctf``: :class:`jaxcryo.ctf.CTFParams` with ``(n,)`` NumPy fields, or ``None`` (CTF off);
* ``image_files`` / ``image_indices``: absolute path of the stack holding each image and the 0-based index
  of the image in it;
* ``pixel_size`` (Å/px) and ``box`` (px) of the images;
* ``contrast_sign``: +1, or -1 where the images have inverted contrast (cryoSPARC ``blob/sign``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .ctf import CTFParams


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
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.image_indices))

    @property
    def has_poses(self) -> bool:
        return self.rotations is not None

    def subset(self, idx) -> "ParticleMetadata":
        """The particles selected by ``idx`` (integer array or boolean mask)."""
        idx = np.asarray(idx)
        return dataclasses.replace(
            self,
            rotations=None if self.rotations is None else self.rotations[idx],
            shifts=self.shifts[idx],
            ctf=None if self.ctf is None else self.ctf.take(idx),
            image_files=self.image_files[idx],
            image_indices=self.image_indices[idx],
            contrast_sign=None if self.contrast_sign is None else self.contrast_sign[idx],
            extra={k: (v[idx] if isinstance(v, np.ndarray) and len(v) == len(self) else v)
                   for k, v in self.extra.items()},
        )
