"""File formats: MRC/MRCS (:mod:`.mrc`), RELION STAR (:mod:`.star`), cryoSPARC .cs (:mod:`.cryosparc`),
cryoDRGN pickles (:mod:`.cryodrgn`). Conventions are converted to RELION's here and only here."""

from .cryodrgn import apply_poses, read_ctf_pickle, read_pose_pickle
from .cryosparc import read_cs
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .mrc import open_stack, read_map, stack_pixel_size, stack_shape, write_map, write_stack
from .star import read_star, write_star
from .outputs import ConvergencePlot, OutputFiles, fsc_json, output_folder, versions, write_json, write_outputs

__all__ = ["apply_poses", "read_ctf_pickle", "read_pose_pickle", "read_cs", "open_stack", "read_map",
           "stack_pixel_size", "stack_shape", "write_map", "write_stack", "read_star", "write_star",
           "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint",
           "ConvergencePlot", "OutputFiles", "fsc_json", "output_folder", "versions", "write_json", "write_outputs"]
