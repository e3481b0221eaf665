"""FSC, convergence and conditioning figures as PNG files (matplotlib object-oriented API, written atomically)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np


def preload() -> threading.Thread:
    """Import matplotlib's figure and PNG backend in a background thread and return it.

    A command that will plot calls this before its computation: the import (about half a second) then
    overlaps with JAX work, which runs outside the GIL. Idempotent in effect (imports are cached)."""

    def work():
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - any failure surfaces again, in context, when plotting
            pass

    t = threading.Thread(target=work, name="jaxcryo-preload-matplotlib", daemon=True)
    t.start()
    return t


class _ObjectOriented:
    """The two pyplot calls used here, on matplotlib's object-oriented API: no global backend switch
    (so notebooks keep inline plotting), no pyplot figure registry to leak into."""

    @staticmethod
    def subplots(nrows=1, ncols=1, figsize=None, squeeze=True, **kw):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kw)

    @staticmethod
    def close(fig) -> None:
        del fig


def _fig():
    return _ObjectOriented


def _save(plt, fig, path) -> Path:
    """Save ``fig`` as PNG atomically (temporary ``.png`` beside ``path``, then ``os.replace``) and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _draw_and_save(path, draw, figsize) -> Path:
    """A one-axes figure of ``figsize`` drawn by ``draw(ax)``, saved as a PNG at ``path`` (closed on error)."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
    except BaseException:
        plt.close(fig)
        raise
    return _save(plt, fig, path)


def _curve(c):
    if isinstance(c, dict):
        f, v = c["frequency"], c["fsc"]
    else:
        f, v = c.frequency, c.fsc
    return [float(x) for x in f], [float(x) for x in v]


def plot_fsc(curves: dict, path, title: str | None = None, thresholds=(0.143, 0.5)) -> Path:
    """Plot FSC curves (``label -> FSCResult`` or a dict with ``frequency``/``fsc``) against 1/Å, with
    the threshold lines and a top axis in Å. ``None`` curves are skipped. Returns ``path``."""
    return _draw_and_save(path, lambda ax: _draw_fsc(ax, curves, thresholds, title), (6.4, 4.2))


def _draw_fsc(ax, curves, thresholds, title):
    fmax = 0.0
    for label, c in curves.items():
        if c is None:
            continue
        f, v = _curve(c)
        ax.plot(f, v, marker=".", label=label)
        fmax = max(fmax, max(f) if len(f) else 0)
    for t in thresholds:
        ax.axhline(t, color="gray", lw=0.8, ls="--")
        ax.text(fmax, t, f"{t:g} ", ha="right", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, fmax * 1.02 if fmax else 1)
    ax.grid(alpha=0.3)
    if fmax:
        sec = ax.secondary_xaxis("top")
        ticks = [t for t in ax.get_xticks() if 0 < t <= fmax * 1.02]
        sec.set_xticks(ticks)
        sec.set_xticklabels([f"{1 / t:.1f}" for t in ticks])
        sec.set_xlabel("resolution (Å)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)


def plot_convergence(histories: dict, path, x_keys=("epoch", "seconds"), y_keys=("loss", "resolution_05_ref"),
                     title: str | None = None) -> Path:
    """Grid of convergence curves: rows ``y_keys`` (skipped where all values are None), columns ``x_keys``;
    one line per history (``label -> list of per-epoch dicts``). The loss axis is logarithmic when every
    loss is positive. Returns ``path``."""
    plt = _fig()
    ys = [y for y in y_keys if any(r.get(y) is not None for h in histories.values() for r in h)]
    ys = ys or [y_keys[0]]
    fig, axes = plt.subplots(len(ys), len(x_keys), figsize=(4.2 * len(x_keys), 3.2 * len(ys)), squeeze=False)
    try:
        _draw_convergence(fig, axes, histories, x_keys, ys, title)
    except BaseException:
        plt.close(fig)
        raise
    return _save(plt, fig, path)


def _draw_convergence(fig, axes, histories, x_keys, ys, title):
    labels = {"loss": "loss", "resolution_05_ref": "FSC-0.5 resolution vs reference (Å)",
              "relative_error_to_optimum": "relative error to optimum", "seconds": "time (s)", "epoch": "epoch",
              "loss_gap_remaining": "loss gap remaining (%)", "min_fsc_vs_optimum": "min FSC vs optimum (high shells)"}
    for i, y in enumerate(ys):
        for j, x in enumerate(x_keys):
            ax = axes[i][j]
            for label, h in histories.items():
                pts = [(r.get(x), r.get(y)) for r in h if r.get(x) is not None and r.get(y) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=label)
            if y in ("loss", "loss_gap_remaining"):
                vals = [r.get(y) for h in histories.values() for r in h if r.get(y) is not None]
                if vals and min(vals) > 0:
                    ax.set_yscale("log")
            ax.set_xlabel(labels.get(x, x))
            ax.set_ylabel(labels.get(y, y))
            ax.grid(alpha=0.3)
            if i == 0 and j == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()


def plot_condition(report: dict, path) -> Path:
    """Log-log plot of ``kappa`` against box size (measured ``H``, ``D^-1 H`` and predicted) from a
    :func:`jaxcryo.leastsq.condition_report`. Returns ``path``."""
    return _draw_and_save(path, lambda ax: _draw_condition(ax, report), (5.5, 4.2))


def _draw_condition(ax, report):
    box = np.asarray(report["box"], float)
    order = np.argsort(box)
    s = report.get("settings", {})
    for key, label, style in (("kappa_H", "κ(H)", "o-"), ("kappa_DinvH", "κ(D⁻¹H)", "s-"),
                              ("kappa_predicted", "predicted (paper's bound)", "--")):
        y = np.asarray([np.nan if v is None else v for v in report[key]], float)
        ax.plot(box[order], y[order], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(box[order], [str(int(b)) for b in box[order]])
    ax.set_xlabel("box size N (ball radius N/2)")
    ax.set_ylabel("condition number")
    ax.set_title(f"{s.get('interp', '')}, {s.get('n_poses', '')} poses"
                 + (", CTF" if s.get("ctf") else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def plot_postprocess(result, out_dir, prefix: str = "") -> list[Path]:
    """``fsc.png`` (the corrected, unmasked, masked and phase-randomised masked FSC, as RELION's postprocess
    plot) and ``guinier.png`` (ln mean amplitude against frequency²: the half-map average, FSC-weighted with
    the fitted line, sharpened) of a :class:`jaxcryo.post.PostprocessResult` (or its ``to_dict()``) in
    ``out_dir``, their names preceded by ``prefix``. Returns the paths."""
    d = result if isinstance(result, dict) else result.to_dict()
    out = Path(out_dir)
    f = d["frequency"]
    curves = {"corrected": d["fsc_corrected"], "unmasked": d["fsc_unmasked"], "masked": d["fsc_masked"],
              "phase-randomised masked": d["fsc_randomised"]}
    title = (f"resolution {d['resolution_0143']:.2f} Å (corrected FSC 0.143)"
             + ("" if d["masked"] else ", no mask"))
    paths = [plot_fsc({k: {"frequency": f, "fsc": v} for k, v in curves.items() if v is not None},
                      out / f"{prefix}fsc.png", title=title)]
    paths.append(_draw_and_save(out / f"{prefix}guinier.png", lambda ax: _draw_guinier(ax, d), (6.4, 4.2)))
    return paths


def _draw_guinier(ax, d):
    g = d["guinier"]
    x = np.asarray(g["frequency_squared"], float)
    for key, label in (("ln_amplitude", "average of the half maps"), ("ln_amplitude_weighted", "FSC-weighted"),
                       ("ln_amplitude_sharpened", f"sharpened, B = {d['bfactor']:.1f} Å²")):
        y = np.array([np.nan if v is None else v for v in g[key]], float)
        ok = np.isfinite(y) & (x > 0)
        ax.plot(x[ok], y[ok], marker=".", label=label)
    if d["intercept"] is not None:
        used = np.asarray(g["used_in_fit"], bool)
        xs = x[used]
        ax.plot(xs, d["intercept"] + d["bfactor"] / 4.0 * xs, color="k", lw=1.5,
                label=f"fit {d['fit_from']:.1f}-{d['fit_to']:.1f} Å")
    ax.set_xlabel("frequency² (1/Å²)")
    ax.set_ylabel("ln(mean amplitude)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Guinier plot")


def save_figure(fig, path) -> Path:
    """Save any matplotlib figure as a PNG atomically and release it (pyplot figures are closed)."""
    import matplotlib.pyplot as plt

    return _save(plt, fig, path)
