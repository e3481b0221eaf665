"""Say when a refinement failed (issue 19, item 3): pure checks of a run's final map, its starting reference and
its per-iteration history, each returning one-line warnings (an empty list for a run that looks sound).

* :func:`map_warnings`: the map drifted out of the box: the centre of its (low-passed, positive) density is far
  from the box centre, or much of that density lies near the box edge;
* :func:`reference_warnings`: the map lost the starting reference's low-resolution content (FSC to the
  reference below ``min_fsc`` in a shell the reference defined, i.e. below its resolution): a collapsed,
  featureless or wrong-structure map (a refinement from a reference should keep its low frequencies);
* :func:`convergence_warnings`: the resolution stopped improving (or the poses stopped moving) while the
  half-map resolution was still poor (the refinement stalled without resolving much);
* :func:`run_warnings`: all three.

The thresholds are fields of :class:`DiagnosticThresholds`. Only numpy: callable on any map and history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import ArrayLike, Float

from ..ndimage._fourier import fft3c, ifft3c, radius_grid
from ..ndimage._masks import frequency_edge
from ..ndimage._metrics import fsc


@dataclass(frozen=True)
class DiagnosticThresholds:
    """When :func:`run_warnings` warns.

    Attributes:
        smooth_resolution: maps are low-pass filtered to this resolution (Å) before their density is located
            (noise at high frequency should not move the centre of mass).
        max_centre_offset: warn when the density's centre of mass lies further than this fraction of the box
            from the box centre.
        edge_radius: the "edge" of the box starts at this fraction of the box from its centre (0.5 = the faces).
        max_edge_fraction: warn when more than this fraction of the density lies beyond ``edge_radius``.
        min_fsc: warn when the FSC to the starting reference drops below this in any shell from 1 up to the
            reference's resolution shell (rounded to the nearest shell; its low-pass edge still holds signal).
        poor_shell_fraction: a final half-map resolution (FSC-0.143 shell) below this fraction of the box's
            Nyquist shell is poor.
        still_fraction: poses "stopped moving" when the last iteration's mean pose change is below this
            fraction of its angular step.
    """

    smooth_resolution: float = 20.0
    max_centre_offset: float = 0.1
    edge_radius: float = 0.35
    max_edge_fraction: float = 0.2
    min_fsc: float = 0.5
    poor_shell_fraction: float = 0.4
    still_fraction: float = 0.5


def _density(volume, pixel_size: float, resolution: float) -> np.ndarray:
    """Where the map's signal is: the squared deviation from its median of the map low-pass filtered to
    ``resolution`` Å. Either sign counts (a map of an ASPIRE set read with RELION's CTF sign has negative
    density); squaring makes the particle, not the flat low-level background, carry the weight."""
    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    edge = frequency_edge(radius_grid(n, 3), max(2.0, n * pixel_size / resolution), 2.0)
    s = np.real(ifft3c(fft3c(v) * edge))
    return (s - np.median(s)) ** 2


def centre_of_mass_offset(volume: Float[ArrayLike, "n n n"], pixel_size: float,
                          resolution: float = 20.0) -> np.ndarray:
    """``(z, y, x)`` pixels from the box centre (``n // 2``) to the centre of mass of the map's density
    (:func:`_density`); zeros for an empty map."""
    w = _density(volume, pixel_size, resolution)
    n, total = w.shape[0], w.sum()
    if total <= 0:
        return np.zeros(3)
    g = np.arange(n) - n // 2
    return np.array([np.sum(w.sum(axis=tuple(j for j in range(3) if j != i)) * g) / total for i in range(3)])


def edge_mass_fraction(volume: Float[ArrayLike, "n n n"], pixel_size: float, edge_radius: float = 0.35,
                       resolution: float = 20.0) -> float:
    """The fraction of the map's density (:func:`_density`) further than ``edge_radius * n`` pixels from
    the box centre."""
    w = _density(volume, pixel_size, resolution)
    total = w.sum()
    if total <= 0:
        return 0.0
    return float(w[radius_grid(w.shape[0], 3) > edge_radius * w.shape[0]].sum() / total)


def map_warnings(volume: Float[ArrayLike, "n n n"], pixel_size: float,
                 t: DiagnosticThresholds = DiagnosticThresholds()) -> list[str]:
    """Warnings when the map's density drifted off the box centre or towards its edges."""
    n = np.asarray(volume).shape[0]
    out = []
    c = centre_of_mass_offset(volume, pixel_size, t.smooth_resolution)
    d = float(np.linalg.norm(c))
    if d > t.max_centre_offset * n:
        out.append(f"the map's centre of mass is {d:.1f} px from the box centre (z, y, x offset "
                   f"{c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f} px; more than {t.max_centre_offset:g} of the box): the map "
                   f"drifted off centre")
    e = edge_mass_fraction(volume, pixel_size, t.edge_radius, t.smooth_resolution)
    if e > t.max_edge_fraction:
        out.append(f"{100 * e:.0f}% of the map's density lies more than {t.edge_radius:g} box from the centre "
                   f"(at most {100 * t.max_edge_fraction:.0f}% expected): the map drifted towards the box edge")
    return out


def fsc_to_reference(volume: Float[ArrayLike, "n n n"], reference: Float[ArrayLike, "n n n"]) -> np.ndarray:
    """The per-shell FSC ``0..n//2`` of the map and the reference (same box)."""
    return fsc(np.asarray(volume, np.float64), np.asarray(reference, np.float64)).fsc  # the one FSC


def reference_warnings(volume: Float[ArrayLike, "n n n"], reference: Float[ArrayLike, "n n n"], pixel_size: float,
                       reference_resolution: float,
                       t: DiagnosticThresholds = DiagnosticThresholds()) -> list[str]:
    """A warning when the map's FSC to the starting reference (low-pass filtered to ``reference_resolution``
    Å by the refinement) drops below ``t.min_fsc`` in a shell the reference defined: shells ``1 .. k``, ``k``
    its resolution shell rounded (the FSC does not depend on a per-shell filter, so a low-passed reference
    counts as much as the full one there). Such a map lost the reference's low-resolution structure: a
    collapse to a featureless blob, or a reference that did not fit the data."""
    n = np.asarray(volume).shape[0]
    k = int(np.floor(n * pixel_size / reference_resolution + 0.5))
    f = fsc_to_reference(volume, reference)
    shells = np.arange(1, max(2, min(k + 1, len(f))))
    bad = shells[f[shells] < t.min_fsc]
    if bad.size == 0:
        return []
    s = int(bad[0])
    return [f"the map's FSC to the starting reference is {f[s]:.2f} at shell {s} ({n * pixel_size / s:.0f} A), "
            f"below {t.min_fsc:g} where the reference ({reference_resolution:g} A) defined it (shells 1-"
            f"{int(shells[-1])}): the map collapsed or the reference does not fit the data"]


def convergence_warnings(history: list[dict], box: int,
                         t: DiagnosticThresholds = DiagnosticThresholds()) -> list[str]:
    """A warning when the refinement stopped improving while its half-map FSC-0.143 shell was still below
    ``t.poor_shell_fraction`` of Nyquist: the last iteration did not raise the resolution shell, or its poses
    barely moved (mean change below ``t.still_fraction`` of its angular step). ``history``: refine's
    per-iteration records (``resolution``, ``fsc_0143_shell``, ``angular_step``, ``mean_pose_change_deg``)."""
    if not history or history[-1].get("fsc_0143_shell") is None:
        return []
    h = history[-1]
    shell, change, step = h["fsc_0143_shell"], h.get("mean_pose_change_deg"), h.get("angular_step")
    flat = len(history) > 1 and history[-2].get("fsc_0143_shell") is not None and shell <= history[-2]["fsc_0143_shell"]
    still = change is not None and step is not None and change < t.still_fraction * step
    if (flat or still) and shell < t.poor_shell_fraction * (box // 2):
        why = (f"the resolution stopped improving" if flat else "") + (" and " if flat and still else "") + (
            f"the poses stopped moving (mean change {change:.2f} deg at a {step:g} deg step)" if still else "")
        return [f"{why} at a poor half-map resolution ({h.get('resolution', float('nan')):.1f} A, shell {shell} "
                f"of {box // 2}): the refinement stalled (a wrong reference, or data too noisy for it)"]
    return []


def run_warnings(volume: Float[ArrayLike, "n n n"], reference: Float[ArrayLike, "n n n"] | None, history: list[dict],
                 pixel_size: float, reference_resolution: float,
                 t: DiagnosticThresholds = DiagnosticThresholds()) -> list[str]:
    """All the warnings of a finished refinement: :func:`map_warnings`, :func:`reference_warnings` (when a
    reference is given) and :func:`convergence_warnings`."""
    out = map_warnings(volume, pixel_size, t)
    if reference is not None:
        out += reference_warnings(volume, reference, pixel_size, reference_resolution, t)
    return out + convergence_warnings(history, np.asarray(volume).shape[0], t)
