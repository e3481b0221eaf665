"""Exceptions raised by jaxcryo for problems a user can act on.

The library never prints or exits; the command line maps :class:`InputError` to exit code 2 with a
one-line message.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad or inconsistent user input (a file, a field, a flag).

    The message names the file and/or field and says what was expected.
    """


class DivergenceError(RuntimeError):
    """An optimiser produced a non-finite or exploding loss (e.g. a learning rate too large)."""
