"""Synthetic data with ground truth: a built-in protein-like phantom and simulated particle stacks.

Everything is seeded: the same arguments give the same volume, poses, CTFs, shifts and noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float
from tqdm.auto import tqdm

from ..forward._ctf import CTFParams
from ..errors import InputError
from ..ndimage._fourier import freq_indices
from ..forward._operators import NUFFT, SliceOperator, make_operator
from ..forward._particles import ParticleMetadata
from ..forward._projection import Projector, volume_to_fourier
from ..rotations._rotations import perturb_rotations, random_rotations

PHANTOM_ATOMS = 64
PHANTOM_SEED = 20250101


def phantom(n: int, n_atoms: int | None = None, seed: int = PHANTOM_SEED, sigma: float = 1.5
            ) -> Float[np.ndarray, "n n n"]:
    """A deterministic, asymmetric, protein-like volume ``(n, n, n)`` float32 ``[z, y, x]``.

    Gaussian "atoms" of standard deviation ``sigma`` voxels (1.5: detail down to about 4 pixels at every box,
    so larger boxes carry higher-resolution signal), positions uniform in a ball of radius ``0.3 n`` about
    the centre, amplitudes in [0.5, 1.5], plus a short asymmetric arm so the object has no symmetry. The
    number of atoms scales with the box (``64 (n/32)^2`` by default: 64 at box 32, 256 at box 64), so the
    object fills its ball at any box. Normalised to max 1.
    """
    if n_atoms is None:
        n_atoms = int(round(PHANTOM_ATOMS * (n / 32.0) ** 2))
    rng = np.random.default_rng(seed)
    s = n / 32.0
    # Uniform in the ball: direction * r^(1/3).
    d = rng.standard_normal((n_atoms, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    centers = d * (0.3 * n) * rng.uniform(0, 1, (n_atoms, 1)) ** (1 / 3)
    # A short asymmetric arm.
    arm = np.linspace(0, 0.25 * n, max(6, int(6 * s)))[:, None] * np.array([[0.8, 0.5, 0.33]]) / np.linalg.norm([0.8, 0.5, 0.33])
    centers = np.concatenate([centers, arm])
    amps = np.concatenate([rng.uniform(0.5, 1.5, n_atoms), np.full(len(arm), 1.0)])
    r = freq_indices(n).astype(np.float64)
    vol = np.zeros((n, n, n))
    h = int(np.ceil(5 * sigma))
    # Each atom is a separable product of 1D Gaussians, evaluated in a window of +-5 sigma.
    for c, a in zip(centers, amps):
        i0 = np.clip(np.rint(c + n // 2).astype(int) - h, 0, n)
        i1 = np.clip(np.rint(c + n // 2).astype(int) + h + 1, 0, n)
        gx = np.exp(-((r[i0[0]:i1[0]] - c[0]) ** 2) / (2 * sigma * sigma))
        gy = np.exp(-((r[i0[1]:i1[1]] - c[1]) ** 2) / (2 * sigma * sigma))
        gz = np.exp(-((r[i0[2]:i1[2]] - c[2]) ** 2) / (2 * sigma * sigma))
        vol[i0[2]:i1[2], i0[1]:i1[1], i0[0]:i1[0]] += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return (vol / vol.max()).astype(np.float32)


@dataclass
class SimulatedData:
    """A simulated data set: metadata (RELION conventions), clean and noisy images, the truth."""

    metadata: ParticleMetadata
    images: np.ndarray  # (n_particles, box, box) float32 noisy
    clean: np.ndarray  # (n_particles, box, box) float32, CTF-modulated, noise-free
    volume: np.ndarray  # (box, box, box) float32 ground truth
    noise_sigma: float


def random_ctf_params(rng: np.random.Generator, n: int, defocus_range=(10000.0, 25000.0), voltage=300.0,
                      cs=2.7, amp_contrast=0.07, max_astigmatism=200.0) -> CTFParams:
    """Random per-image CTF parameters: mean defocus uniform in ``defocus_range`` (Å), astigmatism up to
    ``max_astigmatism`` Å at a uniform angle."""
    df = rng.uniform(defocus_range[0], defocus_range[1], n)
    ast = rng.uniform(0, max_astigmatism, n)
    return CTFParams.create(
        defocus_u=df + ast, defocus_v=df - ast, astig_angle=rng.uniform(0, 180, n), voltage=voltage, cs=cs,
        amp_contrast=amp_contrast, dtype=np.float64,
    )


def project_metadata(vol: Float[ArrayLike, "n n n"], md: ParticleMetadata, operator: SliceOperator | str = NUFFT(),
                     batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Noise-free real-space images ``(n, box, box)`` float32 of ``vol`` for the poses, shifts and CTF of
    ``md`` (the volume must already have the images' box and pixel size), made with the slice ``operator``
    (default the exact NUFFT)."""
    if md.rotations is None:
        raise InputError(f"{md.source or 'particles'}: no poses (rlnAngleRot/Tilt/Psi) to project with")
    n = md.box
    proj = Projector(n=n, pixel_size=float(md.pixel_size), operator=make_operator(operator),
                     mask_radius=n)  # keep every frequency: images, not a least-squares model
    vf = volume_to_fourier(jnp.asarray(vol, jnp.float32))

    @jax.jit
    def f(rot, sh, ctf):
        return proj.images(vf, rot, sh, ctf)

    out = np.empty((len(md), n, n), np.float32)
    for s in tqdm(range(0, len(md), batch_size), desc="project", unit="batch", disable=not progress):
        idx = np.arange(s, min(s + batch_size, len(md)))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # static batch shape
        ctf = None if md.ctf is None else CTFParams(*(jnp.asarray(f_[pad], jnp.float32) for f_ in md.ctf))
        imgs = f(jnp.asarray(md.rotations[pad], jnp.float32), jnp.asarray(md.shifts[pad], jnp.float32), ctf)
        out[idx] = np.asarray(imgs)[: len(idx)]
    if md.contrast_sign is not None:
        out *= np.asarray(md.contrast_sign, np.float32)[:, None, None]
    return out


def simulate(
    n_particles: int = 1000,
    box: int = 32,
    snr: float = 0.1,
    pixel_size: float = 3.0,
    ctf: bool = True,
    max_shift: float | None = None,
    volume: Float[ArrayLike, "n n n"] | None = None,
    seed: int = 0,
    defocus_range=(10000.0, 25000.0),
    voltage: float = 300.0,
    cs: float = 2.7,
    amp_contrast: float = 0.07,
    operator: SliceOperator | str = NUFFT(),
    progress: bool = False,
    rotations: Float[ArrayLike, "k 3 3"] | None = None,
) -> SimulatedData:
    """Simulate a particle set with uniform random poses, random shifts, RELION CTF and white noise.

    Args:
        n_particles: number of images.
        box: image box (px); the phantom is built at this box, a given ``volume`` must have it.
        snr: mean variance of the clean (CTF-modulated) images divided by the noise variance; ``inf`` or
            ``0``-noise via ``snr=float('inf')``.
        pixel_size: Å/px.
        ctf: apply a CTF (defocus uniform in ``defocus_range`` Å, ``voltage`` kV, ``cs`` mm, ``amp_contrast``).
        max_shift: shifts uniform in ``[-max_shift, max_shift]`` Å per axis (default 2 px).
        volume: ground truth ``(box, box, box)``; default :func:`phantom`.
        seed: seeds poses, CTF, shifts and noise.
        operator: slice operator (or its name) used to make the images (default the exact NUFFT).
        rotations: ``(n_particles, 3, 3)`` RELION matrices to use instead of uniform random poses (e.g.
            :func:`jaxcryo.rotations.preferred_orientations`).
    """
    if volume is None:
        volume = phantom(box)
    volume = np.asarray(volume, np.float32)
    if volume.shape != (box,) * 3:
        raise ValueError(f"volume has shape {volume.shape}, expected {(box,) * 3}")
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    if rotations is None:
        rots = np.asarray(random_rotations(key, n_particles, dtype=jnp.float32), np.float64)
    else:
        rots = np.asarray(rotations, np.float64)
        if rots.shape != (n_particles, 3, 3):
            raise ValueError(f"rotations has shape {rots.shape}, expected {(n_particles, 3, 3)}")
    ms = 2.0 * pixel_size if max_shift is None else float(max_shift)
    shifts = rng.uniform(-ms, ms, (n_particles, 2)) if ms > 0 else np.zeros((n_particles, 2))
    ctfp = random_ctf_params(rng, n_particles, defocus_range, voltage, cs, amp_contrast) if ctf else None
    md = ParticleMetadata(
        rotations=rots, shifts=shifts, ctf=ctfp,
        image_files=np.array(["particles.mrcs"] * n_particles, dtype=object),
        image_indices=np.arange(n_particles), pixel_size=float(pixel_size), box=int(box), source="simulated",
    )
    clean = project_metadata(volume, md, operator=operator, progress=progress)
    signal_var = float(np.mean(np.var(clean, axis=(1, 2))))
    sigma = 0.0 if not np.isfinite(snr) else float(np.sqrt(signal_var / snr))
    noise_rng = np.random.default_rng([seed, 1])
    images = clean + (sigma * noise_rng.standard_normal(clean.shape)).astype(np.float32)
    return SimulatedData(metadata=md, images=images.astype(np.float32), clean=clean, volume=volume,
                         noise_sigma=sigma)


def perturbed_metadata(md: ParticleMetadata, angle_deg: float = 0.0, shift_px: float = 0.0,
                       seed: int = 0) -> ParticleMetadata:
    """A copy of ``md`` with each pose rotated by ``angle_deg`` about a random axis
    (:func:`jaxcryo.rotations.perturb_rotations`) and each shift moved by ``shift_px`` pixels in a random
    direction: the start of a local refinement test. Seeded."""
    if md.rotations is None:
        raise InputError(f"{md.source or 'particles'}: no poses to perturb")
    rng = np.random.default_rng([seed, 11])
    phi = rng.uniform(0.0, 2 * np.pi, len(md))
    d = float(shift_px) * md.pixel_size * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    return dataclasses.replace(md, rotations=perturb_rotations(md.rotations, angle_deg, seed),
                               shifts=np.asarray(md.shifts, np.float64) + d)


def without_poses(md: ParticleMetadata) -> ParticleMetadata:
    """A copy of ``md`` with no poses and zero shifts (a global search / ab initio test)."""
    return dataclasses.replace(md, rotations=None, shifts=np.zeros((len(md), 2)), missing_poses="removed")
