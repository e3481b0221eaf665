import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# The persistent compilation cache makes repeated shapes (many tests, subprocess runs) compile once; XLA's
# CPU loader logs a spurious error line per cached executable unless its C++ log level is set before JAX
# loads (see jaxcryo_main.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jaxcryo.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()

def assert_same_run(full: Path, resumed: Path) -> list:
    """The maps of two ``reconstruct`` output folders are identical bit for bit and their histories have the
    same losses; returns the resumed run's history."""
    import json

    import numpy as np

    from jaxcryo import read_map

    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        a, _ = read_map(full / name)
        b, _ = read_map(resumed / name)
        assert np.array_equal(a, b), (name, float(np.abs(a - b).max()))
    h_full = json.loads((full / "history.json").read_text())
    h_res = json.loads((resumed / "history.json").read_text())
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    return h_res


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the project (real files from other cryo-EM packages); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
