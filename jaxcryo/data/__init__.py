"""Particle sources (files, arrays, crops), batches of static shape, simulated data sets."""

from ._batch import (
    complex_dtype as complex_dtype, Batch as Batch, RawBatch as RawBatch, make_batch as make_batch,
    to_batch as to_batch, epoch_batches as epoch_batches, prefetch as prefetch, load_batch as load_batch,
    iterate_batches as iterate_batches, check_batch_inputs as check_batch_inputs,
)
from ._checks import (
    Selection as Selection, find_bad_images as find_bad_images, usable_particles as usable_particles,
)
from ._simulate import (
    PHANTOM_ATOMS as PHANTOM_ATOMS, PHANTOM_SEED as PHANTOM_SEED, phantom as phantom,
    SimulatedData as SimulatedData, random_ctf_params as random_ctf_params,
    project_metadata as project_metadata, simulate as simulate, perturbed_metadata as perturbed_metadata,
    without_poses as without_poses,
)
from ._sources import (
    ParticleSource as ParticleSource, read_particles as read_particles, require_poses as require_poses,
    ParticleDataset as ParticleDataset, ArrayDataset as ArrayDataset, CroppedSource as CroppedSource,
    split_halves as split_halves, write_dataset as write_dataset,
)
