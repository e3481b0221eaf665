"""Checks of a particle set before a reconstruction: poses present, one box and pixel size, readable stacks,
finite images; the particles that can be used.

:func:`usable_particles` is what :func:`jaxcryo.solvers.reconstruct` (and so ``jaxcryo reconstruct``) runs
first; refinement and ab initio can run it too. Every problem is an :class:`~jaxcryo.errors.InputError` naming
the file and, where a parameter would fix it, the parameter (``box``, ``skip_bad``, ``poses``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from ..errors import InputError
from ._sources import ParticleDataset, ParticleSource


class Selection(NamedTuple):
    """``indices``: the usable particles (into the source); ``skipped``: how many images were left out as
    non-finite (with ``skip_bad``)."""

    indices: Int[np.ndarray, " k"]
    skipped: int


def find_bad_images(source: ParticleSource, chunk: int = 1024) -> Bool[np.ndarray, " n"]:
    """Boolean mask of the particles of ``source`` whose image contains NaN or inf, read ``chunk`` images at a
    time (in file order for file-backed sources)."""
    if isinstance(source, ParticleDataset):
        return source.find_bad_images(chunk)
    n = len(source)
    bad = np.zeros(n, bool)
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        bad[idx] = ~np.isfinite(source.images(idx)).all(axis=(1, 2))
    return bad


def usable_particles(
    source: ParticleSource,
    *,
    box: int | None = None,
    needs_poses: bool = True,
    skip_bad: bool = False,
    indices: Int[np.ndarray, " k"] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Selection:
    """The particles of ``source`` a reconstruction can use, after checking the set.

    Checks, in order: the poses (with ``needs_poses``); one box and pixel size over the optics groups (mixed
    groups need ``box``, and one pixel size); the stacks (:meth:`ParticleDataset.validate`: files, indices,
    image sizes); ``box`` not larger than the images; the images finite (non-finite ones fail, or with
    ``skip_bad`` are left out and reported through ``warn``); a non-empty selection. ``indices`` restricts the
    particles considered (default all).
    """
    md = source.metadata
    src = md.source or "particles"
    if needs_poses and md.rotations is None:
        why = md.missing_poses or "rlnAngleRot/rlnAngleTilt/rlnAnglePsi or alignments3D"
        raise InputError(f"{src}: no poses ({why}); known-pose reconstruction needs them "
                         "(or give {param}: a cryoDRGN pose pickle)", param="poses")
    if md.mixed_optics and box is None:
        raise InputError(f"{src}: optics groups have different pixel sizes or boxes; give {{param}} to bring them "
                         "to one box", param="box")
    px_all = md.pixel_size_per_particle
    if box is not None and px_all is not None and len(set(np.round(np.asarray(px_all), 6))) > 1:
        raise InputError(f"{src}: optics groups have different pixel sizes "
                         f"({', '.join(f'{p:g}' for p in sorted(set(np.round(np.asarray(px_all), 4))))} A); "
                         "rescaling each group to a common pixel size is not implemented yet, "
                         "select one pixel size (one optics group) per run")
    if isinstance(source, ParticleDataset):
        source.validate(check_images=True)
    if box is not None and box > md.box:
        raise InputError(f"{{param}} {box} is larger than the images ({md.box} px)", param="box")
    indices = np.arange(len(md)) if indices is None else np.asarray(indices)
    bad = find_bad_images(source)[indices]
    skipped = 0
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        where = md.image_files[indices[first]] if md.image_files is not None else src
        if not skip_bad:
            raise InputError(f"{where}: {int(bad.sum())} image(s) contain NaN/inf (first: particle "
                             f"{int(indices[first]) + 1} contains NaN or inf, image "
                             f"{int(md.image_indices[indices[first]]) + 1} of the stack; particles from {src}); "
                             "use {param} to skip them", param="skip_bad")
        skipped = int(bad.sum())
        indices = indices[~bad]
        if warn is not None:
            warn(f"skipping {skipped} image(s) with NaN/inf")
    if len(indices) == 0:
        raise InputError(f"{src}: the selection is empty")
    return Selection(indices, skipped)
