"""Post-processing of half maps (:mod:`._postprocess`: masked, phase-randomised and corrected FSC, Guinier
B-factor, sharpening, FSC weighting, low-pass) and writing the results (:mod:`._write`). The masks live in
:mod:`jaxcryo.ndimage` and are re-exported here."""

from ..ndimage._masks import (
    auto_mask as auto_mask, auto_threshold as auto_threshold, low_pass as low_pass,
    soft_sphere_mask as soft_sphere_mask, spherical_mask as spherical_mask,
)
from ._postprocess import (
    CORRECTION_OFFSET as CORRECTION_OFFSET, FIT_FROM as FIT_FROM, FIT_TO as FIT_TO,
    FSC_WEIGHT_FLOOR as FSC_WEIGHT_FLOOR, RANDOMISE_AT_FSC as RANDOMISE_AT_FSC,
    PostprocessResult as PostprocessResult, check_half_maps as check_half_maps, corrected_fsc as corrected_fsc,
    fsc_weights as fsc_weights, guinier_fit as guinier_fit, postprocess as postprocess,
    randomise_phases as randomise_phases,
)
from ._write import (
    JSON_NAME as JSON_NAME, MAP_NAME as MAP_NAME, MASKED_MAP_NAME as MASKED_MAP_NAME,
    write_postprocess as write_postprocess,
)
