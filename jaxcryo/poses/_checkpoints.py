"""Checkpoints of refinement and ab initio runs: plain data (``<stem>.npz`` + ``<stem>.json`` through
:mod:`jaxcryo.io.checkpoint`, each file replaced atomically), one kind per command, refused when they were
made with other settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.checkpoint import load_checkpoint, save_checkpoint


def checkpoint_stem(path: "str | Path | None") -> Path | None:
    """``DIR/checkpoint`` for ``DIR/checkpoint``, ``DIR/checkpoint.npz`` or ``.json``; ``None`` stays."""
    if path is None:
        return None
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def save_run(stem: Path, kind: str, settings: dict, trees: dict[str, Any], meta: dict) -> None:
    """Write the checkpoint of a ``kind`` run (``settings``: its settings as JSON data)."""
    save_checkpoint(stem, trees, {"kind": kind, "settings": settings, **meta})


def load_run(stem: Path, kind: str, settings: dict, templates: dict[str, Any],
             may_change: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict]:
    """Read back a ``kind`` checkpoint into ``templates``; :class:`InputError` (parameter ``resume``) if there
    is none, it is another command's, or it was made with other ``settings`` (but for ``may_change``, e.g.
    more iterations)."""
    if not Path(f"{stem}.npz").exists():
        raise InputError(f"{stem}.npz: no checkpoint to {{param}} from", param="resume")
    _, meta = load_checkpoint(stem)
    if meta.get("kind") != kind:
        raise InputError(f"{stem}.npz: not a {kind} checkpoint (kind {meta.get('kind')!r})")
    saved = meta.get("settings", {})
    # a setting one side does not know (added by a later version) does not count
    diff = sorted(k for k in set(saved) & set(settings) if k not in may_change and saved[k] != settings[k])
    if diff:
        raise InputError(f"{stem}.npz: checkpoint was made with different settings {diff}; cannot {{param}}",
                         param="resume")
    trees, meta = load_checkpoint(stem, templates)
    return trees, meta
