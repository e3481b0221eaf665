"""Rotations (RELION ZYZ Euler angles, matrices, quaternions, random and preferred orientations) and grids over SO(3) and shifts."""

from ._grids import (
    MIRROR as MIRROR, sphere_directions as sphere_directions, so3_grid_size as so3_grid_size,
    so3_grid as so3_grid, local_offsets as local_offsets, local_grid as local_grid, shift_grid as shift_grid,
    geodesic_distance_deg as geodesic_distance_deg,
    nearest_rotation_distance_deg as nearest_rotation_distance_deg,
    covering_radius_deg as covering_radius_deg, RotationAlignment as RotationAlignment,
    align_rotations as align_rotations,
)
from ._rotations import (
    euler_to_matrix as euler_to_matrix, matrix_to_euler as matrix_to_euler,
    quaternion_to_matrix as quaternion_to_matrix, matrix_to_quaternion as matrix_to_quaternion,
    axis_angle_to_matrix as axis_angle_to_matrix, cryosparc_pose_to_relion as cryosparc_pose_to_relion,
    random_rotations as random_rotations, preferred_orientations as preferred_orientations,
    perturb_rotations as perturb_rotations,
)
