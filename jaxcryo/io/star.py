"""RELION STAR particle files (3.0, 3.1+ with optics groups, RELION 5).

Reading: plain files (no quotes, one row per line, ...) go through a small numpy parser (:mod:`._star_fast`,
:func:`_read_blocks_fast`), which spares the ``starfile``/pandas import (~0.2-0.45 s); anything it is not
certain of goes to the ``starfile`` package, which also writes.

Conventions converted here, once: Euler angles -> RELION matrices, origins -> Å, optics-group values ->
per particle, ``index@stack`` -> (absolute path, 0-based index).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..forward._ctf import RELION_FIELDS, CTFParams, validate_ctf, validate_pixel_size
from ..errors import InputError, why
from ..forward._particles import ParticleMetadata
from ..rotations._rotations import euler_to_matrix, matrix_to_euler
from ._star_fast import _read_blocks_fast
from .atomic import atomic_path

CTF_REQUIRED = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                "rlnAmplitudeContrast")


def _read_blocks(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    blocks = _read_blocks_fast(path)
    if blocks is not None:
        return blocks
    import starfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile/pandas parse errors
        raise InputError(f"{path}: not a readable STAR file ({why(e)})") from None
    return blocks


def _find_tables(path: Path, blocks: dict):
    # Loops: _Table (fast reader) or pandas.DataFrame (starfile); key-value blocks are dicts.
    tables = {k: v for k, v in blocks.items() if hasattr(v, "columns")}
    for name, t in tables.items():  # the fast reader leaves a file with a repeated column to starfile, which keeps both
        cols = list(t.columns)
        dup = next((c for c in cols if cols.count(c) > 1), None)
        if dup is not None:
            raise InputError(f"{path}: column {dup} appears {cols.count(dup)} times in data_{name}")
    optics = tables.get("optics")
    parts = None
    for name in ("particles", "images", "", "data_", "model_class_1"):
        if name in tables and "rlnImageName" in tables[name].columns:
            parts = tables[name]
            break
    if parts is None:
        cands = [v for k, v in tables.items() if "rlnImageName" in v.columns and k != "optics"]
        if cands:
            parts = cands[0]
    if parts is None:
        raise InputError(f"{path}: no particle table with an rlnImageName column")
    return parts, optics


def _numeric(path, df, col, dtype=np.float64) -> np.ndarray:
    try:
        return df[col].to_numpy(dtype=dtype)
    except (ValueError, TypeError, OverflowError):  # OverflowError: an integer beyond int64 (pandas object)
        raise InputError(f"{path}: column {col}: expected numbers") from None


def _resolve(path: Path, name: str, datadir) -> Path:
    p = Path(name)
    cands = []
    if p.is_absolute():
        cands.append(p)
    if datadir is not None:
        cands += [Path(datadir) / p, Path(datadir) / p.name]
    cands += [path.parent / p, path.parent / p.name]
    for c in cands:
        if c.exists():
            return c.resolve()
    return cands[0].resolve()  # missing: reported when the images are read (ParticleDataset.validate)


def read_star(path, datadir=None, apix: float | None = None) -> ParticleMetadata:
    """Read a RELION particle STAR file into :class:`ParticleMetadata`; see :func:`_read_star`.

    Every problem with the file is reported as :class:`InputError` naming it.
    """
    try:
        return _read_star(Path(path), datadir, apix)
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise InputError(f"{path}: cannot interpret the STAR file ({why(e)})") from None


def _read_star(path: Path, datadir=None, apix: float | None = None) -> ParticleMetadata:
    """Read a RELION particle STAR file into :class:`ParticleMetadata` (see its docstring for units).

    Pixel size: ``apix`` if given, else ``rlnImagePixelSize``, else ``rlnDetectorPixelSize * 1e4 /
    rlnMagnification``, else the stack header, else :class:`InputError` asking for ``apix``.
    Shifts: ``rlnOriginX/YAngst``, else ``rlnOriginX/Y`` (pixels) times the pixel size, else zero.
    Missing CTF columns: CTF off, with a warning naming them. Missing angles: ``rotations=None``.
    """
    path = Path(path)
    parts, optics = _find_tables(path, _read_blocks(path))
    if len(parts) == 0:
        raise InputError(f"{path}: no particles")
    parts = parts.reset_index(drop=True)
    n = len(parts)
    from_optics: set = set()  # columns whose values come from the optics block
    # Merge optics-group columns per particle (RELION 3.1+).
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(f"{path}: optics block has no rlnOpticsGroup column")
        if "rlnOpticsGroup" in parts.columns:
            og = _numeric(path, parts, "rlnOpticsGroup", np.int64)
        else:
            og = np.full(n, int(_numeric(path, optics, "rlnOpticsGroup", np.int64)[0]))
        table = {int(g): i for i, g in enumerate(_numeric(path, optics, "rlnOpticsGroup", np.int64))}
        missing = set(np.unique(og)) - set(table)
        if missing:
            raise InputError(f"{path}: rlnOpticsGroup {sorted(missing)} not in the optics block")
        rows = np.array([table[int(g)] for g in og])
        for col in optics.columns:
            if col not in parts.columns and col not in ("rlnOpticsGroupName",):
                parts[col] = optics[col].to_numpy()[rows]
                from_optics.add(col)
    else:
        og = np.ones(n, np.int64)

    def where(col: str, i: int) -> str:  # where value i of column col sits in the file
        return f"optics group {int(og[i])}" if col in from_optics else f"particle {i + 1}"

    # Image locations.
    names = parts["rlnImageName"].astype(str).to_numpy()
    names_out: list[str] = []
    idx = np.empty(n, np.int64)
    cache: dict = {}
    for i, s in enumerate(names):
        if "@" in s:
            a, b = s.split("@", 1)
            try:
                idx[i] = int(a) - 1
            except ValueError:
                raise InputError(f"{path}: column rlnImageName: {s!r}: expected index@stack") from None
            if idx[i] < 0:
                raise InputError(f"{path}: column rlnImageName: {s!r}: image indices start at 1")
        else:
            idx[i], b = 0, s
        if b not in cache:
            cache[b] = str(_resolve(path, b, datadir))
        names_out.append(cache[b])
    files = np.array(names_out, dtype=object)

    # Pixel size and box.
    px_per, px_field = None, None
    if apix is not None:
        if not (np.isfinite(apix) and apix > 0):
            raise InputError(f"apix {float(apix):g}: expected a pixel size > 0 Å", param="apix")
        px_per = np.full(n, float(apix))
    elif "rlnImagePixelSize" in parts.columns:
        px_per, px_field = _numeric(path, parts, "rlnImagePixelSize"), "rlnImagePixelSize"
    elif "rlnDetectorPixelSize" in parts.columns and "rlnMagnification" in parts.columns:
        det, mag = _numeric(path, parts, "rlnDetectorPixelSize"), _numeric(path, parts, "rlnMagnification")
        for col, v, unit in (("rlnDetectorPixelSize", det, " µm"), ("rlnMagnification", mag, "")):
            bad = ~(np.isfinite(v) & (v > 0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"{path}: {col} {v[i]:g}{unit} in {where(col, i)}; expected > 0{unit}")
        px_per, px_field = det * 1e4 / mag, "rlnDetectorPixelSize"
    box_per = _numeric(path, parts, "rlnImageSize", np.int64) if "rlnImageSize" in parts.columns else None
    if px_per is None or box_per is None:
        from .mrc import stack_pixel_size, stack_shape

        first = files[0]
        if not Path(first).exists():
            what = "pixel size" if px_per is None else "image size"
            raise InputError(f"{path}: no {what} in the STAR file and stack {first} not found; "
                             + ("give {param}" if px_per is None else "check {param}"),
                             param="apix" if px_per is None else "datadir")
        if px_per is None:
            p = stack_pixel_size(first)
            if p is None:
                raise InputError(f"{path}: no pixel size (rlnImagePixelSize, rlnDetectorPixelSize/rlnMagnification "
                                 f"or the stack header of {first}); give {{param}}", param="apix")
            px_per = np.full(n, p)
        if box_per is None:
            box_per = np.full(n, stack_shape(first)[-1], np.int64)
    if px_field is not None:
        validate_pixel_size(px_per, str(path), px_field, lambda i: where(px_field, i))
    if (box_per < 2).any():
        i = int(np.flatnonzero(box_per < 2)[0])
        raise InputError(f"{path}: rlnImageSize {int(box_per[i])} in {where('rlnImageSize', i)}; expected >= 2 px")

    # Poses and shifts.
    ang = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    rotations, missing_poses = None, None
    if all(c in parts.columns for c in ang):
        rotations = euler_to_matrix(*(_numeric(path, parts, c) for c in ang))
    else:
        missing_poses = "/".join(c for c in ang if c not in parts.columns)
        if any(c in parts.columns for c in ang):
            present = [c for c in ang if c in parts.columns]
            warnings.warn(f"{path}: only {present} of the Euler angles present; poses treated as missing",
                          stacklevel=3)
    if "rlnOriginXAngst" in parts.columns and "rlnOriginYAngst" in parts.columns:
        shifts = np.stack([_numeric(path, parts, "rlnOriginXAngst"), _numeric(path, parts, "rlnOriginYAngst")], 1)
    elif "rlnOriginX" in parts.columns and "rlnOriginY" in parts.columns:
        shifts = np.stack([_numeric(path, parts, "rlnOriginX"), _numeric(path, parts, "rlnOriginY")], 1)
        shifts = shifts * px_per[:, None]
    else:
        shifts = np.zeros((n, 2))

    # CTF.
    ctf = None
    absent = [c for c in CTF_REQUIRED if c not in parts.columns]
    if not absent:
        get = lambda c, d: _numeric(path, parts, c) if c in parts.columns else np.full(n, d)  # noqa: E731
        ctf = CTFParams.create(
            defocus_u=get("rlnDefocusU", 0.0), defocus_v=get("rlnDefocusV", 0.0),
            astig_angle=get("rlnDefocusAngle", 0.0), voltage=get("rlnVoltage", 300.0),
            cs=get("rlnSphericalAberration", 2.7), amp_contrast=get("rlnAmplitudeContrast", 0.1),
            phase_shift=get("rlnPhaseShift", 0.0), bfactor=get("rlnCtfBfactor", 0.0),
            scale=get("rlnCtfScalefactor", 1.0), dtype=np.float64,
        )
        validate_ctf(ctf, str(path), where=lambda f, i: where(RELION_FIELDS[f], i))
    elif "rlnDefocusU" not in parts.columns and "rlnDefocusV" not in parts.columns:
        warnings.warn(f"{path}: no defocus columns (rlnDefocusU/V); the CTF is off", stacklevel=3)
    else:
        warnings.warn(f"{path}: incomplete CTF parameters, missing {', '.join(absent)}; the CTF is off",
                      stacklevel=3)

    first = int(np.flatnonzero(og == og.min())[0])  # a particle of the first optics group
    mixed = bool(len(np.unique(px_per)) > 1 or len(np.unique(box_per)) > 1)
    if mixed:
        warnings.warn(f"{path}: optics groups with different pixel sizes or boxes "
                      f"({sorted(set(np.round(px_per, 4).tolist()))} Å, {sorted(set(box_per.tolist()))} px); "
                      f"using those of optics group {int(og.min())}", stacklevel=3)
    random_subset = None
    if "rlnRandomSubset" in parts.columns:
        random_subset = _numeric(path, parts, "rlnRandomSubset", np.int64)
    if "rlnCtfDataAreCtfPremultiplied" in parts.columns:
        if np.any(_numeric(path, parts, "rlnCtfDataAreCtfPremultiplied") != 0):
            warnings.warn(f"{path}: images are CTF-premultiplied; jaxcryo's forward model assumes they are not",
                          stacklevel=3)
    return ParticleMetadata(
        rotations=rotations, shifts=shifts.astype(np.float64), ctf=ctf, image_files=files, image_indices=idx,
        pixel_size=float(px_per[first]), box=int(box_per[first]), source=str(path),
        random_subset=random_subset, missing_poses=missing_poses, optics_group=og,
        box_per_particle=box_per, pixel_size_per_particle=px_per, mixed_optics=mixed,
    )


def _per_particle(md: ParticleMetadata, v, default):
    if isinstance(v, np.ndarray) and v.shape == (len(md),):
        return v
    return np.full(len(md), default)


def write_star(path, md: ParticleMetadata) -> None:
    """Write ``md`` as a RELION 3.1 particle STAR (optics block + particles block), atomically.

    One optics group per distinct (pixel size, box, voltage, Cs, Q0). Image paths are written relative to
    the STAR file's folder when the stack lies under it, absolute otherwise; indices are 1-based.
    ``contrast_sign`` has no RELION field and is not written (see :func:`jaxcryo.data.write_dataset`).
    """
    import pandas as pd
    import starfile

    path = Path(path)
    n = len(md)
    if n == 0:
        raise InputError(f"{path}: no particles to write")
    ctf = md.ctf
    px = _per_particle(md, md.pixel_size_per_particle, float(md.pixel_size)).astype(np.float64)
    box = _per_particle(md, md.box_per_particle, int(md.box)).astype(np.int64)
    if ctf is not None:
        volt, cs, q0 = (np.broadcast_to(np.asarray(getattr(ctf, f), np.float64), (n,))
                        for f in ("voltage", "cs", "amp_contrast"))
    else:
        volt, cs, q0 = np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1)
    keys = np.stack([px, box.astype(np.float64), volt, cs, q0], 1)
    uniq, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # number the groups in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    uniq, group = uniq[order], rank[np.asarray(inv).reshape(-1)] + 1
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(uniq))],
        "rlnImagePixelSize": uniq[:, 0], "rlnImageSize": uniq[:, 1].astype(np.int64),
        "rlnImageDimensionality": np.full(len(uniq), 2), "rlnVoltage": uniq[:, 2],
        "rlnSphericalAberration": uniq[:, 3], "rlnAmplitudeContrast": uniq[:, 4],
    })
    folder = path.parent.resolve()

    def rel(f):
        p = Path(f)
        try:
            return str(p.resolve().relative_to(folder)) if p.is_absolute() else str(p)
        except ValueError:
            return str(p)

    rels: dict = {}
    names = []
    for i, f in zip(np.asarray(md.image_indices), md.image_files):
        if f not in rels:
            rels[f] = rel(f)
        names.append(f"{int(i) + 1:06d}@{rels[f]}")
    cols: dict = {"rlnImageName": names}
    if md.rotations is not None:
        rot, tilt, psi = matrix_to_euler(md.rotations)
        cols.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    shifts = np.asarray(md.shifts, np.float64)
    cols.update(rlnOriginXAngst=shifts[:, 0], rlnOriginYAngst=shifts[:, 1])
    if ctf is not None:
        f64 = lambda v: np.broadcast_to(np.asarray(v, np.float64), (n,))  # noqa: E731
        cols.update(rlnDefocusU=f64(ctf.defocus_u), rlnDefocusV=f64(ctf.defocus_v),
                    rlnDefocusAngle=f64(ctf.astig_angle), rlnPhaseShift=f64(ctf.phase_shift),
                    rlnCtfBfactor=f64(ctf.bfactor), rlnCtfScalefactor=f64(ctf.scale))
    cols["rlnOpticsGroup"] = group.astype(np.int64)
    rs = md.random_subset
    if isinstance(rs, np.ndarray) and rs.shape == (n,):
        cols["rlnRandomSubset"] = rs.astype(np.int64)
    parts = pd.DataFrame(cols)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": parts}, tmp, float_format="%.6f", overwrite=True)
        # RELION 3.1+ marks each block with its table version; older RELIONs ignore the comment.
        text = Path(tmp).read_text().replace("\ndata_", "\n# version 30001\n\ndata_")
        Path(tmp).write_text(text)
