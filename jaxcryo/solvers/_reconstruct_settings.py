"""The settings of a known-pose reconstruction, validated when made (:class:`ReconstructSettings`).

``ReconstructSettings(optimizer="psgd", epochs=5)`` raises :class:`~jaxcryo.errors.InputError` naming the
parameter for an invalid value (``epochs 0: expected at least 1``); the command line shows the parameter as
its flag. :func:`jaxcryo.solvers.reconstruct` takes a settings value or the same names as keywords.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import InputError
from ..forward._operators import SliceOperator, Trilinear, make_operator
from ..leastsq._priors import Prior
from ._spectral import PRIORS, HalfMapFSC, TikhonovChoice
from ._strategies import Strategy, make_strategy


def _integer(name: str, value: Any, low: int, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{{param}} {value!r}: expected an integer", param=name)
    if value < low:
        raise InputError(f"{{param}} {value}: expected {what or f'at least {low}'}", param=name)


def _real(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or (value <= 0 if positive else value < 0):
        raise InputError(f"{{param}} {value!r}: expected a finite number {'> 0' if positive else '>= 0'}", param=name)


@dataclasses.dataclass(frozen=True)
class ReconstructSettings:
    """What a known-pose reconstruction does (:func:`jaxcryo.solvers.reconstruct`).

    Attributes:
        optimizer: a strategy name (:data:`jaxcryo.solvers.STRATEGY_NAMES`) or a
            :class:`~jaxcryo.solvers.Strategy` value.
        epochs: passes over the data (CG: iterations), at least 1.
        batch_size: images per step (the last batch of an epoch is padded and masked), at least 1.
        lr: step size overriding the strategy's measured one (``None``: measured), > 0.
        interp: slice operator name (``nearest`` | ``trilinear`` | ``nufft``) or a
            :class:`~jaxcryo.forward.SliceOperator`.
        probes: Hutchinson probes per step for ``psgd`` (0: exact diagonal).
        lam: Tikhonov weight of the objective (with ``prior="fsc"``: of the one-pass half estimates the prior
            is estimated from, and a floor on the prior's weights), >= 0.
        prior: ``"tikhonov"`` (``lam``), ``"fsc"`` (the spectral prior from the half-map FSC, RELION's tau^2),
            a :class:`~jaxcryo.solvers.HalfMapFSC` (with a fudge factor) or a :class:`~jaxcryo.leastsq.Prior`.
        box: Fourier-crop the images to this box first (``None``: the images' box).
        halfmaps: reconstruct two random halves independently and report the gold-standard FSC.
        mask: apply a soft spherical mask before the FSCs.
        seed: the seed of the half split, the batch order and the probes, >= 0.
        devices: local devices to split the data passes over (``None``: all JAX sees; or a
            :class:`jax.sharding.Mesh`); validated by :func:`jaxcryo.parallel.resolve_mesh`.
        prefetch: minibatches read ahead by a background thread (0: off). The result does not depend on it.
        skip_bad: leave out images with NaN/inf instead of failing.
    """

    optimizer: str | Strategy = "backproject"
    epochs: int = 10
    batch_size: int = 256
    lr: float | None = None
    interp: str | SliceOperator = Trilinear()
    probes: int = 1
    lam: float = 1e-3
    prior: str | HalfMapFSC | TikhonovChoice | Prior | None = "fsc"
    box: int | None = None
    halfmaps: bool = True
    mask: bool = False
    seed: int = 0
    devices: Any = None
    prefetch: int = 1
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.strategy()  # an unknown optimizer name: InputError (optimizer)
        make_operator(self.interp)  # an unknown operator name: InputError (interp)
        _integer("epochs", self.epochs, 1)
        _integer("batch_size", self.batch_size, 1)
        if self.lr is not None:
            _real("lr", self.lr, positive=True)
        _integer("probes", self.probes, 0, "0 (exact diagonal) or more")
        _real("lam", self.lam, positive=False)
        p = self.prior
        if isinstance(p, str) and p not in PRIORS:
            raise InputError(f"{{param}} {p!r}: expected one of {', '.join(PRIORS)}", param="prior")
        if not (p is None or isinstance(p, (str, HalfMapFSC, TikhonovChoice, Prior))):
            raise InputError(f"{{param}}: expected a Prior, a name in {tuple(PRIORS)} or None, got "
                             f"{type(p).__name__}", param="prior")
        if self.box is not None:
            _integer("box", self.box, 2)
        _integer("seed", self.seed, 0)
        _integer("prefetch", self.prefetch, 0, "0 (off) or more")

    def strategy(self) -> Strategy:
        """The :class:`~jaxcryo.solvers.Strategy` of ``optimizer`` (with ``probes`` and ``lr``)."""
        return make_strategy(self.optimizer, probes=self.probes, lr=self.lr)

    def replace(self, **changes: Any) -> "ReconstructSettings":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameter names (the fields)."""
        return tuple(f.name for f in dataclasses.fields(cls))


def settings_from(settings: "ReconstructSettings | str | Strategy | None", options: dict) -> ReconstructSettings:
    """``settings`` with the keyword ``options`` applied (``reconstruct(ds, optimizer="psgd", epochs=5)`` and
    ``reconstruct(ds, settings)`` both work; a name or strategy in place of ``settings`` is the optimizer).
    Raises ``TypeError`` for a keyword that is not a setting."""
    if settings is None:
        settings = ReconstructSettings()
    elif not isinstance(settings, ReconstructSettings):
        options = {"optimizer": settings, **options}
        settings = ReconstructSettings()
    unknown = sorted(set(options) - set(ReconstructSettings.names()))
    if unknown:
        raise TypeError(f"reconstruct() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    return settings.replace(**options) if options else settings
