"""MRC maps and MRCS stacks through ``mrcfile``: pixel sizes, axis order, permissive opening.

Volumes are returned ``[z, y, x]`` float32 as MRC stores them (with ``mapc, mapr, maps = 1, 2, 3``).
Stacks are memory-mapped, so a stack larger than memory can be served image by image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError
from .atomic import atomic_path


def _open(path, mmap: bool = False):
    """Open ``path`` read-only; fall back to permissive mode (with a warning) for non-conforming files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return opener(path, mode="r")
    except Exception:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = opener(path, mode="r", permissive=True)
    except Exception as e:
        raise InputError(f"{path}: not a readable MRC file ({e})") from None
    if m.data is None:
        raise InputError(f"{path}: not a readable MRC file (no data)")
    warnings.warn(f"{path}: file does not pass mrcfile's strict checks; opened permissively", stacklevel=3)
    return m


def read_map(path) -> tuple[np.ndarray, float | None]:
    """Read a cubic 3D map -> (``(n, n, n)`` float32 ``[z, y, x]``, pixel size in Å or ``None`` if unset).

    Raises :class:`InputError` for non-cubic maps, a non-standard axis order, or anisotropic voxels.
    """
    path = Path(path)
    with _open(path) as m:
        data = np.asarray(m.data, dtype=np.float32)
        h = m.header
        order = (int(h.mapc), int(h.mapr), int(h.maps))
        vs = m.voxel_size
        sizes = (float(vs.x), float(vs.y), float(vs.z))
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {data.ndim}D data of shape {data.shape}")
    if order != (1, 2, 3):
        raise InputError(f"{path}: axis order mapc/mapr/maps = {order}; only 1,2,3 (x fastest) is supported")
    if len(set(data.shape)) != 1:
        nz, ny, nx = data.shape
        raise InputError(f"{path}: map is {nx}x{ny}x{nz} (x*y*z), not a cubic volume")
    if max(sizes) > 0 and (max(sizes) - min(sizes)) > 1e-3 * max(sizes):
        raise InputError(f"{path}: anisotropic voxels {sizes} Å; expected equal x, y, z pixel sizes")
    px = sizes[0] if sizes[0] > 0 else None
    if px is None:
        warnings.warn(f"{path}: no pixel size in the header", stacklevel=2)
    return data, px


def open_stack(path):
    """Memory-mapped read-only image stack ``(N, H, W)`` (a single 2D image counts as a stack of one)."""
    m = _open(path, mmap=True)
    data = m.data
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a stack of 2D images, got data of shape {data.shape}")
    return data


def stack_pixel_size(path) -> float | None:
    """Pixel size (Å) in a stack's header, or ``None`` when unset (0)."""
    with _open(path, mmap=True) as m:
        px = float(m.voxel_size.x)
    return px if px > 0 else None


def stack_shape(path) -> tuple[int, int, int]:
    """``(N, H, W)`` of a stack (header only)."""
    with _open(path, mmap=True) as m:
        shape = m.data.shape
    return (1,) + tuple(shape) if len(shape) == 2 else tuple(shape)


def _write(path, data, pixel_size, stack: bool):
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            if stack:
                m.set_image_stack()
            m.voxel_size = float(pixel_size) if pixel_size else 0.0
            m.header.origin.x = m.header.origin.y = m.header.origin.z = 0.0
            m.update_header_stats()


def write_map(path, vol, pixel_size: float | None) -> None:
    """Write a volume ``[z, y, x]`` as float32 MRC with the voxel size set, atomically."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"write_map: expected a 3D volume, got shape {vol.shape}")
    _write(path, vol, pixel_size, stack=False)


def write_stack(path, images, pixel_size: float | None) -> None:
    """Write images ``(N, H, W)`` as a float32 MRCS stack with the pixel size set, atomically."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"write_stack: expected (N, H, W) images, got shape {images.shape}")
    _write(path, images, pixel_size, stack=True)
