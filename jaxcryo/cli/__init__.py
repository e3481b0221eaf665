"""The ``jaxcryo`` command line.

Each subcommand lives in its own module ``jaxcryo/cli/<name>.py`` defining ``register(subparsers)`` (adds
its parser and sets ``func`` to a function ``args -> int``). :class:`jaxcryo.errors.InputError` becomes
exit code 2 with a one-line message on stderr and no traceback.

``--platform cpu|gpu`` (anywhere on the line, e.g. ``jaxcryo --platform cpu reconstruct ...`` or
``jaxcryo reconstruct ... --platform cpu``) is read from ``argv`` before any subcommand module, and so
JAX, is imported: it sets ``JAX_PLATFORMS`` (``cpu`` or ``cuda``), which JAX reads once, at import. When JAX
is already imported in this process (``main`` called from Python), the platform is set through
``jax.config`` if no backend has started yet; if one has and it differs, or the platform has no device,
the command exits 2 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..compilation_cache import enable_compilation_cache
from ..errors import JaxcryoError

#: Disables the persistent compilation cache (``jaxcryo.compilation_cache``) for this run.
NO_CACHE_FLAG = "--no-compilation-cache"

SUBCOMMANDS = ("simulate", "project", "fsc", "reconstruct", "refine", "abinitio", "condition", "demo", "mask",
               "postprocess")

#: Subcommands that join a multi-process run (``--coordinator``, ``--num-processes``, ``--process-id`` or
#: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; :mod:`jaxcryo.parallel`).
DISTRIBUTED = ("reconstruct",)

#: Library parameters whose flag is not ``--`` + the name with ``-`` for ``_``.
FLAGS = {"lam": "--lambda", "max_shift_px": "--max-shift", "offset_sigma_px": "--offset-sigma"}


def flag_for(param: str) -> str:
    """The command-line flag of library parameter ``param`` (``batch_size`` -> ``--batch-size``)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


#: ``--platform`` value -> JAX platform name (``JAX_PLATFORMS``).
PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}


def _platform_arg(argv: list[str]) -> str | None:
    """The value of the last ``--platform X`` / ``--platform=X`` in ``argv`` (before a ``--``), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--platform" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--platform="):
            value = a.split("=", 1)[1]
    return value


def select_platform(name: str) -> str | None:
    """Make JAX use platform ``name`` (``cpu`` or ``gpu``); return None, or a one-line error message.

    Before JAX is imported this sets ``JAX_PLATFORMS``; after, ``jax.config`` while no backend has started;
    once one has, only the platform already in use is accepted. Checks that the platform has a device.
    """
    if name not in PLATFORMS:
        return f"--platform {name}: unknown platform; expected one of {', '.join(PLATFORMS)}"
    jax_name = PLATFORMS[name]
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = jax_name
    import jax

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: assume started, check the active backend
        started = True
    if not started:
        jax.config.update("jax_platforms", jax_name)
    try:
        active = jax.default_backend()
    except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError, AssertionError, ... for a missing plugin
        why = " ".join(str(e).split())[:200] or f"{type(e).__name__} initialising JAX platform {jax_name!r}"
        return f"--platform {name}: JAX finds no {name} device ({why})"
    if (active == "cpu") != (name == "cpu"):
        return (f"--platform {name}: JAX already runs on {active} in this process; "
                f"set JAX_PLATFORMS={jax_name} before JAX is imported")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcryo",
        description="Differentiable cryo-EM 3D reconstruction in JAX (known poses, preconditioned SGD).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"jaxcryo {__version__}")
    parser.add_argument("--platform", dest="global_platform", choices=tuple(PLATFORMS), default=None,
                        help="JAX platform for any subcommand (default: what JAX finds); read before JAX starts")
    parser.add_argument(NO_CACHE_FLAG, action="store_true",
                        help="do not use the persistent JAX compilation cache (~/.cache/jaxcryo/jax, or "
                             "$JAXCRYO_CACHE_DIR; also JAXCRYO_NO_COMPILATION_CACHE=1)")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    if command in DISTRIBUTED:
        try:  # a multi-process run is joined before --platform (or anything) starts JAX's devices
            from ..parallel._distributed import initialize, settings_from_argv

            initialize(**settings_from_argv(argv))
        except JaxcryoError as e:
            print(f"jaxcryo {command}: error: {e.render(flag_for(e.param)) if e.param else e}", file=sys.stderr)
            return 2
    platform = _platform_arg(argv)
    if platform is not None:  # before build_parser: the subcommand modules import JAX
        err = select_platform(platform)
        if err is not None:
            print(f"jaxcryo: error: {err}", file=sys.stderr)
            return 2
    if NO_CACHE_FLAG in argv:  # accepted anywhere on the line, like --platform
        argv = [a for a in argv if a != NO_CACHE_FLAG]
    else:
        enable_compilation_cache()  # a second run of the same shapes does not recompile
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except JaxcryoError as e:  # InputError, DivergenceError: the parameter shown as its flag
        msg = e.render(flag_for(e.param)) if e.param else str(e)
        msg = msg.splitlines()[0] if msg else type(e).__name__
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
