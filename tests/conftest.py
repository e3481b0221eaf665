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

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the project (real files from other cryo-EM packages); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
