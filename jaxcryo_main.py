"""Launcher of the ``jaxcryo`` command: process settings that must be made before JAX is imported.

Importing any part of the ``jaxcryo`` package imports JAX, and XLA reads its C++ log level once, when JAX
loads. When an executable is loaded from the persistent compilation cache
(:mod:`jaxcryo.compilation_cache`, on by default for the command), XLA's CPU loader writes a spurious
multi-line "ERROR ... machine type ... doesn't match" message per executable (it compares CPU *tuning*
flags such as ``prefer-no-gather``; the cache is keyed by machine, so the code is the host's own). The
command therefore lowers XLA's C++ logging to fatal messages only (``TF_CPP_MIN_LOG_LEVEL=3``) unless the
user set that variable or turned the cache off; Python-level errors and warnings are unaffected.
"""

import os
import sys

NO_CACHE_FLAG = "--no-compilation-cache"


def main() -> int:
    cache_off = NO_CACHE_FLAG in sys.argv[1:] or os.environ.get("JAXCRYO_NO_COMPILATION_CACHE", "") not in ("", "0")
    if not cache_off:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jaxcryo.cli import console_main

    return console_main()


if __name__ == "__main__":  # python -m jaxcryo_main ...
    sys.exit(main())
