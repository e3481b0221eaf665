"""Writing a :class:`~jaxcryo.post.PostprocessResult` to a folder (maps and JSON; the figures are drawn by
:func:`jaxcryo.plotting.plot_postprocess`)."""

from __future__ import annotations

from pathlib import Path

from ..io.outputs import OutputFiles, write_outputs
from ._postprocess import PostprocessResult

#: The files :func:`write_postprocess` writes (the masked map only with a mask).
MAP_NAME, MASKED_MAP_NAME, JSON_NAME = "postprocess.mrc", "postprocess_masked.mrc", "postprocess.json"


def write_postprocess(result: PostprocessResult, out_dir, extra: dict | None = None) -> list[Path]:
    """Write ``postprocess.mrc`` (the sharpened, weighted, low-passed average), ``postprocess_masked.mrc`` (that
    times the mask, when there is one) and ``postprocess.json`` (:meth:`PostprocessResult.to_dict`, plus
    ``extra`` under the key ``inputs``) into ``out_dir``, atomically. Returns the paths written."""
    d = result.to_dict()
    if extra:
        d["inputs"] = extra
    only_json = OutputFiles(fsc_json=None, fsc_png=None, history=None, convergence=None, run=JSON_NAME)
    return write_outputs(out_dir, pixel_size=result.pixel_size,
                         maps={MAP_NAME: result.map, MASKED_MAP_NAME: result.masked_map}, run=d, files=only_json)
