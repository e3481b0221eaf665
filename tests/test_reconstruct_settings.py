"""Issue 17: the library owns reconstruct's configuration (``ReconstructSettings``, validated, errors naming the
parameter), its input checks (``jaxcryo.data.usable_particles``), the one per-epoch FSC record
(``jaxcryo.ndimage.fsc_record``) and the one writer of the standard outputs (``jaxcryo.io.write_outputs``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.data import ArrayDataset, simulate, usable_particles
from jaxcryo.errors import InputError
from jaxcryo.io import ConvergencePlot, OutputFiles, fsc_json, output_folder, read_map, write_outputs
from jaxcryo.ndimage import fsc, fsc_record


@pytest.mark.parametrize("changes, param", [
    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"probes": -1}, "probes"), ({"lam": -1e-3}, "lam"), ({"prior": "wiener"}, "prior"), ({"box": 1}, "box"),
    ({"seed": -1}, "seed"), ({"prefetch": -1}, "prefetch"), ({"optimizer": "lbfgs"}, "optimizer"),
    ({"interp": "cubic"}, "interp"), ({"epochs": 2.5}, "epochs"),
])
def test_invalid_settings_name_the_parameter(changes, param):
    with pytest.raises(InputError) as e:
        jc.ReconstructSettings(**changes)
    assert e.value.param == param and param in str(e.value)
    with pytest.raises(InputError) as e:  # the same through replace (what reconstruct's keywords do)
        jc.ReconstructSettings().replace(**changes)
    assert e.value.param == param


def test_settings_defaults_and_names():
    s = jc.ReconstructSettings()
    assert (s.optimizer, s.epochs, s.batch_size, s.lam, s.prior, s.seed) == ("backproject", 10, 256, 1e-3, "fsc", 0)
    assert s.strategy().name == "backproject" and jc.ReconstructSettings(optimizer="psgd", probes=0).strategy().probes == 0
    assert set(jc.ReconstructSettings.names()) >= {"optimizer", "epochs", "skip_bad", "devices", "prefetch"}
    with pytest.raises(TypeError, match="unexpected keyword"):
        jc.reconstruct(None, epoch=3)  # a misspelt setting is a TypeError, before anything is read


@pytest.fixture(scope="module")
def small():
    sim = simulate(n_particles=24, box=16, snr=10.0, seed=3)
    return sim, ArrayDataset(sim.metadata, sim.images)


def test_settings_value_equals_keywords(small):
    sim, ds = small
    a = jc.reconstruct(ds, optimizer="backproject", prior="tikhonov", progress=False, reference=sim.volume)
    b = jc.reconstruct(ds, jc.ReconstructSettings(optimizer="backproject", prior="tikhonov"), progress=False,
                       reference=sim.volume)
    c = jc.reconstruct(ds, "backproject", prior="tikhonov", progress=False, reference=sim.volume)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.volume, c.volume)
    assert a.config == b.config == c.config
    # the per-epoch record is the one FSC function's
    rec = fsc_record(a.volume, sim.volume, pixel_size=a.pixel_size)
    assert a.history[-1]["fsc_ref"] == pytest.approx(rec["fsc_ref"], abs=1e-5)
    assert rec["fsc_ref"] == pytest.approx(list(fsc(a.volume, sim.volume, a.pixel_size).fsc))
    assert fsc_record(None, sim.volume) == {"resolution_05_ref": None, "fsc_ref": None}


def test_bad_images_are_checked_by_the_library(small):
    sim, _ = small
    imgs = sim.images.copy()
    imgs[[2, 5], 1, 1] = np.nan
    ds = ArrayDataset(sim.metadata, imgs)
    with pytest.raises(InputError, match="2 image") as e:
        jc.reconstruct(ds, optimizer="backproject", progress=False)
    assert e.value.param == "skip_bad"
    told = []
    sel = usable_particles(ds, skip_bad=True, warn=told.append)
    assert sel.skipped == 2 and len(sel.indices) == 22 and 2 not in sel.indices and 5 not in sel.indices
    assert told == ["skipping 2 image(s) with NaN/inf"]
    res = jc.reconstruct(ds, optimizer="backproject", skip_bad=True, progress=False, warn=told.append)
    assert res.skipped == 2 and res.config["n_particles"] == 22 and np.all(np.isfinite(res.volume))


def test_write_outputs_in_order(small, tmp_path):
    sim, ds = small
    res = jc.reconstruct(ds, optimizer="backproject", progress=False, reference=sim.volume)
    out = tmp_path / "o"
    written = write_outputs(out, pixel_size=res.pixel_size,
                            maps={"map.mrc": res.volume, "half1.mrc": res.half1, "half2.mrc": res.half2,
                                  "none.mrc": None},
                            fsc=fsc_json(res.fsc_half, res.fsc_ref), fsc_curves={"half maps": res.fsc_half},
                            history=res.history, convergence=ConvergencePlot({"bp": res.history}),
                            run={"command": "test"})
    assert [p.name for p in written] == ["map.mrc", "half1.mrc", "half2.mrc", "fsc.json", "fsc.png",
                                         "history.json", "convergence.png", "run.json"]
    assert np.array_equal(read_map(out / "map.mrc")[0], res.volume)
    f = json.loads((out / "fsc.json").read_text())
    assert f["resolution_0143"] == pytest.approx(res.fsc_half.resolution_0143)
    assert f["reference"]["fsc"] == pytest.approx(list(res.fsc_ref.fsc))
    assert json.loads((out / "history.json").read_text())[0]["epoch"] == 1
    # renamed and dropped files
    only = write_outputs(out, fsc=res.fsc_half, files=OutputFiles(fsc_json="half.json", run=None), run={"x": 1})
    assert [p.name for p in only] == ["half.json"]
    assert fsc_json(None) == {"resolution_0143": None, "resolution_05": None, "frequency": [], "fsc": []}
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder") as e:
        output_folder(tmp_path / "file")
    assert e.value.param == "out"
