"""The one check of every map a command reads: :func:`read_volume`, and the checks where two maps, or a map
and a particle stack, meet (:func:`require_same_grid`, :func:`require_extent`).

A map is read once, through :func:`read_volume`, which knows what the map is for (its :class:`MapRole`) so
that every message says which input is at fault::

    reference NAN.mrc: 32768 of 32768 voxels are NaN

Checked for every map: the file exists and is a readable MRC (or ``.npy``) file, the data are 3D, cubic, with
equal x/y/z pixel sizes, a header pixel size that is > 0 or unset (0), and finite values; a map of one value
everywhere (e.g. all zeros) is refused except as a mask, whose values must lie in [0, 1] and not all be 0.
Everything raises :class:`~jaxcryo.errors.InputError` (the command line: exit code 2 and one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jaxtyping import ArrayLike, Num

from ..errors import InputError, why
from .mrc import read_map

#: Slack on mask values outside [0, 1] (interpolated or low-passed masks overshoot a little).
MASK_TOLERANCE = 1e-3
#: Relative difference of two pixel sizes taken as the same.
PIXEL_RTOL = 1e-3
#: Relative difference of two physical extents (box times pixel size) taken as the same.
EXTENT_RTOL = 0.02


@dataclass(frozen=True)
class MapRole:
    """What a map is for: ``name`` is how messages call it; ``mask``: values in [0, 1], not all 0 (else: not
    one value everywhere)."""

    name: str
    mask: bool = False


REFERENCE = MapRole("reference")
HALF_MAP = MapRole("half map")
MASK = MapRole("mask", mask=True)
VOLUME = MapRole("volume to simulate")
PROJECTED = MapRole("map to project")
COMPARED = MapRole("map to compare")
TRUTH = MapRole("ground truth")
MAP = MapRole("map")

#: The roles by name (``read_volume(path, "half map")``).
ROLES = {r.name: r for r in (REFERENCE, HALF_MAP, MASK, VOLUME, PROJECTED, COMPARED, TRUTH, MAP)}


class Volume(NamedTuple):
    """A checked map: ``data`` ``(n, n, n)`` float32 ``[z, y, x]``, ``pixel_size`` in Å (``None``: unset),
    the ``path`` it came from and its ``role``. ``vol, px = volume[:2]`` unpacks like :func:`read_map`."""

    data: np.ndarray
    pixel_size: float | None
    path: Path
    role: MapRole

    @property
    def label(self) -> str:
        """``"<role> <path>"``, how messages name the map."""
        return f"{self.role.name} {self.path}"

    @property
    def box(self) -> int:
        return int(self.data.shape[0])


def _role(role: MapRole | str) -> MapRole:
    return role if isinstance(role, MapRole) else ROLES.get(str(role), MapRole(str(role)))


def _read_npy(path: Path) -> np.ndarray:
    try:
        vol = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, ... for a bad file
        raise InputError(f"{path}: not a readable .npy array ({why(e)})")
    if not isinstance(vol, np.ndarray) or vol.dtype.kind not in "iuf":
        raise InputError(f"{path}: expected a real-valued array, got {getattr(vol, 'dtype', type(vol))}")
    if vol.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {vol.ndim}D data of shape {vol.shape}")
    if len(set(vol.shape)) != 1:
        raise InputError(f"{path}: map is {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]} (x by y by z), "
                         "not a cubic volume")
    return np.asarray(vol, np.float32)


def check_values(data: Num[ArrayLike, "..."], label: str, role: MapRole | str = MAP) -> None:
    """Raise :class:`InputError` (starting with ``label``) unless ``data`` suits ``role``: all values finite;
    a mask in [0, 1] and not all 0; any other map not one value everywhere."""
    role = _role(role)
    data = np.asarray(data)
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum()) - n_nan
        if n_nan and n_inf:
            raise InputError(f"{label}: {n_nan} NaN and {n_inf} inf of {data.size} voxels")
        k = n_nan + n_inf
        raise InputError(f"{label}: {k} of {data.size} voxels {'is' if k == 1 else 'are'} {'NaN' if n_nan else 'inf'}")
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if role.mask:
        if lo < -MASK_TOLERANCE or hi > 1 + MASK_TOLERANCE:
            raise InputError(f"{label}: values from {lo:.4g} to {hi:.4g}; a mask has values in [0, 1]")
        if hi <= 0:
            raise InputError(f"{label}: empty mask (all {data.size} voxels are 0)")
    elif lo == hi:
        raise InputError(f"{label}: all {data.size} voxels are {lo:g}; an empty map")


def read_volume(path, role: MapRole | str = MAP, values: bool = True) -> Volume:
    """Read and check a map (MRC, or a ``.npy`` array ``[z, y, x]`` without a pixel size) -> :class:`Volume`.

    ``role``: a :class:`MapRole` or its name (``"reference"``, ``"half map"``, ``"mask"``, ``"volume to
    simulate"``, ``"map to project"``, ``"map to compare"``, ``"ground truth"``; any other string is used as
    the name of a plain map). Raises :class:`InputError` starting ``"<role> <path>: "`` for a missing or
    unreadable file, data that is not a cubic 3D map, anisotropic voxels, a negative or non-finite pixel size
    in the header, non-finite values, and values that do not suit the role (:func:`check_values`;
    ``values=False`` leaves that check to the caller, e.g. to compare two maps' grids first).
    A missing pixel size (0 in the header) gives ``pixel_size=None`` and a warning, as :func:`read_map`.
    ``values=False`` leaves the values unchecked, for a caller that first compares two maps' grids
    (:func:`require_same_grid`, whose message names both files) and then calls :func:`check_values`.
    """
    role = _role(role)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{role.name} {path}: {'no such file' if not path.exists() else 'not a file'}")
    try:
        if path.suffix == ".npy":
            data, px = _read_npy(path), None
        else:
            data, px = read_map(path)
    except InputError as e:  # the reader's message starts with the path: say what the map is for
        raise InputError(f"{role.name} {e}") from None
    vol = Volume(data, px, path, role)
    if values:
        check_values(data, vol.label, role)
    return vol


def require_same_grid(first: Volume, second: Volume, pixel_size: bool = True) -> None:
    """Raise :class:`InputError` unless the two maps have the same box and (``pixel_size``, both known) the
    same pixel size within :data:`PIXEL_RTOL`."""
    if first.data.shape != second.data.shape:
        raise InputError(f"{second.label}: box {second.box} differs from {first.label}'s {first.box}; "
                         "the maps must have the same box")
    pa, pb = first.pixel_size, second.pixel_size
    if pixel_size and pa and pb and abs(pa - pb) > PIXEL_RTOL * max(pa, pb):
        raise InputError(f"{second.label}: pixel size {pb:.4g} Å differs from {first.label}'s {pa:.4g} Å; "
                         "the maps must have the same pixel size")


def require_extent(vol: Volume, box: int, pixel_size: float, what: str) -> None:
    """Raise :class:`InputError` unless the map spans the same physical extent (box times pixel size) as
    ``box`` pixels of ``pixel_size`` Å (``what``: e.g. ``"the particles in x.star"``) within
    :data:`EXTENT_RTOL`, so that resampling it to ``box`` keeps its scale. A map without a pixel size passes."""
    px = vol.pixel_size
    if px is None or not pixel_size:
        return
    have, want = vol.box * px, box * float(pixel_size)
    if abs(have - want) > EXTENT_RTOL * want:
        raise InputError(f"{vol.label}: {vol.box} px at {px:.4g} Å ({have:.1f} Å across) does not match {what}: "
                         f"{box} px at {float(pixel_size):.4g} Å ({want:.1f} Å); resample it first")
