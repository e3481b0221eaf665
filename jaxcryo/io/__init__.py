"""File formats: MRC/MRCS (:mod:`.mrc`), RELION STAR (:mod:`.star`), cryoSPARC .cs (:mod:`.cryosparc`),
cryoDRGN pickles (:mod:`.cryodrgn`). Conventions are converted to RELION's here and only here.

Every map a command reads goes through :func:`read_volume` (:mod:`._validate`): checked once, at the input
boundary, and named by its role in every message ("reference x.mrc: 32768 of 32768 voxels are NaN")."""

from .cryodrgn import apply_poses, read_ctf_pickle, read_pose_pickle
from .cryosparc import read_cs
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .mrc import open_stack, read_map, stack_pixel_size, stack_shape, write_map, write_stack
from .star import read_star, write_star
from ._validate import (
    MapRole as MapRole, Volume as Volume, ROLES as ROLES, REFERENCE as REFERENCE, HALF_MAP as HALF_MAP,
    MASK as MASK, VOLUME as VOLUME, PROJECTED as PROJECTED, COMPARED as COMPARED, TRUTH as TRUTH, MAP as MAP,
    read_volume as read_volume, check_values as check_values, require_same_grid as require_same_grid,
    require_extent as require_extent,
)
from .outputs import ConvergencePlot, OutputFiles, fsc_json, output_folder, versions, write_json, write_outputs

__all__ = ["apply_poses", "read_ctf_pickle", "read_pose_pickle", "read_cs", "open_stack", "read_map",
           "stack_pixel_size", "stack_shape", "write_map", "write_stack", "read_star", "write_star",
           "MapRole", "Volume", "ROLES", "REFERENCE", "HALF_MAP", "MASK", "VOLUME", "PROJECTED", "COMPARED", "TRUTH",
           "MAP", "read_volume", "check_values", "require_same_grid", "require_extent",
           "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint",
           "ConvergencePlot", "OutputFiles", "fsc_json", "output_folder", "versions", "write_json", "write_outputs"]
