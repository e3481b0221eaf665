"""The standard outputs of a command, written one way by every command.

A command's output folder holds, in this order (each written atomically, each skipped when absent): the maps
(``map.mrc``, ``half1.mrc``, ...), the FSC as JSON and PNG (``fsc.json``, ``fsc.png``), the history as JSON and
its convergence plot (``history.json``, ``convergence.png``), and the run record (``run.json``). File names are
those of :class:`OutputFiles` (a command may rename or drop any of them). :func:`write_outputs` writes them;
:func:`output_folder` checks the folder first; :func:`fsc_json` is the ``fsc.json`` layout (half-map curve,
with the curve against a reference under ``"reference"``); :func:`versions` the package versions for
``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..ndimage._metrics import FSCResult
from ..plotting import plot_convergence, plot_fsc
from .atomic import atomic_write_text
from .mrc import write_map

#: Packages whose versions :func:`versions` records.
VERSIONED = ("jaxcryo", "jax", "jaxlib", "optax", "equinox", "jax-finufft", "mrcfile", "starfile", "numpy")


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """File names (relative to the output folder, or absolute) of the standard outputs; ``None``: not written."""

    fsc_json: str | Path | None = "fsc.json"
    fsc_png: str | Path | None = "fsc.png"
    history: str | Path | None = "history.json"
    convergence: str | Path | None = "convergence.png"
    run: str | Path | None = "run.json"


@dataclasses.dataclass(frozen=True)
class ConvergencePlot:
    """How :func:`write_outputs` draws the history (:func:`jaxcryo.plotting.plot_convergence`): ``curves`` maps
    a label to its per-epoch records; ``x_keys``/``y_keys`` the columns and rows; ``title``."""

    curves: Mapping[str, Sequence[dict]]
    x_keys: tuple[str, ...] = ("epoch", "seconds")
    y_keys: tuple[str, ...] = ("loss", "resolution_05_ref")
    title: str | None = None


def output_folder(out: str | Path, create: bool = True) -> Path:
    """``out`` as a folder (created with ``create``). Raises :class:`InputError` (parameter ``out``) when it
    exists and is not a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; {{param}} needs a folder (new or existing)",
                         param="out")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def fsc_json(half: FSCResult | None, reference: FSCResult | None = None) -> dict:
    """The ``fsc.json`` record: the half-map curve (:meth:`FSCResult.to_dict`; empty when ``half`` is None)
    and, with a reference, its curve under ``"reference"``."""
    out: dict[str, Any] = half.to_dict() if half is not None else {
        "resolution_0143": None, "resolution_05": None, "frequency": [], "fsc": []}
    if reference is not None:
        out["reference"] = reference.to_dict()
    return out


def versions() -> dict:
    """Python's and the installed packages' versions (``None`` for one not installed), for ``run.json``."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
    return path


def write_outputs(
    out: str | Path,
    *,
    pixel_size: float | None = None,
    maps: Mapping[str, np.ndarray | None] | None = None,
    fsc: FSCResult | dict | None = None,
    fsc_curves: Mapping[str, FSCResult | None] | None = None,
    fsc_title: str | None = None,
    history: Sequence[dict] | None = None,
    convergence: ConvergencePlot | None = None,
    run: dict | None = None,
    files: OutputFiles = OutputFiles(),
) -> list[Path]:
    """Write the standard outputs into the folder ``out`` in order: ``maps`` (``file name -> real-space map``,
    ``None`` entries skipped; needs ``pixel_size``), ``fsc`` (an :class:`FSCResult` or a ready record such as
    :func:`fsc_json`'s) to ``files.fsc_json``, ``fsc_curves`` (``label -> FSCResult``) plotted to
    ``files.fsc_png``, ``history`` to ``files.history``, ``convergence`` plotted to ``files.convergence``, and
    ``run`` to ``files.run``. Anything ``None`` (or whose file name is ``None``) is not written. Returns the
    paths written, in order."""
    out = output_folder(out)
    written: list[Path] = []
    for name, vol in (maps or {}).items():
        if vol is not None:
            if pixel_size is None:
                raise ValueError("write_outputs: maps need pixel_size")
            write_map(out / name, vol, pixel_size)
            written.append(out / name)
    if fsc is not None and files.fsc_json is not None:
        written.append(write_json(out / files.fsc_json, fsc.to_dict() if isinstance(fsc, FSCResult) else fsc))
    curves = {k: v for k, v in (fsc_curves or {}).items() if v is not None}
    if curves and files.fsc_png is not None:
        written.append(plot_fsc(curves, out / files.fsc_png, title=fsc_title))
    if history is not None and files.history is not None:
        written.append(write_json(out / files.history, list(history)))
    if convergence is not None and files.convergence is not None:
        written.append(plot_convergence(dict(convergence.curves), out / files.convergence,
                                        x_keys=convergence.x_keys, y_keys=convergence.y_keys,
                                        title=convergence.title))
    if run is not None and files.run is not None:
        written.append(write_json(out / files.run, run))
    return [Path(p) for p in written]
