"""The ``jaxcryo`` command line.

Each subcommand lives in its own module ``jaxcryo/cli/<name>.py`` defining ``register(subparsers)`` (adds
its parser and sets ``func`` to a function ``args -> int``). :class:`jaxcryo.errors.InputError` becomes
exit code 2 with a one-line message on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("simulate", "project", "fsc", "reconstruct", "condition", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcryo",
        description="Differentiable cryo-EM 3D reconstruction in JAX (known poses, preconditioned SGD).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"jaxcryo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:  # subcommand not built yet
            if e.name and e.name.endswith(f"cli.{name}"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from ..errors import DivergenceError, InputError

    try:
        return int(args.func(args) or 0)
    except (InputError, DivergenceError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jaxcryo {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcryo {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``jaxcryo`` console script: :func:`main` with each warning printed as one line on stderr
    (``jaxcryo: warning: ...``) instead of Python's two-line format with a source line."""
    import warnings

    def _one_line(message, category, filename, lineno, file=None, line=None):
        print(f"jaxcryo: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = _one_line
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
