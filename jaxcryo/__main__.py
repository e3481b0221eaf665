"""``python -m jaxcryo ...``: the ``jaxcryo`` command (``python -m jaxcryo_main`` also quiets XLA's C++ log
before JAX loads; see :mod:`jaxcryo_main`)."""

import sys

from .cli import console_main

sys.exit(console_main())
