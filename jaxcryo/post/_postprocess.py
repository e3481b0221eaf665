"""Post-processing of two half maps, as RELION 3.1's ``relion_postprocess``: masked FSC corrected for the mask
by phase randomisation (Chen et al. 2013), FSC weighting and a Guinier-fitted B-factor (Rosenthal & Henderson
2003), low-pass at the corrected resolution.

Shells are one Fourier voxel wide (``round(|k|)``, :func:`jaxcryo.ndimage.shell_index`), 0 (DC) to ``n // 2``
(Nyquist), as in :func:`jaxcryo.ndimage.fsc`; shell ``s`` is at ``s / (n * pixel_size)`` 1/Å.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from jaxtyping import ArrayLike, Bool, Float

from ..errors import InputError
from ..io._validate import MASK_TOLERANCE
from ..ndimage._fourier import radius_grid, shell_index
from ..ndimage._masks import frequency_edge, shell_of
from ..ndimage._metrics import first_shell_below, fsc, resolution_at

#: RELION's ``--randomize_at_fsc``: phases are randomised from the first shell (> 0) where the unmasked FSC
#: falls below this value.
RANDOMISE_AT_FSC = 0.8
#: RELION's ``--autob_lowres`` (Å): the B-factor fit starts at this resolution.
FIT_FROM = 10.0
#: RELION's ``--autob_highres`` (Å); 0: no upper limit, every shell to Nyquist whose FSC-weighted amplitude is
#: non-zero (FSC weighting zeroes the shells from the first one whose corrected FSC is below
#: :data:`FSC_WEIGHT_FLOOR`).
FIT_TO = 0.0
#: RELION's ``applyFscWeighting``: shells from the first one whose FSC is below this value get weight 0.
FSC_WEIGHT_FLOOR = 1e-4
#: The corrected FSC keeps the masked FSC for this many shells past the randomisation shell (RELION: "small
#: artefacts near the resolution of randomisation").
CORRECTION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class PostprocessResult:
    """What :func:`postprocess` measured and made.

    Curves are per shell ``0..n//2`` at ``frequency`` (1/Å); ``fsc_masked`` and ``fsc_randomised`` are None
    without a mask (then ``fsc_corrected`` is the unmasked FSC, as it is when ``unmasked_fallback``: the
    unmasked FSC reached further than the corrected one, see :func:`postprocess`). Resolutions (Å) are where
    the corrected FSC first falls below 0.143 / 0.5 (linear interpolation between shells). ``bfactor`` (Å²,
    negative sharpens) is the one applied: fitted (``bfactor_fitted``) or given. ``fit_from``/``fit_to`` (Å)
    are the lowest- and highest-resolution shells the Guinier fit used (None without a fit). ``guinier_*`` are
    ln of the mean amplitude per shell (Fourier transform normalised by ``1/n^3``, as RELION's) of the half-map
    average (``_in``), after FSC weighting (``_weighted``, the fitted curve) and after sharpening
    (``_sharpened``), at ``guinier_x`` = frequency² (1/Å²); ``-inf`` where a shell is empty. ``map`` is the
    sharpened, weighted, low-passed average; ``masked_map`` that times the mask.
    """

    pixel_size: float
    frequency: np.ndarray
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_randomised: np.ndarray | None
    fsc_corrected: np.ndarray
    randomise_shell: int | None
    unmasked_fallback: bool
    resolution_0143: float
    resolution_05: float
    bfactor: float
    bfactor_fitted: bool
    fit_from: float | None
    fit_to: float | None
    intercept: float | None
    fit_correlation: float | None
    low_pass: float | None
    guinier_x: np.ndarray
    guinier_in: np.ndarray
    guinier_weighted: np.ndarray
    guinier_sharpened: np.ndarray
    guinier_fit: np.ndarray  # which shells the fit used
    map: np.ndarray
    masked_map: np.ndarray | None
    mask: np.ndarray | None
    seed: int

    @property
    def box(self) -> int:
        return int(self.map.shape[-1])

    @property
    def randomise_from(self) -> float | None:
        """Resolution (Å) of the first phase-randomised shell."""
        s = self.randomise_shell
        return None if s is None else float(self.box * self.pixel_size / s)

    def to_dict(self) -> dict:
        """JSON-ready: the numbers, the curves (``frequency`` in 1/Å, ``resolution`` in Å per shell, inf at
        shell 0 written as null), the Guinier plot; no maps."""

        def arr(a):
            return None if a is None else [float(x) if np.isfinite(x) else None for x in np.asarray(a)]

        res = np.full(len(self.frequency), np.inf)
        res[1:] = 1.0 / self.frequency[1:]
        return {
            "resolution_0143": float(self.resolution_0143), "resolution_05": float(self.resolution_05),
            "bfactor": float(self.bfactor), "bfactor_fitted": bool(self.bfactor_fitted),
            "fit_from": self.fit_from, "fit_to": self.fit_to, "intercept": self.intercept,
            "fit_correlation": self.fit_correlation, "low_pass": self.low_pass,
            "pixel_size": float(self.pixel_size), "box": self.box, "masked": self.mask is not None,
            "randomise_shell": self.randomise_shell, "randomise_from": self.randomise_from, "seed": self.seed,
            "unmasked_fallback": self.unmasked_fallback,
            "shell": list(range(len(self.frequency))), "frequency": arr(self.frequency), "resolution": arr(res),
            "fsc_unmasked": arr(self.fsc_unmasked), "fsc_masked": arr(self.fsc_masked),
            "fsc_randomised": arr(self.fsc_randomised), "fsc_corrected": arr(self.fsc_corrected),
            "guinier": {"frequency_squared": arr(self.guinier_x), "ln_amplitude": arr(self.guinier_in),
                        "ln_amplitude_weighted": arr(self.guinier_weighted),
                        "ln_amplitude_sharpened": arr(self.guinier_sharpened),
                        "used_in_fit": [bool(x) for x in self.guinier_fit]},
        }


def check_half_maps(half1: Float[ArrayLike, "n n n"], half2: Float[ArrayLike, "n n n"],
                    mask: Float[ArrayLike, "n n n"] | None = None, names=("half1", "half2", "mask")) -> tuple:
    """The half maps (and mask) as float64 arrays, or :class:`InputError` naming the one at fault (``names``:
    parameter or file names): not cubic 3D, different boxes, non-finite values, one value everywhere (an empty
    map), a mask of another box, with values outside [0, 1] (beyond :data:`jaxcryo.io._validate.MASK_TOLERANCE`, the
    slack :func:`jaxcryo.io.read_volume` allows a mask file) or all zero."""
    out = []
    for a, name in ((half1, names[0]), (half2, names[1])):
        a = np.asarray(a, np.float64)
        if a.ndim != 3 or len(set(a.shape)) != 1:
            raise InputError(f"{name}: expected a cubic 3D map, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise InputError(f"{name}: the map has non-finite values (NaN or inf)")
        if a.size and a.min() == a.max():
            raise InputError(f"{name}: all {a.size} voxels are {float(a.flat[0]):g}; an empty map")
        out.append(a)
    if out[0].shape != out[1].shape:
        raise InputError(f"{names[1]}: box {out[1].shape[0]} differs from {names[0]}'s {out[0].shape[0]}; "
                         "the half maps must have the same box")
    if mask is not None:
        m = np.asarray(mask, np.float64)
        if m.shape != out[0].shape:
            raise InputError(f"{names[2]}: mask of shape {m.shape}, the half maps are {out[0].shape}")
        if not np.all(np.isfinite(m)):
            raise InputError(f"{names[2]}: the mask has non-finite values (NaN or inf)")
        lo, hi = float(m.min()), float(m.max())
        if lo < -MASK_TOLERANCE or hi > 1 + MASK_TOLERANCE:
            raise InputError(f"{names[2]}: mask values must lie in [0, 1], found [{lo:.6g}, {hi:.6g}]")
        if hi <= 0:
            raise InputError(f"{names[2]}: the mask is empty (all zero)")
        out.append(np.clip(m, 0.0, 1.0))
    return tuple(out)


def randomise_phases(volume: Float[ArrayLike, "n n n"], shell: int, rng: np.random.Generator) -> np.ndarray:
    """``volume`` with the phase of every Fourier component at ``|k| >= shell`` (index units; RELION's
    ``randomizePhasesBeyond``) replaced by a uniform random phase; amplitudes and the lower shells unchanged.
    The phases are those of real white noise, so the map stays real."""
    v = np.asarray(volume, np.float64)
    f = np.fft.fftn(v)
    phase = np.fft.fftn(rng.standard_normal(v.shape))
    phase /= np.maximum(np.abs(phase), 1e-300)
    k2 = np.fft.ifftshift(radius_grid(v.shape[-1], 3)) ** 2
    f = np.where(k2 >= shell * shell - 1e-9, np.abs(f) * phase, f)
    return np.fft.ifftn(f).real


def corrected_fsc(fsc_masked: Float[ArrayLike, " shells"], fsc_randomised: Float[ArrayLike, " shells"],
                  shell: int) -> np.ndarray:
    """Chen et al. 2013: ``(FSC_t - FSC_n) / (1 - FSC_n)`` from shell ``shell + 2`` on, the masked FSC below
    (RELION 3.1's ``calculateFSCtrue``)."""
    t, r = np.asarray(fsc_masked, np.float64), np.asarray(fsc_randomised, np.float64)
    out = t.copy()
    hi = np.arange(len(t)) >= shell + CORRECTION_OFFSET
    den = np.where(np.abs(1.0 - r) > 1e-12, 1.0 - r, 1e-12)
    out[hi] = ((t - r) / den)[hi]
    return out


def fsc_weights(fsc_curve: Float[ArrayLike, " shells"]) -> np.ndarray:
    """Per shell ``sqrt(2 F / (1 + F))`` up to the last shell before the FSC first falls below
    :data:`FSC_WEIGHT_FLOOR`, 0 from there on (RELION's ``applyFscWeighting``)."""
    f = np.asarray(fsc_curve, np.float64)
    stop = np.flatnonzero(f < FSC_WEIGHT_FLOOR)
    last = int(stop[0]) - 1 if stop.size else len(f) - 1
    w = np.zeros_like(f)
    ok = np.arange(len(f)) <= last
    w[ok] = np.sqrt(2.0 * np.clip(f[ok], 0, None) / (1.0 + np.clip(f[ok], 0, None)))
    return w


def _ln_mean_amplitude(f_abs, shells, nsh) -> np.ndarray:
    """ln of the mean ``|F|`` per shell ``0..nsh-1`` (-inf where the shell is zero), with ``F`` the Fourier
    transform normalised by ``1 / n^3`` (RELION's, so the Guinier intercepts compare)."""
    s = shells.ravel()
    keep = s < nsh
    total = np.bincount(s[keep], weights=f_abs.ravel()[keep], minlength=nsh) / f_abs.size
    count = np.maximum(np.bincount(s[keep], minlength=nsh), 1)
    with np.errstate(divide="ignore"):
        return np.log(total / count)


def guinier_fit(x: Float[ArrayLike, " shells"], y: Float[ArrayLike, " shells"],
                used: Bool[ArrayLike, " shells"]) -> tuple[float, float, float]:
    """Least-squares line through ``(x[used], y[used])``: (slope, intercept, correlation coefficient r^2)."""
    x, y = np.asarray(x, np.float64)[used], np.asarray(y, np.float64)[used]
    if x.size < 2:
        raise InputError("the B-factor fit has fewer than two shells with signal between {param} and fit_to",
                         param="fit_from")
    xm, ym = x.mean(), y.mean()
    sxx, syy, sxy = ((x - xm) ** 2).sum(), ((y - ym) ** 2).sum(), ((x - xm) * (y - ym)).sum()
    slope = sxy / sxx
    return float(slope), float(ym - slope * xm), float(sxy * sxy / (sxx * syy)) if syy > 0 else 1.0


def _check_parameters(bfactor, fit_from, fit_to, low_pass, randomise_at_fsc) -> None:
    """InputError naming the parameter of :func:`postprocess` that is not a finite number in its range."""
    def bad(name, value, want):
        raise InputError(f"{{param}} must be {want}, got {value}", param=name)

    if bfactor is not None and not np.isfinite(bfactor):
        bad("bfactor", bfactor, "a finite number of Å²")
    if not (np.isfinite(fit_from) and fit_from > 0):
        bad("fit_from", fit_from, "a resolution > 0 Å")
    if not (np.isfinite(fit_to) and 0 <= fit_to < fit_from):
        bad("fit_to", fit_to, f"0 (no limit) or a resolution > 0 Å finer than fit_from = {fit_from:g} Å")
    if low_pass is not None and not (np.isfinite(low_pass) and low_pass >= 0):
        bad("low_pass", low_pass, "a resolution > 0 Å, 0 (no filter) or None")
    if not (np.isfinite(randomise_at_fsc) and 0 < randomise_at_fsc < 1):
        bad("randomise_at_fsc", randomise_at_fsc, "an FSC value between 0 and 1")


def postprocess(half1: Float[ArrayLike, "n n n"], half2: Float[ArrayLike, "n n n"], *, pixel_size: float,
                mask: Float[ArrayLike, "n n n"] | None = None, bfactor: float | None = None,
                fit_from: float = FIT_FROM, fit_to: float = FIT_TO, low_pass: float | None = None,
                fsc_weighting: bool = True, randomise_at_fsc: float = RANDOMISE_AT_FSC,
                force_mask: bool = False, seed: int = 0) -> PostprocessResult:
    """Post-process two half maps as RELION 3.1's ``relion_postprocess --mask M --auto_bfac``.

    Args:
        half1, half2: the two independent half maps ``(n, n, n)`` (real space, unfiltered).
        pixel_size: Å/px.
        mask: soft solvent mask in [0, 1] (e.g. :func:`jaxcryo.ndimage.auto_mask` or
            :func:`jaxcryo.ndimage.spherical_mask`); None: no masking, the corrected FSC is the unmasked one.
        bfactor: B-factor (Å²) to apply, negative sharpens (0: none); None fits it: ``4 x`` the slope of a line
            through ln(mean |F|) of the FSC-weighted average against frequency², over the shells from
            ``fit_from`` Å to ``fit_to`` Å (0: every shell with signal, up to Nyquist). With fewer than two
            such shells (a map worse than ``fit_from``) no B-factor is applied, with a warning.
        low_pass: filter the final map at this resolution (Å, raised-cosine edge of 2 shells); None: at the
            corrected FSC-0.143 resolution; 0: no filter.
        fsc_weighting: weight the average by ``sqrt(2 FSC / (1 + FSC))`` of the corrected FSC.
        randomise_at_fsc: phases are randomised from the first shell (> 0) where the *unmasked* FSC falls
            below this value (RELION's ``--randomize_at_fsc`` 0.8), in both half maps, before masking them.
        force_mask: keep the corrected FSC even where the unmasked one reaches further.
        seed: seeds the random phases.

    The corrected FSC (Chen et al. 2013) is ``(FSC_masked - FSC_randomised) / (1 - FSC_randomised)`` from two
    shells past the randomisation shell, the masked FSC below. Where the unmasked FSC stays above 0.143 to a
    higher shell than the corrected one, the unmasked FSC is used instead, with a warning
    (``unmasked_fallback``), as RELION 3.1 does unless ``force_mask`` (``--force_mask``). Raises
    :class:`InputError` for maps of different boxes, non-finite values, a mask of another box, outside [0, 1]
    or empty, half maps of one value everywhere or (without a mask) identical, a non-finite or out-of-range
    ``bfactor``, ``fit_from``, ``fit_to``, ``low_pass`` or ``randomise_at_fsc``, or an unmasked FSC that never
    falls below ``randomise_at_fsc``. Warns when the phase-randomised FSC is above 0.10 at the resolution
    (as RELION: the mask is too sharp) and when the corrected FSC never falls below 0.143 (the resolution is
    then the pixel size's limit, not a measurement).
    """
    if not pixel_size or not pixel_size > 0:
        raise InputError(f"pixel_size must be > 0 Å, got {pixel_size}")
    _check_parameters(bfactor, fit_from, fit_to, low_pass, randomise_at_fsc)
    if mask is None:
        a, b = check_half_maps(half1, half2)
        m = None
        if np.array_equal(a, b):
            raise InputError("half1, half2: the two half maps are identical; their FSC is 1 at every shell "
                             "(give two independent half maps)")
    else:
        a, b, m = check_half_maps(half1, half2, mask)
    n = a.shape[0]
    nsh = n // 2 + 1
    rng = np.random.default_rng(seed)
    unmasked = fsc(a, b, pixel_size)
    freq = unmasked.frequency
    f_masked = f_random = None
    shell = None
    corrected = unmasked.fsc
    fallback = False
    if m is not None:
        f_masked = fsc(a, b, pixel_size, mask=m).fsc
        shell = first_shell_below(unmasked.fsc, randomise_at_fsc)
        if shell >= nsh:
            raise InputError(f"the unmasked FSC never falls below {{param}} = {randomise_at_fsc}: nothing to "
                             "randomise (are the half maps the same map?)", param="randomise_at_fsc")
        ra, rb = randomise_phases(a, shell, rng), randomise_phases(b, shell, rng)
        f_random = fsc(ra, rb, pixel_size, mask=m).fsc
        corrected = corrected_fsc(f_masked, f_random, shell)
        if first_shell_below(unmasked.fsc, 0.143) > first_shell_below(corrected, 0.143):
            if force_mask:
                warnings.warn("the unmasked FSC extends beyond the mask-corrected FSC", stacklevel=2)
            else:  # RELION 3.1: skip the mask
                warnings.warn("the unmasked FSC extends beyond the mask-corrected FSC: the unmasked FSC is used "
                              "(as RELION; the mask may be too tight, or pass force_mask)", stacklevel=2)
                corrected, fallback = unmasked.fsc, True
    res0143 = resolution_at(freq, corrected, 0.143, pixel_size)
    res05 = resolution_at(freq, corrected, 0.5, pixel_size)
    last = first_shell_below(corrected, 0.143) - 1  # RELION's resolution shell: the last one at or above 0.143
    if last >= nsh - 1:
        warnings.warn(f"the FSC does not fall below 0.143 up to the last shell ({n * pixel_size / (nsh - 1):.3g} "
                      f"Å): the resolution reported ({res0143:.3g} Å) is the pixel size's limit, not a measurement",
                      stacklevel=2)
    if f_random is not None and not fallback and 0 < last < nsh and f_random[last] > 0.1:
        warnings.warn(f"the phase-randomised FSC is {f_random[last]:.2f} (> 0.10) at the estimated resolution: "
                      "the resolution may be wrong; use a softer mask with fewer features (as RELION warns)",
                      stacklevel=2)

    shells = np.fft.ifftshift(shell_index(n, 3))
    f = np.fft.fftn(0.5 * (a + b))
    g_in = _ln_mean_amplitude(np.abs(f), shells, nsh)
    if fsc_weighting:
        w = np.append(fsc_weights(corrected), 0.0)  # the corners beyond Nyquist: weight 0
        f = f * w[np.minimum(shells, nsh)]
    g_weighted = _ln_mean_amplitude(np.abs(f), shells, nsh)
    x = freq ** 2
    res_shell = np.full(nsh, np.inf)
    res_shell[1:] = 1.0 / freq[1:]
    used = (res_shell <= fit_from) & (res_shell >= fit_to) & np.isfinite(g_weighted)
    fitted = bfactor is None
    slope = intercept = corr = None
    if fitted and used.sum() < 2:
        upper = f"{fit_to:g} Å" if fit_to else "the last shell with signal"
        warnings.warn(f"fewer than two shells with signal between {fit_from:g} Å and {upper} to fit a B-factor "
                      f"(corrected FSC-0.143 resolution {res0143:.3g} Å); none applied", stacklevel=2)
        fitted, bfactor = False, 0.0
    if fitted:
        slope, intercept, corr = guinier_fit(x, g_weighted, used)
        bfactor = 4.0 * slope
    assert bfactor is not None  # fitted above, or given
    r_k = np.fft.ifftshift(radius_grid(n, 3))
    s2 = (r_k / (n * pixel_size)) ** 2
    f = np.where(r_k <= n / 2, f * np.exp(-(bfactor / 4.0) * s2), 0.0)  # to Nyquist, as RELION
    g_sharp = _ln_mean_amplitude(np.abs(f), shells, nsh)
    lp = res0143 if low_pass is None else (float(low_pass) or None)
    if lp is not None:
        f = f * frequency_edge(r_k, shell_of(n, pixel_size, lp), 2.0)
    out = np.fft.ifftn(f).real.astype(np.float32)
    return PostprocessResult(
        pixel_size=float(pixel_size), frequency=freq, fsc_unmasked=unmasked.fsc, fsc_masked=f_masked,
        fsc_randomised=f_random, fsc_corrected=corrected, randomise_shell=shell, unmasked_fallback=fallback,
        resolution_0143=res0143, resolution_05=res05, bfactor=float(bfactor), bfactor_fitted=fitted,
        fit_from=float(res_shell[used].max()) if fitted else None,
        fit_to=float(res_shell[used].min()) if fitted else None, intercept=intercept, fit_correlation=corr,
        low_pass=lp, guinier_x=x, guinier_in=g_in, guinier_weighted=g_weighted, guinier_sharpened=g_sharp,
        guinier_fit=used if fitted else np.zeros(nsh, bool), map=out,
        masked_map=None if m is None else (out * m).astype(np.float32),
        mask=None if m is None else m.astype(np.float32), seed=int(seed))
