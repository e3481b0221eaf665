"""Launcher of the ``jaxcryo`` command: process settings that must be made before JAX is imported.

Importing any part of the ``jaxcryo`` package imports JAX, and XLA reads its C++ log level once, when JAX
loads. When an executable is loaded from the persistent compilation cache
(:mod:`jaxcryo.compilation_cache`, on by default for the command), XLA's CPU loader writes a spurious
multi-line "ERROR ... machine type ... doesn't match" message per executable (it compares CPU *tuning*
flags such as ``prefer-no-gather``; the cache is keyed by machine, so the code is the host's own). The
command therefore lowers XLA's C++ logging to fatal messages only (``TF_CPP_MIN_LOG_LEVEL=3``) unless the
user set that variable or turned the cache off; Python-level errors and warnings are unaffected.

Transparent huge pages for the heap: XLA's CPU backend allocates each executable's temporaries afresh on every
call, and arrays over glibc's mmap threshold (32 MiB at most) come from fresh ``mmap``s, so a box-128
backprojection of 256 images page-faults a few hundred MiB in 4 KiB pages per batch: 5.2 million faults and
about 9 s of system time in the 20,000-image known-pose benchmark. glibc 2.35+ can back those mappings with
2 MiB pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which uses ``madvise``), measured 16.1 -> 13.3 s wall
there on one machine and no change on another, where faults cost less (``benchmarks/README.md``). glibc reads
its tunables once, at process start, so when the command would gain from it (Linux, glibc >= 2.35,
transparent huge pages set to ``always`` or ``madvise``) and the user has not set ``glibc.malloc.hugetlb``
themselves, the launcher re-executes itself once with the tunable added,
before anything is imported (the same process id: ``execve``). ``JAXCRYO_HUGEPAGES=0`` turns this off.
"""

import os
import sys

NO_CACHE_FLAG = "--no-compilation-cache"

#: The glibc tunable that backs malloc's large mappings with transparent huge pages.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def hugepage_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute the command in with :data:`HUGETLB_TUNABLE` added, or ``None`` where
    it would not help or was declined: not Linux, glibc older than 2.35 (or not glibc), transparent huge
    pages off (``never``) or unreadable, ``JAXCRYO_HUGEPAGES=0``, or ``glibc.malloc.hugetlb`` already set."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or env.get("JAXCRYO_HUGEPAGES", "") == "0"
            or "glibc.malloc.hugetlb" in tunables or not sys.executable):
        return None
    version = _glibc_version()
    if version is None or version < (2, 35):
        return None
    try:
        with open(_THP_ENABLED) as f:
            mode = f.read()
    except OSError:
        return None
    if "[always]" not in mode and "[madvise]" not in mode:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
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
            pass  # go on in this process, without huge pages
    cache_off = NO_CACHE_FLAG in sys.argv[1:] or os.environ.get("JAXCRYO_NO_COMPILATION_CACHE", "") not in ("", "0")
    if not cache_off:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jaxcryo.cli import console_main

    return console_main()


if __name__ == "__main__":  # python -m jaxcryo_main ...
    sys.exit(main())
