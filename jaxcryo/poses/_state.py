"""The settings, state and checkpoints of a refinement (:func:`jaxcryo.poses.refine`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..forward._operators import make_operator
from ..forward._particles import ParticleMetadata
from ..post._postprocess import PostprocessResult
from ..solvers._reconstruct import ReconstructResult
from ..solvers._strategies import MinibatchStrategy, Plan, Strategy, make_strategy, strategy_name
from ._checkpoints import load_run, save_run
from ._validate import fail, integers, non_negative, positive

#: The ``kind`` of a refinement checkpoint.
KIND = "refine"
#: Without ``particle_diameter`` the postprocess's spherical mask spans this fraction of the box (its soft
#: edge of :data:`jaxcryo.ndimage.SPHERE_SOFT_EDGE_PX` voxels lies outside).
DIAMETER_FRACTION = 0.9
#: Settings that only shape the closing postprocess: a resumed run may change them (``particle_diameter`` only
#: without ``solvent_mask``).
FINISHING = ("iterations", "particle_diameter")


@dataclass(frozen=True)
class RefineSettings:
    """The choices of a refinement (all angles in degrees, lengths in Å unless named ``_px``); invalid values
    raise :class:`~jaxcryo.errors.InputError` naming the parameter.

    Attributes:
        init_resolution: the reference is low-pass filtered to this resolution first (RELION's
            ``--ini_high``).
        global_step: angular sampling of the global search (when the particles have no poses).
        global_iterations: without starting poses, the first this many iterations search globally (each
            against the half maps of the one before, as RELION's auto-refine keeps exhaustive searches while
            its sampling is coarse), the later ones locally.
        local_step: the angular step of the first local search (``local_only``: the expected pose error / 2).
        min_step: the finest angular step.
        local_radius_steps: local searches cover ``+- local_radius_steps`` steps around each pose.
        max_shift_px: the global translation search covers ``+- max_shift_px`` pixels.
        global_shift_step_px: its step.
        local_shift_steps: local shift grids cover ``+- local_shift_steps`` steps of the current shift step
            (which starts at ``local_shift_step_px`` and halves with the angular step, down to 0.25 px).
        kmax_margin: shells searched beyond the current resolution.
        iterations: iterations at most.
        patience: iterations at the finest step without a one-shell improvement before stopping.
        epochs_per_iteration: epochs of the volume update per iteration (minibatch strategies; ``cg``: its
            iterations).
        optimizer: the volume updates' strategy, a registry name (``"backproject"``: the one-pass Wiener
            filter with the half-map FSC prior, RELION's per-iteration reconstruction; ``"psgd"``:
            preconditioned SGD, by each minibatch's exact diagonal for operators with a local stencil, else
            Hutchinson; ``"sgd"``, ``"adam"``; ``"cg"``) or a :class:`~jaxcryo.solvers.Strategy` value;
            resolved once (:func:`update_strategy`). The default, measured on an ASPIRE set at SNR 0.1
            (issue 19): backproject 3.15° / FSC-0.5 shell 13 in 89 s, psgd 3.41° / 13 in 96 s. Without
            ``reestimate`` only the minibatch strategies run (warm-started).
        reestimate: each iteration estimates the half maps anew from the current poses, with the spectral
            prior of their one-pass half-map FSC (RELION's scheme, :mod:`jaxcryo.poses._volume`); ``False``:
            warm-started epochs on the Tikhonov objective (a minibatch strategy only).
        top_k: pose assignment of the local searches: 1 = hard (each image at its best candidate); K > 1 =
            soft: each image enters the volume update at its K most likely candidates with their posterior
            weights (:func:`assign_poses`); the particles' poses are the best candidates either way.
        lam: Tikhonov weight of the volume updates.
        batch_size: images per step of the volume updates and of the pose scoring.
        interp: slice operator name for scoring and updates.
        fsc_weighting: score against each half map weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` of the
            last half-map FSC (the map's SNR weighting, as RELION's and cryoSPARC's references for alignment),
            not against the raw half map, whose noisy high shells add pose error.
        score_oversample: the scoring operator oversamples the map this many times (with the gridding
            correction): plain trilinear slices bias the best pose by degrees, which the volume updates (plain
            operator: exact batch diagonal) do not suffer from.
        score_memory: score entries (images x candidates) held at once by a search at most (the pose search
            scores fewer images per call than ``batch_size`` below it).
        seed: half-set split and data order (and the phase randomisation of the closing postprocess).
        particle_diameter: diameter (Å) of the soft spherical mask (:func:`jaxcryo.ndimage.spherical_mask`)
            of the closing postprocess when no mask is given; ``None``: :data:`DIAMETER_FRACTION` of the box.
            The same diameter (:meth:`mask_diameter`) shapes the solvent mask of ``solvent_mask``.
        scale_reference: issue 19: before the first iteration, rescale the reference to the images' intensity
            (:func:`jaxcryo.poses._scale.reference_scale`): the least-squares scores are not scale invariant,
            and a reference on another scale (another program's map) biases every pose.
        solvent_mask: issue 19 prototype: the references the poses are scored against are multiplied by a soft
            spherical solvent mask of :meth:`mask_diameter` Å (:func:`jaxcryo.poses._centring.solvent_mask`),
            as RELION's ``--particle_diameter``.
        recentre: issue 19 prototype: after each volume update, move the half maps so that their density is
            centred, and the particles' origins with them (:func:`jaxcryo.poses._centring.recentre`).
        whiten: issue 19 prototype: score with the per-shell noise spectrum of the residuals at the current
            poses (:mod:`jaxcryo.poses._noise`; the first global search: the images' own power spectrum), as the
            :class:`~jaxcryo.poses.Scorer`'s ``shell_weights``.
        offset_sigma_px: issue 19 prototype: a Gaussian prior of this width (px) on the origins, centred at each
            image's current origin (the :class:`~jaxcryo.poses.Scorer`'s ``offset_sigma``), on the scale of
            log-likelihoods by the noise estimate (a white one unless ``whiten``); ``None``: flat.
    """

    init_resolution: float = 30.0
    global_step: float = 15.0
    global_iterations: int = 1
    local_step: float = 2.5
    min_step: float = 0.6
    local_radius_steps: float = 2.0
    max_shift_px: float = 6.0
    global_shift_step_px: float = 2.0
    local_shift_step_px: float = 1.0
    local_shift_steps: int = 2
    kmax_margin: int = 4
    iterations: int = 12
    patience: int = 1
    epochs_per_iteration: int = 2
    optimizer: "str | Strategy" = "backproject"
    reestimate: bool = True
    top_k: int = 1
    lam: float = 1e-3
    batch_size: int = 200
    interp: str = "trilinear"
    fsc_weighting: bool = True
    score_oversample: int = 2
    score_memory: int = 1 << 26
    seed: int = 0
    particle_diameter: float | None = None
    scale_reference: bool = True
    solvent_mask: bool = False
    recentre: bool = False
    whiten: bool = False
    offset_sigma_px: float | None = None

    def __post_init__(self):
        integers(self, ("iterations", "global_iterations", "epochs_per_iteration", "top_k", "batch_size", "score_oversample",
                        "score_memory"), 1)
        integers(self, ("local_shift_steps", "kmax_margin", "patience", "seed"), 0)
        positive(self, ("init_resolution", "global_step", "local_step", "min_step", "local_radius_steps",
                        "global_shift_step_px", "local_shift_step_px"))
        non_negative(self, ("max_shift_px", "lam"))
        if self.global_step > 90:
            fail(self, "global_step", "expected at most 90 degrees")
        strategy = make_strategy(self.optimizer)  # an unknown name: InputError (optimizer)
        if not self.reestimate and not isinstance(strategy, MinibatchStrategy):
            fail(self, "optimizer", "expected a minibatch strategy (psgd, sgd, adam) for warm-started updates "
                 "(reestimate=False)")
        make_operator(self.interp)  # an unknown operator name: InputError (interp)
        if self.particle_diameter is not None:
            positive(self, ("particle_diameter",))
        if self.offset_sigma_px is not None:
            positive(self, ("offset_sigma_px",))

    def mask_diameter(self, box: int, pixel_size: float) -> float:
        """The diameter (Å) of the postprocess's spherical mask: ``particle_diameter``, or
        :data:`DIAMETER_FRACTION` x ``box`` x ``pixel_size``."""
        if self.particle_diameter is not None:
            return float(self.particle_diameter)
        return DIAMETER_FRACTION * box * pixel_size

    def to_dict(self) -> dict:
        """The settings as JSON data (the optimizer by its registry name)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["optimizer"] = self.optimizer if isinstance(self.optimizer, str) else strategy_name(self.optimizer)
        return d


@dataclass
class RefineState:
    """Everything a refinement carries between iterations (checkpointed as data). ``plans``: the volume
    updates' measured :class:`~jaxcryo.solvers.Plan` per half-set size (measured once per run)."""

    half_maps: list  # two centred Fourier volumes (complex64)
    rotations: np.ndarray | None  # (n, 3, 3) RELION matrices, None before the first global search
    shifts: np.ndarray  # (n, 2) Å
    resolution: float  # Å, half-map FSC 0.143 (the initial low-pass before the first iteration)
    step: float  # current angular step (degrees)
    shift_step_px: float
    iteration: int = 0
    stalls: int = 0
    history: list = field(default_factory=list)
    plans: dict = field(default_factory=dict)


class RefineResult(NamedTuple):
    """What :func:`~jaxcryo.poses.refine` returns. ``postprocess``: the closing
    :func:`jaxcryo.post.postprocess` of the final half maps (masked FSC corrected by phase randomisation,
    sharpened map), ``None`` when it could not run (``postprocess_error`` says why; the resolution is then the
    unmasked half-map FSC's); ``postprocess_warnings``: its warnings (no B-factor fitted, unmasked fallback);
    ``mask``: the mask it used (the given one, or the spherical mask of ``mask_diameter`` Å)."""

    metadata: ParticleMetadata  # the particles with the refined poses (and rlnRandomSubset)
    state: RefineState
    history: list
    final: ReconstructResult  # the closing known-pose reconstruction
    postprocess: PostprocessResult | None = None
    postprocess_error: str | None = None
    postprocess_warnings: tuple[str, ...] = ()
    mask: np.ndarray | None = None
    mask_diameter: float | None = None  # Å, the spherical mask's (None: a given mask)
    warnings: tuple[str, ...] = ()  # issue 19: drift, collapse, stall (jaxcryo.poses._diagnostics)

    @property
    def resolution_0143(self) -> float:
        """The final resolution (Å): the corrected masked FSC's 0.143 crossing, or the unmasked half-map
        FSC's without a postprocess."""
        return float(self.postprocess.resolution_0143 if self.postprocess is not None
                     else self.final.fsc_half.resolution_0143)

    @property
    def resolution_05(self) -> float:
        """As :attr:`resolution_0143`, at FSC 0.5."""
        return float(self.postprocess.resolution_05 if self.postprocess is not None
                     else self.final.fsc_half.resolution_05)


def _trees(state: RefineState) -> dict:
    n = len(state.shifts)
    rot = np.zeros((n, 3, 3)) if state.rotations is None else state.rotations
    return {"half_maps": [jnp.asarray(v) for v in state.half_maps], "rotations": rot, "shifts": state.shifts}


def save_state(stem: "str | Path", state: RefineState, settings: RefineSettings, local_only: bool) -> None:
    """Checkpoint ``state`` at ``stem`` (``.npz`` + ``.json``, atomically): maps and poses as arrays, the
    rest (and the measured step sizes) as JSON."""
    plans = {str(k): p.eta for k, p in state.plans.items()}
    save_run(Path(stem), KIND, settings.to_dict(), _trees(state), {
        "local_only": local_only, "has_rotations": state.rotations is not None, "resolution": state.resolution,
        "step": state.step, "shift_step_px": state.shift_step_px, "iteration": state.iteration,
        "stalls": state.stalls, "history": state.history, "plans": plans})


def load_state(stem: "str | Path", template: RefineState, settings: RefineSettings) -> tuple[RefineState, bool]:
    """The state checkpointed at ``stem`` (shapes from ``template``) and its ``local_only``; the settings must
    be those of the checkpoint but for ``iterations``."""
    # with solvent_mask the particle diameter shapes the scored references too: then it may not change
    may_change = tuple(k for k in FINISHING if not (settings.solvent_mask and k == "particle_diameter"))
    trees, meta = load_run(Path(stem), KIND, settings.to_dict(), _trees(template), may_change=may_change)
    plans = {str(k): Plan(float(eta)) for k, eta in meta.get("plans", {}).items()}
    state = RefineState(list(trees["half_maps"]), np.asarray(trees["rotations"]) if meta["has_rotations"] else None,
                        np.asarray(trees["shifts"]), float(meta["resolution"]), float(meta["step"]),
                        float(meta["shift_step_px"]), int(meta["iteration"]), int(meta["stalls"]),
                        list(meta["history"]), plans)
    return state, bool(meta["local_only"])
