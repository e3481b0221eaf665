"""Streaming: peak memory of `jaxcryo reconstruct` does not grow with the stack (issue 4)."""

import dataclasses
import resource
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np

from jaxcryo.io.star import write_star
from jaxcryo.simulate import simulate


def _write_set(out: Path, n: int, box: int = 64):
    sim = simulate(n_particles=64, box=box, snr=1.0, seed=0)
    md = sim.metadata.subset(np.arange(n) % 64)
    md = dataclasses.replace(md, image_files=np.array([str(out) + ".mrcs"] * n, dtype=object),
                             image_indices=np.arange(n))
    with mrcfile.new_mmap(str(out) + ".mrcs", shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        for s in range(0, n, 64):
            e = min(s + 64, n)
            m.data[s:e] = sim.images[: e - s]
        m.voxel_size = md.pixel_size
    write_star(str(out) + ".star", md)
    return Path(str(out) + ".mrcs").stat().st_size


def _peak_rss_kb(star: Path) -> int:
    """Peak RSS of a fresh `jaxcryo reconstruct` process (kB), from a helper process that runs only it."""
    exe = str(Path(sys.executable).parent / "jaxcryo")
    code = (
        "import resource, subprocess, sys;"
        f"subprocess.run([{exe!r}, 'reconstruct', {str(star)!r}, '--out', {str(star) + '.out'!r},"
        " '--optimizer', 'backproject', '--box', '16', '--no-halfmaps', '--quiet'], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_stack(tmp_path):
    _write_set(tmp_path / "small", 500)
    big_bytes = _write_set(tmp_path / "big", 12000)  # ~197 MB of images
    small = _peak_rss_kb(tmp_path / "small.star")
    big = _peak_rss_kb(tmp_path / "big.star")
    growth = (big - small) * 1024
    print(f"peak RSS small {small / 1024:.0f} MB, big {big / 1024:.0f} MB, stack {big_bytes / 2**20:.0f} MB")
    assert growth < 0.5 * big_bytes, (small, big, big_bytes)
