"""Checks of settings values: each failure raises :class:`~jaxcryo.errors.InputError` naming the parameter
(the command line shows its flag instead)."""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import InputError


def fail(settings: object, name: str, why: str) -> None:
    """Raise the :class:`InputError` of ``settings.name``: ``"<name> <value>: <why>"``."""
    raise InputError(f"{{param}} {getattr(settings, name)!r}: {why}", param=name)


def is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and bool(np.isfinite(float(v)))


def integers(settings: object, names: tuple[str, ...], least: int) -> None:
    """Each of ``names`` an integer ``>= least``."""
    for name in names:
        v = getattr(settings, name)
        if not is_int(v) or v < least:
            fail(settings, name, "expected a positive integer" if least == 1 else f"expected an integer >= {least}")


def positive(settings: object, names: tuple[str, ...]) -> None:
    """Each of ``names`` a finite number ``> 0``."""
    for name in names:
        v = getattr(settings, name)
        if not (is_number(v) and v > 0):
            fail(settings, name, "expected a positive number")


def non_negative(settings: object, names: tuple[str, ...]) -> None:
    """Each of ``names`` a finite number ``>= 0``."""
    for name in names:
        v = getattr(settings, name)
        if not (is_number(v) and v >= 0):
            fail(settings, name, "expected a number >= 0")
