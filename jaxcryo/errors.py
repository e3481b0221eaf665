"""Exceptions raised by jaxcryo for problems a user can act on.

The library never prints or exits, and its messages name *parameters* (``batch_size``), files and fields,
never command-line flags. An error about a parameter carries its name in ``param`` and marks where the
message mentions it with the placeholder ``{param}``; ``str(error)`` shows the parameter name, and the
command line shows its flag instead (:meth:`JaxcryoError.render`), with exit code 2 and one line.
"""

from __future__ import annotations

PLACEHOLDER = "{param}"


def why(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: message"`` of a caught exception on one line, at most ``limit`` characters of message:
    for an :class:`InputError` that wraps a library's failure to parse a file."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


class JaxcryoError(Exception):
    """Base of jaxcryo's user-facing errors. ``param``: the library parameter at fault, if any."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.template = message
        self.param = param

    def render(self, name: str | None = None) -> str:
        """The message with the parameter shown as ``name`` (default: the parameter's own name)."""
        return self.template.replace(PLACEHOLDER, name or self.param or "parameter")

    def __str__(self) -> str:
        return self.render()


class InputError(JaxcryoError, ValueError):
    """Bad or inconsistent user input (a file, a field, a parameter).

    The message names the file and/or field and says what was expected.
    """


class DivergenceError(JaxcryoError, RuntimeError):
    """An optimiser produced a non-finite or exploding loss (e.g. a learning rate too large)."""
