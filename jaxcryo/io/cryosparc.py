"""cryoSPARC ``.cs`` particle files (NumPy structured arrays), converted to RELION conventions.

* ``alignments3D/pose``: axis-angle; RELION's matrix is ``expm(skew(pose)).T``
  (:func:`jaxcryo.rotations.cryosparc_pose_to_relion`, as cryoDRGN's ``parse_pose_csparc``).
* ``alignments3D/shift``: pixels, copied with the same sign to RELION's origin (as pyem's ``csparc2star``
  and cryoDRGN's ``parse_pose_csparc`` do: both keep the sign, and cryoDRGN's ``parse_pose_star`` treats
  RELION's ``rlnOriginX/Y`` the same way), times ``alignments3D/psize_A`` (else ``blob/psize_A``) for Å.
* ``blob/sign``: -1 means the images have the opposite contrast; kept as ``contrast_sign`` and applied
  when images are read. Checked on ``empiar_10076_7.mrc`` (``blob/sign = -1``): its particles are dark on
  a light background (low-pass centre minus surround < 0 in all 7), so the flip gives RELION's
  bright-particle contrast. The RELION 3.0 STAR for the same stack carries no sign and serves them as stored.
* CTF: ``ctf/df1_A``, ``df2_A``, ``df_angle_rad`` (-> degrees), ``accel_kv``, ``cs_mm``, ``amp_contrast``,
  ``phase_shift_rad`` (-> degrees), ``bfactor``, ``scale``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..forward._ctf import CRYOSPARC_FIELDS, CTFParams, validate_ctf, validate_pixel_size
from ..errors import InputError, why
from ..forward._particles import ParticleMetadata
from ..rotations._rotations import cryosparc_pose_to_relion


#: ``dtype.kind`` letters a field may have: numbers, integers, text.
NUMBER, INTEGER, TEXT = "iuf", "iu", "SU"
_KIND_WORDS = {NUMBER: "numbers", INTEGER: "integers", TEXT: "text (stack paths)"}


def _field(path, data, name, required=True, kinds=NUMBER, shape=(), default=None):
    """Field ``name`` of the record array ``data``: its values (``dtype.kind`` in ``kinds``, per-record shape
    ``shape``), ``default`` broadcast to the records when absent and not ``required``; otherwise an
    :class:`InputError` naming the field."""
    if name not in data.dtype.names:
        if required:
            raise InputError(f"{path}: field {name} missing")
        return None if default is None else np.full(len(data), default, np.float64)
    ft = data.dtype[name]
    if ft.base.kind not in kinds or ft.shape != shape:
        got = f"{ft.base.str.lstrip('<>|=')}" + (f" of shape {ft.shape}" if ft.shape else "")
        want = _KIND_WORDS[kinds] + (f" of shape {shape}" if shape else "")
        raise InputError(f"{path}: field {name} holds {got}; expected {want}")
    return np.asarray(data[name])


def read_cs(path, datadir=None, apix: float | None = None) -> ParticleMetadata:
    """Read a cryoSPARC particle ``.cs`` file into :class:`ParticleMetadata`.

    Without ``alignments3D`` the poses are ``None`` and ``missing_poses = 'alignments3D'``.
    Stacks (``blob/path``, a leading ``>`` stripped) are looked for under ``datadir`` (path, then
    basename), then beside the ``.cs`` file. Every problem is reported as :class:`InputError` naming it.
    """
    try:
        return _read_cs(Path(path), datadir, apix)
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise InputError(f"{path}: cannot interpret the cryoSPARC file ({why(e)})") from None


def _read_cs(path: Path, datadir=None, apix: float | None = None) -> ParticleMetadata:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a cryoSPARC .cs file ({why(e)})") from None
    if data.dtype.names is None:
        raise InputError(f"{path}: not a cryoSPARC .cs file (no named fields)")
    n = len(data)
    if n == 0:
        raise InputError(f"{path}: no particles")
    bpath = _field(path, data, "blob/path", kinds=TEXT)
    bidx = _field(path, data, "blob/idx", kinds=INTEGER).astype(np.int64)
    if (bidx < 0).any():
        i = int(np.flatnonzero(bidx < 0)[0])
        raise InputError(f"{path}: field blob/idx {int(bidx[i])} in particle {i + 1}; expected an index >= 0")
    shape = _field(path, data, "blob/shape", required=False, kinds=INTEGER, shape=(2,))
    psize = _field(path, data, "blob/psize_A", required=False)
    sign = _field(path, data, "blob/sign", required=False)
    if apix is not None:
        if not (np.isfinite(apix) and apix > 0):
            raise InputError(f"apix {float(apix):g}: expected a pixel size > 0 Å", param="apix")
        px = float(apix)
    elif psize is None:
        raise InputError(f"{path}: field blob/psize_A missing; give {{param}}", param="apix")
    else:
        validate_pixel_size(psize, str(path), "blob/psize_A", hint="give {param}", param="apix")
        px = float(psize[0])
    box = int(np.asarray(shape[0]).ravel()[-1]) if shape is not None else None
    if box is not None and box < 2:
        raise InputError(f"{path}: field blob/shape {np.asarray(shape[0]).tolist()} in particle 1; expected >= 2 px")
    if psize is not None and apix is None and np.ptp(np.asarray(psize, np.float64)) > 1e-4 * px:
        raise InputError(f"{path}: field blob/psize_A: particles have different pixel sizes "
                         f"({float(np.min(psize)):.4g} to {float(np.max(psize)):.4g} Å); not supported")
    names: list[str] = []
    cache: dict[str, str] = {}
    base = Path(datadir) if datadir is not None else path.parent
    for b in bpath:
        s = b.decode() if isinstance(b, bytes) else str(b)
        s = s.lstrip(">")
        if s not in cache:
            cands = [base / s, base / Path(s).name, path.parent / s, path.parent / Path(s).name]
            hit = next((c for c in cands if c.exists()), cands[0])
            cache[s] = str(hit.resolve())
        names.append(cache[s])
    files = np.array(names, dtype=object)
    if box is None:
        from .mrc import stack_shape

        if not Path(files[0]).exists():
            raise InputError(f"{path}: field blob/shape missing and stack {files[0]} not found")
        box = stack_shape(files[0])[-1]
    random_subset, missing_poses = None, None
    rotations, shifts = None, np.zeros((n, 2))
    if "alignments3D/pose" in data.dtype.names:
        rotations = cryosparc_pose_to_relion(np.asarray(_field(path, data, "alignments3D/pose", shape=(3,)),
                                                        np.float64))
        if "alignments3D/shift" in data.dtype.names:
            # Shifts are in pixels of the alignment (alignments3D/psize_A), normally the blob's pixel size.
            apx = np.full(n, px)
            if apix is None and "alignments3D/psize_A" in data.dtype.names:
                a = np.asarray(_field(path, data, "alignments3D/psize_A"), np.float64)
                apx = np.where(a > 0, a, px)
            shifts = np.asarray(_field(path, data, "alignments3D/shift", shape=(2,)), np.float64) * apx[:, None]
        if "alignments3D/split" in data.dtype.names:
            random_subset = np.asarray(_field(path, data, "alignments3D/split", kinds=INTEGER), np.int64) + 1
    else:
        missing_poses = "alignments3D"
    ctf = None
    if "ctf/df1_A" in data.dtype.names:
        g = lambda k, d: np.asarray(_field(path, data, k, required=False, default=d), np.float64)  # noqa: E731
        ctf = CTFParams.create(
            defocus_u=g("ctf/df1_A", 0), defocus_v=g("ctf/df2_A", 0),
            astig_angle=np.rad2deg(g("ctf/df_angle_rad", 0.0)), voltage=g("ctf/accel_kv", 300.0),
            cs=g("ctf/cs_mm", 2.7), amp_contrast=g("ctf/amp_contrast", 0.1),
            phase_shift=np.rad2deg(g("ctf/phase_shift_rad", 0.0)), bfactor=g("ctf/bfactor", 0.0),
            scale=g("ctf/scale", 1.0), dtype=np.float64,
        )
        validate_ctf(ctf, str(path), fields=CRYOSPARC_FIELDS)
    contrast = None if sign is None else np.where(np.asarray(sign) < 0, -1.0, 1.0)
    return ParticleMetadata(
        rotations=rotations, shifts=shifts, ctf=ctf, image_files=files, image_indices=bidx, pixel_size=px,
        box=int(box), contrast_sign=contrast, source=str(path), random_subset=random_subset,
        missing_poses=missing_poses,
    )
