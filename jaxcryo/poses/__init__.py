"""Unknown poses: pose scoring, the search engine, gold-standard refinement and ab initio."""

from ._abinitio import (
    HANDEDNESS as HANDEDNESS, AbinitioSettings as AbinitioSettings, AbinitioResult as AbinitioResult,
    kmax_schedule as kmax_schedule, shell_rates as shell_rates, check_settings as check_settings,
    abinitio as abinitio,
)
from ._align import (
    MapAlignment as MapAlignment, rotate_map as rotate_map, translate_to as translate_to,
    align_map_to as align_map_to, truth_metrics as truth_metrics,
)
from ._assign import SoftPoses as SoftPoses, with_poses as with_poses
from ._refine import (
    lowpass as lowpass, prepare_reference as prepare_reference, fsc_weighted as fsc_weighted,
    search_method as search_method, update_strategy as update_strategy, refine_iteration as refine_iteration,
    done as done, initial_state as initial_state, refine as refine, half_map_volumes as half_map_volumes,
    finish_refinement as finish_refinement, scale_reference as scale_reference,
)
from ._scoring import (
    score_pixels as score_pixels, score_poses as score_poses, score_local as score_local,
    BestPoses as BestPoses, best_poses as best_poses, PoseWeights as PoseWeights,
    soft_weights as soft_weights,
)
from ._search import (
    SearchResult as SearchResult, Assignment as Assignment, assign_poses as assign_poses, Scorer as Scorer,
    AbstractSearchMethod as AbstractSearchMethod, GlobalSearch as GlobalSearch, LocalSearch as LocalSearch,
    Cascade as Cascade, orthonormalise as orthonormalise, PoseSearch as PoseSearch,
)
from ._state import (
    RefineSettings as RefineSettings, RefineState as RefineState, RefineResult as RefineResult,
    save_state as save_state, load_state as load_state, DIAMETER_FRACTION as DIAMETER_FRACTION,
)
