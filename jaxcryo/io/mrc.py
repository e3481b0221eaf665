"""MRC maps and MRCS stacks through ``mrcfile``: pixel sizes, axis order, permissive opening.

Volumes are returned ``[z, y, x]`` float32 as MRC stores them (with ``mapc, mapr, maps = 1, 2, 3``).
Stacks are memory-mapped, so a stack larger than memory can be served image by image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
from jaxtyping import ArrayLike, Real

from ..errors import InputError, why
from .atomic import atomic_path


_WARNED: set = set()


def _open(path, mmap: bool = False):
    """Open ``path`` read-only; fall back to permissive mode (with a warning) for non-conforming files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # mrcfile's own use of NumPy (e.g. setting an array's dtype, deprecated in NumPy 2.5) says nothing
            # about the file: only its warnings about the file make the open fall back to permissive mode
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            return opener(path, mode="r")
    except Exception:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = opener(path, mode="r", permissive=True)
    except Exception as e:
        raise InputError(f"{path}: not a readable MRC file ({why(e)})") from None
    if m.data is None:
        raise InputError(f"{path}: not a readable MRC file (no data)")
    if (str(path), opener.__name__) not in _WARNED:  # once per file and mode, not at every reopen
        _WARNED.add((str(path), opener.__name__))
        warnings.warn(f"{path}: file does not pass mrcfile's strict checks; opened permissively", stacklevel=3)
    return m


def _to_zyx(data: np.ndarray, order: tuple[int, int, int]) -> np.ndarray | None:
    """Reorder ``data[section, row, column]`` (axes ``maps, mapr, mapc``) to ``[z, y, x]``; None if invalid."""
    if sorted(order) != [1, 2, 3]:
        return None
    mapc, mapr, maps = order
    axis_of = {maps: 0, mapr: 1, mapc: 2}  # MRC axis label (1=x, 2=y, 3=z) -> array axis
    return np.transpose(data, (axis_of[3], axis_of[2], axis_of[1]))


def read_map(path) -> tuple[np.ndarray, float | None]:
    """Read a cubic 3D map -> (``(n, n, n)`` float32 ``[z, y, x]``, pixel size in Å or ``None`` if unset).

    A non-standard axis order (``mapc, mapr, maps`` other than 1, 2, 3) is transposed to ``[z, y, x]``.
    Raises :class:`InputError` (naming the file) for non-cubic maps, an invalid axis order, anisotropic
    voxels, or a negative or non-finite pixel size. The values are not checked (:func:`~jaxcryo.io.read_volume`
    does). A missing pixel size (0 in the header) gives ``None`` and a warning.
    """
    path = Path(path)
    with _open(path) as m:
        raw = np.asarray(m.data, dtype=np.float32)
        h = m.header
        order = (int(h.mapc), int(h.mapr), int(h.maps))
        vs = m.voxel_size
        sizes = (float(vs.x), float(vs.y), float(vs.z))
    if raw.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {raw.ndim}D data of shape {raw.shape}")
    data = _to_zyx(raw, order)
    order_s = ",".join(map(str, order))
    if data is None:
        raise InputError(f"{path}: invalid axis order mapc/mapr/maps = {order_s}; expected a permutation of 1,2,3")
    if not all(np.isfinite(sizes)) or min(sizes) < 0:
        raise InputError(f"{path}: pixel size {sizes[0]:.4g} x {sizes[1]:.4g} x {sizes[2]:.4g} Å in the header; "
                         "expected > 0 (or 0 for unset)")
    problems = []
    if len(set(data.shape)) != 1:
        nz, ny, nx = data.shape
        problems.append(f"is {nx}x{ny}x{nz} (x by y by z), not a cubic volume")
    if max(sizes) > 0 and (max(sizes) - min(sizes)) > 1e-3 * max(sizes):
        problems.append("has anisotropic voxels ({:.4g} x {:.4g} x {:.4g} Å); expected equal x, y, z pixel sizes"
                        .format(*sizes))
    if problems:
        if order != (1, 2, 3):
            problems.append(f"axis order mapc/mapr/maps = {order_s}")
        raise InputError(f"{path}: map " + "; ".join(problems))
    if order != (1, 2, 3):
        warnings.warn(f"{path}: axis order mapc/mapr/maps = {order_s}; transposed to z, y, x", stacklevel=2)
        data = np.ascontiguousarray(data)
    px = sizes[0] if sizes[0] > 0 else None
    if px is None:
        warnings.warn(f"{path}: no pixel size in the header (0); pass it explicitly (apix / --apix)", stacklevel=2)
    return data, px


def _stack_layout(path):
    """(dtype, shape (N, H, W), data offset in bytes) of an MRC stack, from its header."""
    with _open(path, mmap=True) as m:
        data = m.data
        dtype, shape = data.dtype, tuple(data.shape)
        offset = int(m.header.nbytes + m.extended_header.nbytes)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise InputError(f"{path}: expected a stack of 2D images, got data of shape {shape}")
    return dtype, shape, offset


def open_stack(path) -> np.ndarray:
    """Memory-mapped read-only image stack ``(N, H, W)`` (a single 2D image counts as a stack of one).

    The result is a :class:`numpy.memmap` that owns its mapping, so it stays valid on its own; nothing is
    read until it is indexed. Files that fail mrcfile's strict checks are opened permissively, with a warning.
    """
    dtype, shape, offset = _stack_layout(path)
    if shape[0] * shape[1] * shape[2] == 0:
        raise InputError(f"{path}: empty image stack (shape {shape})")
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: cannot memory-map the image data ({why(e)}); the file may be truncated") from None


class StackReader:
    """Image stack read on demand with plain file reads (``(N, H, W)``-indexable like an array).

    Unlike a memory map, pages read through it are not mapped into the process, so reading a stack larger
    than memory, image batch by image batch, keeps the resident memory flat (a memory map's touched pages
    count towards the process's RSS until the mapping is dropped). It holds no open file between reads (only
    the header's layout), so any number of readers can be kept. Runs of consecutive indices are read in one
    call, straight into the result's buffer.
    """

    def __init__(self, path):
        self.path = str(path)
        self.dtype, self.shape, self.offset = _stack_layout(path)
        self.dtype = np.dtype(self.dtype)
        if self.shape[0] * self.shape[1] * self.shape[2] == 0:
            raise InputError(f"{path}: empty image stack (shape {self.shape})")
        self._image_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        single = np.ndim(idx) == 0
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: image index out of range (stack has {self.shape[0]} images)")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        buf = np.empty((len(idx),) + tuple(self.shape[1:]), self.dtype)
        if len(idx):
            cut = np.flatnonzero(np.diff(sidx) != 1) + 1  # runs of consecutive indices (in sorted order)
            starts, ends = np.concatenate([[0], cut]).tolist(), np.concatenate([cut, [len(sidx)]]).tolist()
            raw = memoryview(buf.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy's stub: no Buffer
            ib = self._image_bytes
            with open(self.path, "rb", buffering=0) as f:  # unbuffered: each read lands in ``buf`` directly
                for a, b in zip(starts, ends):
                    first = int(sidx[a])
                    f.seek(self.offset + first * ib)
                    view, got = raw[a * ib:b * ib], 0
                    while got < len(view):
                        n = f.readinto(view[got:])
                        if not n:
                            raise InputError(f"{self.path}: file is truncated (image {first + 1})")
                        got += n
        if np.array_equal(order, np.arange(len(idx))):
            out = buf
        else:
            out = np.empty_like(buf)
            out[order] = buf
        return out[0] if single else out


def stack_pixel_size(path) -> float | None:
    """Pixel size (Å) in a stack's header, or ``None`` when unset (0)."""
    with _open(path, mmap=True) as m:
        px = float(m.voxel_size.x)
    return px if px > 0 else None


def stack_shape(path) -> tuple[int, int, int]:
    """``(N, H, W)`` of a stack (header only)."""
    return _stack_layout(path)[1]


def _write(path, data, pixel_size, stack: bool):
    if pixel_size is not None and not (np.isfinite(pixel_size) and pixel_size >= 0):
        raise ValueError(f"{path}: pixel size {pixel_size}: expected > 0 Å (or 0/None for unset)")
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            if stack:
                m.set_image_stack()
            m.voxel_size = float(pixel_size) if pixel_size else 0.0
            m.header.origin.x = m.header.origin.y = m.header.origin.z = 0.0
            m.update_header_stats()


def write_map(path, vol: Real[ArrayLike, "n n n"], pixel_size: float | None) -> None:
    """Write a volume ``[z, y, x]`` as float32 MRC with the voxel size set, atomically."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"write_map: expected a 3D volume, got shape {vol.shape}")
    _write(path, vol, pixel_size, stack=False)


def write_stack(path, images: Real[ArrayLike, "k n n"], pixel_size: float | None) -> None:
    """Write images ``(N, H, W)`` as a float32 MRCS stack with the pixel size set, atomically."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"write_stack: expected (N, H, W) images, got shape {images.shape}")
    _write(path, images, pixel_size, stack=True)
