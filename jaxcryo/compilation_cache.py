"""A persistent JAX compilation cache, so a second run with the same shapes does not recompile.

:func:`enable_compilation_cache` points JAX's persistent cache at a user cache folder (``$JAXCRYO_CACHE_DIR``,
else ``$XDG_CACHE_HOME/jaxcryo/jax``, else ``~/.cache/jaxcryo/jax``) and caches every compiled function
(jaxcryo's steps are small on a CPU, but a cold start compiles dozens of them). The ``jaxcryo`` command
calls it at start-up; set ``JAXCRYO_NO_COMPILATION_CACHE=1`` (or pass ``--no-compilation-cache``) to opt out.
Library users call it themselves if they want it (importing jaxcryo changes no global JAX setting).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

#: Environment variable that disables the cache when set to a non-empty value other than ``0``.
OPT_OUT_ENV = "JAXCRYO_NO_COMPILATION_CACHE"
#: Environment variable naming the cache folder.
DIR_ENV = "JAXCRYO_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$JAXCRYO_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxcryo/jax``, else ``~/.cache/jaxcryo/jax``."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "jaxcryo" / "jax"


def opted_out() -> bool:
    """True when ``$JAXCRYO_NO_COMPILATION_CACHE`` asks for no cache."""
    return os.environ.get(OPT_OUT_ENV, "") not in ("", "0")


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_cache_dir`).

    Returns the folder, or ``None`` when opted out (environment) or when the folder cannot be created (a
    read-only home, say: the run then just compiles as usual).
    """
    if opted_out():
        return None
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
