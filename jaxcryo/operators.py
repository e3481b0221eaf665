"""Slice operators: how a central slice samples the centred Fourier volume at off-grid points.

A slice operator is an :class:`equinox.Module` mapping a centred Fourier volume ``(N, N, N)`` (``[z, y, x]``,
DC at ``N//2``) and points ``(..., 3)`` in Fourier-voxel units of that grid (``(x, y, z)`` order) to the
values there. It is linear in the volume (its adjoint, the backprojection, comes from
``jax.linear_transpose``). The subclasses:

* :class:`Nearest`: the nearest Fourier voxel (with ``oversample == 1`` the least-squares Hessian is exactly
  diagonal);
* :class:`Trilinear`: trilinear interpolation between the 8 neighbouring voxels;
* :class:`NUFFT`: exact trigonometric interpolation of the DFT by a type-2 non-uniform FFT (jax-finufft).

``Nearest`` and ``Trilinear`` take ``oversample = s``: the volume is first zero-padded ``s``-fold in real
space (finer Fourier sampling, more accurate slices).

Facts other modules need are properties of the operator, never string comparisons:

* :attr:`SliceOperator.has_local_stencil`: each point reads only the (at most 8) voxels of its grid cube
  on the ``N``-grid, so the Hessian is a 27-point stencil and its exact diagonal is the backprojection of
  ``M CTF^2`` through the squared weights (:meth:`SliceOperator.squared_weight_slice`);
* :attr:`SliceOperator.has_diagonal_hessian`: the Hessian is exactly diagonal (the Wiener filter is then the
  exact least-squares solution);
* :meth:`SliceOperator.weight_kernel`: the local operator whose (plain-weight) backprojection of ``M CTF^2``
  serves as the ``CTF^2`` weights of a one-pass (Wiener) estimate, as RELION and cryoDRGN do.

The registry :data:`OPERATORS` maps the user-facing names (``--interp``) to classes and feeds every CLI's
choices. Adding an operator is one subclass and one registry line.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jax_finufft import nufft2

from .errors import InputError
from .fourier import fft3c, ifft3c


def _gather(vol, iz, iy, ix):
    """``vol[iz, iy, ix]`` with zeros outside the grid."""
    n = vol.shape[-1]
    valid = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
    flat = (jnp.clip(iz, 0, n - 1) * n + jnp.clip(iy, 0, n - 1)) * n + jnp.clip(ix, 0, n - 1)
    return jnp.where(valid, vol.reshape(-1)[flat], 0)


def slice_nearest(vol_f, points):
    """Nearest-voxel values of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz)."""
    c = jnp.rint(points).astype(jnp.int32) + vol_f.shape[-1] // 2
    return _gather(vol_f, c[..., 2], c[..., 1], c[..., 0])


def slice_trilinear(vol_f, points, weight_power: int = 1):
    """Trilinear interpolation of the centred Fourier volume at ``points`` ``(..., 3)`` (voxel units, xyz).

    ``weight_power=2`` sums the 8 neighbours with squared weights: its transpose applied to ``CTF^2``
    backprojects the exact Hessian diagonal (:func:`jaxcryo.hessian.batch_diagonal_sum`).
    """
    c = points + vol_f.shape[-1] // 2
    c0 = jnp.floor(c)
    f = (c - c0).astype(jnp.real(vol_f).dtype)
    i0 = c0.astype(jnp.int32)
    out = 0
    for dz in (0, 1):
        wz = f[..., 2] if dz else 1 - f[..., 2]
        for dy in (0, 1):
            wy = f[..., 1] if dy else 1 - f[..., 1]
            for dx in (0, 1):
                wx = f[..., 0] if dx else 1 - f[..., 0]
                val = _gather(vol_f, i0[..., 2] + dz, i0[..., 1] + dy, i0[..., 0] + dx)
                out = out + (wz * wy * wx) ** weight_power * val
    return out


def slice_nufft(vol_f, points, eps: float | None = None):
    """Exact (trigonometric) interpolation of the DFT ``vol_f`` at ``points`` by a type-2 NUFFT.

    ``V(q) = sum_r v(r) exp(-2 pi i q . r / N)`` with ``v = ifft3c(vol_f)`` on the centred grid.
    """
    n = vol_f.shape[-1]
    if eps is None:
        eps = 1e-12 if vol_f.dtype == jnp.complex128 else 1e-6
    vol = ifft3c(vol_f)
    shape = points.shape[:-1]
    p = points.reshape(-1, 3) * (2 * jnp.pi / n)
    # jax-finufft: modes f[k1, k2, k3] in CMCL (centred) order, points (x, y, z) paired with (k1, k2, k3);
    # our volume is [z, y, x], so pass the z coordinate first.
    vals = nufft2(vol, p[:, 2], p[:, 1], p[:, 0], iflag=-1, eps=eps)
    return vals.reshape(shape)


def oversampled(vol_f, s: int):
    """The centred Fourier volume of ``vol_f`` zero-padded ``s``-fold in real space (``(sN,)*3``)."""
    if s == 1:
        return vol_f
    n = vol_f.shape[-1]
    vol = ifft3c(vol_f)
    pad = (s * n) // 2 - n // 2
    return fft3c(jnp.pad(vol, [(pad, s * n - n - pad)] * 3))


class SliceOperator(eqx.Module):
    """Abstract slice operator (see the module docstring). Subclasses implement :meth:`slice`."""

    #: The class has a local stencil in some configuration (nearest/trilinear without oversampling).
    local_capable: ClassVar[bool] = False
    #: With a local stencil, the Hessian is exactly diagonal (nearest-voxel slices on the ``N``-grid).
    diagonal_when_local: ClassVar[bool] = False

    def slice(self, vol_f, points):
        """Values of the centred Fourier volume ``vol_f`` ``(N, N, N)`` at ``points`` ``(..., 3)``."""
        raise NotImplementedError

    @property
    def has_local_stencil(self) -> bool:
        """Each point reads only the voxels of its grid cube on the ``N``-grid (27-point Hessian stencil)."""
        return False

    @property
    def has_diagonal_hessian(self) -> bool:
        """The least-squares Hessian is exactly diagonal."""
        return self.has_local_stencil and self.diagonal_when_local

    def squared_weight_slice(self, vol, points):
        """The slice with squared interpolation weights (real ``vol``); its transpose applied to
        ``M CTF^2`` is the exact Hessian diagonal. Only for operators with a local stencil."""
        raise NotImplementedError(
            f"the exact Hessian diagonal needs a slice operator with a local stencil "
            f"({', '.join(n for n, c in OPERATORS.items() if c.local_capable)} without oversampling), "
            f"not {describe(self)}; use the Hutchinson estimator"
        )

    def weight_kernel(self) -> "SliceOperator":
        """The local operator whose backprojection of ``M CTF^2`` (plain weights) gives the ``CTF^2`` weights
        of a one-pass (Wiener) estimate: the operator itself when it is local, else trilinear."""
        return self if self.has_local_stencil else Trilinear()


class _GridOperator(SliceOperator):
    """Operators that read voxels of a (possibly oversampled) grid: nearest and trilinear."""

    oversample: int = eqx.field(static=True, default=1)
    local_capable: ClassVar[bool] = True

    def __check_init__(self):
        if self.oversample < 1 or int(self.oversample) != self.oversample:
            raise ValueError(f"oversample must be a positive integer, got {self.oversample}")

    @property
    def has_local_stencil(self) -> bool:
        return self.oversample == 1

    def _kernel(self, vol_f, points, weight_power: int = 1):
        raise NotImplementedError

    def slice(self, vol_f, points):
        s = self.oversample
        return self._kernel(oversampled(vol_f, s), points * s)

    def squared_weight_slice(self, vol, points):
        if not self.has_local_stencil:
            return super().squared_weight_slice(vol, points)
        return self._kernel(vol, points, weight_power=2)


class Nearest(_GridOperator):
    """Nearest Fourier voxel."""

    diagonal_when_local: ClassVar[bool] = True

    def _kernel(self, vol_f, points, weight_power: int = 1):
        return slice_nearest(vol_f, points)  # weights are 0/1: squaring changes nothing


class Trilinear(_GridOperator):
    """Trilinear interpolation between the 8 neighbouring Fourier voxels."""

    def _kernel(self, vol_f, points, weight_power: int = 1):
        return slice_trilinear(vol_f, points, weight_power)


class NUFFT(SliceOperator):
    """Exact interpolation of the DFT by a type-2 NUFFT (``eps``: requested accuracy; default 1e-6 in
    single precision, 1e-12 in double)."""

    eps: float | None = eqx.field(static=True, default=None)

    def slice(self, vol_f, points):
        return slice_nufft(vol_f, points, self.eps)


#: The slice operators by user-facing name (``--interp``). Adding one: a subclass and a line here.
OPERATORS: dict[str, type[SliceOperator]] = {
    "nearest": Nearest,
    "trilinear": Trilinear,
    "nufft": NUFFT,
}
#: The names, in registry order (CLI choices).
OPERATOR_NAMES: tuple[str, ...] = tuple(OPERATORS)


def make_operator(name: str, **options) -> SliceOperator:
    """The operator registered as ``name`` with ``options`` (e.g. ``oversample=2``).

    Raises ``ValueError`` naming the parameter ``interp`` for an unknown name.
    """
    if isinstance(name, SliceOperator):
        return name
    try:
        cls = OPERATORS[name]
    except KeyError:
        raise InputError(f"{{param}} {name!r}: expected one of {', '.join(OPERATOR_NAMES)}", param="interp") from None
    fields = set(cls.__dataclass_fields__)
    for k in options:
        if k not in fields:
            raise InputError(f"{{param}} {name!r} takes no option {k!r}", param="interp")
    return cls(**options)


def as_operator(op: "SliceOperator | str") -> SliceOperator:
    """``op`` itself, or the registered operator of that name with default options."""
    return op if isinstance(op, SliceOperator) else make_operator(op)


def operator_name(op: SliceOperator) -> str:
    """The registry name of ``op``'s class."""
    for name, cls in OPERATORS.items():
        if type(op) is cls:
            return name
    return type(op).__name__


def describe(op: SliceOperator) -> str:
    """``name`` or ``name (oversample s)`` for messages and records."""
    s = getattr(op, "oversample", 1)
    return operator_name(op) + (f" (oversample {s})" if s != 1 else "")
