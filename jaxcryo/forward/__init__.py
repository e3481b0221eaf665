"""The forward model: CTF, slice operators (nearest, trilinear, NUFFT), the projector, per-particle metadata."""

from ._ctf import (
    electron_wavelength as electron_wavelength, CTFParams as CTFParams, evaluate_ctf as evaluate_ctf,
    RELION_FIELDS as RELION_FIELDS, CRYOSPARC_FIELDS as CRYOSPARC_FIELDS, MAX_VOLTAGE_KV as MAX_VOLTAGE_KV,
    MAX_ABS_CS_MM as MAX_ABS_CS_MM, validate_ctf as validate_ctf, validate_pixel_size as validate_pixel_size,
)
from ._operators import (
    slice_nearest as slice_nearest, slice_trilinear as slice_trilinear, finufft as finufft,
    slice_nufft as slice_nufft, dft_at_points as dft_at_points, GRIDDING_FLOOR as GRIDDING_FLOOR,
    gridding_profile as gridding_profile, oversampled as oversampled, SliceOperator as SliceOperator,
    AbstractGridOperator as AbstractGridOperator, local_stencil_operator as local_stencil_operator,
    Nearest as Nearest, Trilinear as Trilinear, NUFFT as NUFFT, OPERATORS as OPERATORS,
    OPERATOR_NAMES as OPERATOR_NAMES, make_operator as make_operator, as_operator as as_operator,
    operator_name as operator_name, describe as describe,
)
from ._particles import (
    ParticleMetadata as ParticleMetadata,
)
from ._projection import (
    slice_points as slice_points, slice_points_at as slice_points_at, shift_phase as shift_phase, shift_phase_separable as shift_phase_separable, shift_phase_at as shift_phase_at,
    Projector as Projector,
    hermitian_mirror as hermitian_mirror, volume_to_fourier as volume_to_fourier,
    fourier_to_volume as fourier_to_volume,
)
