"""Launcher of the ``jaxcryo`` command: process settings that must be made before JAX is imported.

Importing any part of the ``jaxcryo`` package imports JAX, and XLA reads its C++ log level once, when JAX
loads. When an executable is loaded from the persistent compilation cache
(:mod:`jaxcryo.compilation_cache`, on by default for the command), XLA's CPU loader writes a spurious
multi-line "ERROR ... machine type ... doesn't match" message per executable (it compares CPU *tuning*
flags such as ``prefer-no-gather``; the cache is keyed by machine, so the code is the host's own). The
command therefore lowers XLA's C++ logging to fatal messages only (``TF_CPP_MIN_LOG_LEVEL=3``) unless the
user set that variable or turned the cache off; Python-level errors and warnings are unaffected.

Memory settings for XLA's CPU backend: it allocates each executable's temporaries afresh on every call, and
glibc hands large blocks back to the kernel when they are freed (arrays over its mmap threshold, 32 MiB at
most, come from fresh ``mmap``s; the heaps of its per-thread arenas are unmapped when empty), so every batch
of a box-128 reconstruction page-faults its temporaries in again and the kernel zeroes them again: 5.2 million
faults and 9-10 s of system time (18% of the samples in ``clear_page``) in the 20,000-image known-pose
benchmark. The command therefore runs with glibc tunables (:data:`MALLOC_TUNABLES`) that keep freed memory
for reuse: one arena, no ``mmap`` for large blocks, no trimming of the heap (``HEAP_REUSE``), and, where the
kernel offers transparent huge pages (``always`` or ``madvise``) and glibc is 2.35+, 2 MiB pages for what is
still faulted in (``glibc.malloc.hugetlb=1``). Measured in ``benchmarks/README.md`` ("Box 128"). glibc reads
its tunables once, at process start, so the launcher re-executes itself once with them added, before anything
is imported (the same process id: ``execve``). It adds none of them when the user has set any
``glibc.malloc`` tunable; ``JAXCRYO_HUGEPAGES=0`` leaves out the huge pages and ``JAXCRYO_HEAP_REUSE=0`` the
heap reuse (the price of reuse: the process keeps its peak heap until it exits).
"""

import os
import sys

NO_CACHE_FLAG = "--no-compilation-cache"

#: The glibc tunable that backs malloc's large mappings with transparent huge pages.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
#: glibc tunables that keep freed memory in the process for reuse (one arena, no mmap'd blocks, no trimming).
HEAP_REUSE_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                       "glibc.malloc.trim_threshold=1099511627776")
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def _huge_pages_available() -> bool:
    version = _glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(_THP_ENABLED) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def malloc_tunables(environ: dict[str, str] | None = None) -> list[str]:
    """The glibc tunables the command adds for the environment ``environ``: :data:`HEAP_REUSE_TUNABLES` (on
    glibc, unless ``JAXCRYO_HEAP_REUSE=0``) and :data:`HUGETLB_TUNABLE` (glibc 2.35+ with transparent huge
    pages ``always`` or ``madvise``, unless ``JAXCRYO_HUGEPAGES=0``); none when not on Linux or when
    ``GLIBC_TUNABLES`` already names a ``glibc.malloc`` tunable (the user's own choice)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return []
    if _glibc_version() is None:  # musl or unknown: no glibc tunables
        return []
    out = [] if env.get("JAXCRYO_HEAP_REUSE", "") == "0" else list(HEAP_REUSE_TUNABLES)
    if env.get("JAXCRYO_HUGEPAGES", "") != "0" and _huge_pages_available():
        out.append(HUGETLB_TUNABLE)
    return out


def hugepage_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute the command in, with :func:`malloc_tunables` added to
    ``GLIBC_TUNABLES``, or ``None`` when there is nothing to add (which is also what the re-executed process
    finds, so it runs once)."""
    env = dict(os.environ if environ is None else environ)
    add = malloc_tunables(env)
    if not add or not sys.executable:
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + add)
    return env


def _is_program() -> bool:
    """Whether this process *is* the command (the ``jaxcryo`` console script or ``python -m jaxcryo_main``),
    not a Python session that called :func:`main` (a notebook, a test runner): only the command may replace
    its process."""
    path = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.basename(path) in ("jaxcryo", "jaxcryo_main.py")


def main() -> int:
    env = hugepage_environment() if _is_program() else None
    if env is not None:  # once: the new process finds the tunable set
        try:  # the same command line, interpreter options included
            os.execve(sys.executable, getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv], env)
        except OSError:
            pass  # go on in this process, with glibc's defaults
    cache_off = NO_CACHE_FLAG in sys.argv[1:] or os.environ.get("JAXCRYO_NO_COMPILATION_CACHE", "") not in ("", "0")
    if not cache_off:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jaxcryo.cli import console_main

    return console_main()


if __name__ == "__main__":  # python -m jaxcryo_main ...
    sys.exit(main())
