"""Arrays on the voxel and pixel grid: centred FFTs, frequency grids and shells (:mod:`._fourier`), FSC and resolution (:mod:`._metrics`), soft edges and masks (:mod:`._masks`)."""

from ._fourier import (
    fftc as fftc, ifftc as ifftc, fft2c as fft2c, ifft2c as ifft2c, fft3c as fft3c, ifft3c as ifft3c,
    freq_indices as freq_indices, freq_grid_2d as freq_grid_2d, freq_grid_3d as freq_grid_3d,
    radius_grid as radius_grid, shell_index as shell_index, ball_mask as ball_mask,
    crop_fourier as crop_fourier, pad_fourier as pad_fourier, resize_fourier as resize_fourier,
    resample_real as resample_real,
)
from ._masks import (
    raised_cosine as raised_cosine, frequency_edge as frequency_edge, soft_sphere_mask as soft_sphere_mask,
    spherical_mask as spherical_mask, auto_mask as auto_mask, auto_threshold as auto_threshold,
    low_pass as low_pass, shell_of as shell_of, MASK_LOWPASS_A as MASK_LOWPASS_A,
    MASK_EXTEND_PX as MASK_EXTEND_PX, MASK_SOFT_EDGE_PX as MASK_SOFT_EDGE_PX,
    SPHERE_SOFT_EDGE_PX as SPHERE_SOFT_EDGE_PX,
)
from ._metrics import (
    EMPTY_SHELL_POWER as EMPTY_SHELL_POWER, FSCResult as FSCResult, first_shell_below as first_shell_below,
    resolution_at as resolution_at, fsc as fsc, fsc_record as fsc_record, relative_error as relative_error,
)
