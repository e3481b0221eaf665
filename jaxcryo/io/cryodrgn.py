"""cryoDRGN pose and CTF pickles, converted to RELION conventions.

* Pose pickles hold rotation matrices ``(N, 3, 3)`` that act on row vectors (``coords @ R``), which is
  exactly RELION's ``A`` (CONVENTIONS.md: 0.992 correlation on the toy set; the transpose gives 0.45),
  optionally with translations ``(N, 2)`` in fractions of the box, with the same sign as RELION's origin:
  cryoDRGN's ``parse_pose_star`` writes ``rlnOriginX/Y`` (pixels) ``/ D`` unchanged in sign, and its
  ``parse_pose_csparc`` writes cryoSPARC's ``alignments3D/shift / D``. So RELION's origin in Å is
  ``trans * box * pixel_size``.
* CTF pickles are ``(N, 9)`` tables: D, Apix, dfU, dfV, dfang (deg), kV, Cs (mm), Q0, phase (deg).
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from pathlib import Path

import numpy as np

from ..forward._ctf import CTFParams, validate_ctf
from ..errors import InputError, why
from ..forward._particles import ParticleMetadata


#: The only globals a cryoDRGN pickle may name: numpy's array and scalar reconstruction (all its arrays need).
_ALLOWED = {(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global (a class or function a pickle could
    call) is refused, so a pickle cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}; only numpy arrays are read")


def _load(path):
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is the file's
        raise InputError(f"{path}: not a readable pickle ({why(e)})") from None


def _array(path, obj, what: str) -> np.ndarray:
    """``obj`` as a float64 array, or :class:`InputError` naming the file and ``what`` it should hold."""
    try:
        a = np.asarray(obj)
        if a.dtype.kind not in "iuf":  # bool, complex, text, objects: not numbers
            raise TypeError(f"dtype {a.dtype}")
        return a.astype(np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"{path}: {what} are not an array of numbers ({' '.join(str(e).split())[:120]})") from None


def read_pose_pickle(path, box: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cryoDRGN pose pickle -> (RELION matrices ``(N, 3, 3)``, translations in box fractions or None).

    The pickle holds either the rotations or a tuple ``(rotations, translations)``. ``box`` (pixels), when
    given, is used to sanity-check the translations: fractions beyond half the box suggest pixels.
    """
    obj = _load(path)
    trans = None
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2:
            raise InputError(f"{path}: expected rotations or (rotations, translations), got {len(obj)} items")
        rot, trans = _array(path, obj[0], "rotations"), _array(path, obj[1], "translations")
    else:
        rot = _array(path, obj, "rotations")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"{path}: rotations have shape {rot.shape}, expected (N, 3, 3)")
    if trans is not None and trans.shape != (len(rot), 2):
        raise InputError(f"{path}: translations have shape {trans.shape}, expected ({len(rot)}, 2)")
    if not np.all(np.isfinite(rot)) or (trans is not None and not np.all(np.isfinite(trans))):
        raise InputError(f"{path}: poses contain NaN or inf")
    det = np.linalg.det(rot)
    if np.any(np.abs(det - 1) > 1e-3):
        raise InputError(f"{path}: pose {int(np.argmax(np.abs(det - 1)))} is not a rotation matrix "
                         f"(determinant {det[np.argmax(np.abs(det - 1))]:.4g})")
    if trans is not None and box is not None and len(trans) and np.abs(trans).max() > 0.5:
        warnings.warn(f"{path}: translations up to {np.abs(trans).max():.3g} box fractions (box {box} px); "
                      "cryoDRGN translations are fractions of the box, these look like pixels", stacklevel=2)
    return rot, trans


#: The column of a cryoDRGN CTF table holding each :class:`CTFParams` field (named in messages).
_CTF_COLUMNS = {
    "defocus_u": "dfU (column 3)", "defocus_v": "dfV (column 4)", "astig_angle": "dfang (column 5)",
    "voltage": "kV (column 6)", "cs": "Cs (column 7)", "amp_contrast": "w (column 8)",
    "phase_shift": "phase (column 9)", "bfactor": "bfactor", "scale": "scale",
}


def read_ctf_pickle(path) -> CTFParams:
    """Read a cryoDRGN CTF table ``(N, 9)`` into :class:`CTFParams`."""
    t = _array(path, _load(path), "CTF parameters")
    if t.ndim != 2 or t.shape[1] != 9:
        raise InputError(f"{path}: CTF table has shape {t.shape}, expected (N, 9)")
    ctf = CTFParams.create(defocus_u=t[:, 2], defocus_v=t[:, 3], astig_angle=t[:, 4], voltage=t[:, 5],
                           cs=t[:, 6], amp_contrast=t[:, 7], phase_shift=t[:, 8], dtype=np.float64)
    validate_ctf(ctf, str(path), fields=_CTF_COLUMNS, where=lambda f, i: f"row {i + 1}")
    return ctf


def apply_poses(md: ParticleMetadata, path, use_translations: bool = True) -> ParticleMetadata:
    """Replace the poses of ``md`` by those of a cryoDRGN pose pickle (and the shifts, if it has them).

    Translations (box fractions) become RELION origins in Å: ``trans * box * pixel_size``, same sign.
    """
    rot, trans = read_pose_pickle(path, box=md.box)
    if len(rot) != len(md):
        raise InputError(f"{path}: {len(rot)} poses for {len(md)} particles")
    shifts = md.shifts
    if trans is not None and use_translations:
        shifts = trans * md.box * md.pixel_size
    return dataclasses.replace(md, rotations=rot, shifts=np.asarray(shifts, np.float64), missing_poses=None,
                               poses_from=str(path))
