"""Writing a :class:`~jaxcryo.post.PostprocessResult` to a folder (maps and JSON; the figures are drawn by
:func:`jaxcryo.plotting.plot_postprocess`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_write_text
from ..io.mrc import write_map
from ._postprocess import PostprocessResult

#: The files :func:`write_postprocess` writes (the masked map only with a mask).
MAP_NAME, MASKED_MAP_NAME, JSON_NAME = "postprocess.mrc", "postprocess_masked.mrc", "postprocess.json"


def write_postprocess(result: PostprocessResult, out_dir, extra: dict | None = None) -> list[Path]:
    """Write ``postprocess.mrc`` (the sharpened, weighted, low-passed average), ``postprocess_masked.mrc`` (that
    times the mask, when there is one) and ``postprocess.json`` (:meth:`PostprocessResult.to_dict`, plus
    ``extra`` under the key ``inputs``) into ``out_dir``, atomically. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / MAP_NAME]
    write_map(written[0], result.map, result.pixel_size)
    if result.masked_map is not None:
        written.append(out / MASKED_MAP_NAME)
        write_map(written[-1], result.masked_map, result.pixel_size)
    d = result.to_dict()
    if extra:
        d["inputs"] = extra
    written.append(out / JSON_NAME)
    atomic_write_text(written[-1], json.dumps(d, indent=1) + "\n")
    return written
