"""Lean traces: fitted caches go to a sidecar file (or into the trace, or nowhere), one entry per slot,
replaced rather than added to; repeated attribution leaves the trace's size alone; caches are checked
against the trace; `inspect` lists sizes and `clean` removes caches (and results) and compacts."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import Subset

from lightning_tda import ClassificationTask, TDACallback, Trace, TraceError
from lightning_tda.cli import main
from lightning_tda.demo import DigitsDataModule, MLPClassifier
from lightning_tda.methods import SOURCE, EKFACInfluence
from lightning_tda.trace.cache import sidecar_path

SIZES = [64, 12, 10]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 64-12-10 digits MLP trained 24 steps in 2 segments; a fresh copy of its trace per test."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("storage") / "trace.h5"
    dm = DigitsDataModule(batch_size=64, seed=0)
    # four streamed statistics steps per segment (past the budget): SOURCE then fits from the streamed covariances
    callback = TDACallback(str(path), task=ClassificationTask(), segments=2, strict_budget=False)
    quiet_trainer(max_epochs=2, limit_train_batches=12, callbacks=[callback]).fit(MLPClassifier(sizes=SIZES), dm)
    return {"path": path, "train": Subset(dm.train_set, range(160)), "queries": Subset(dm.test_set, range(6))}


@pytest.fixture
def trace_copy(recorded, tmp_path):
    path = tmp_path / "run" / "trace.h5"
    path.parent.mkdir()
    shutil.copy(recorded["path"], path)
    return path


def _attribute(path, recorded, cache, **options):
    """One attribution call as `lightning-tda attribute` makes it: EK-FAC and SOURCE, scores saved into the trace.
    SOURCE's unrolled response fits curvature per segment (``"auto"`` would take the first-order one on this
    2-epoch run, which fits none)."""
    trace, task = Trace.open(path), ClassificationTask()
    saved = []
    for cls, response in ((EKFACInfluence, {}), (SOURCE, {"response": "unrolled"})):
        method = cls(trace, MLPClassifier(sizes=SIZES), task, cache=cache, **response, **options)
        saved += [method.attribute(recorded["queries"], recorded["train"]), method.self_influence(recorded["train"])]
    for scores in saved:
        scores.save(path)
    return saved


def _final_slot(path) -> str:
    """EK-FAC IF's slot: covariances recomputed at the final checkpoint."""
    return f"curvature-ekfac-recompute-checkpoints{Trace.open(path).final_checkpoint.index}"


def _cache_slots(path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return {name: bytes(group.attrs["key"]).decode() for name, group in f["cache"].items()}


@pytest.mark.parametrize("cache", ["sidecar", "trace"])
def test_repeated_attribution_leaves_the_trace_size_unchanged_after_the_first(cache, recorded, trace_copy):
    recorded_size = trace_copy.stat().st_size
    first = _attribute(trace_copy, recorded, cache, correction_examples=64)
    size = trace_copy.stat().st_size
    sidecar = sidecar_path(trace_copy)
    assert sidecar.exists() == (cache == "sidecar")
    cache_file = sidecar if cache == "sidecar" else trace_copy
    slots = _cache_slots(cache_file)
    assert sorted(slots) == [  # EK-FAC at the final checkpoint, SOURCE per segment
        _final_slot(trace_copy),
        "curvature-ekfac-stream-segment0",
        "curvature-ekfac-stream-segment1",
    ]
    cache_size = cache_file.stat().st_size
    for _ in range(2):
        again = _attribute(trace_copy, recorded, cache, correction_examples=64)
        assert trace_copy.stat().st_size == size and cache_file.stat().st_size == cache_size
        for a, b in zip(first, again):
            assert torch.equal(a.values, b.values)
    # other options refit into the same slots (replacing, not adding): nothing grows
    _attribute(trace_copy, recorded, cache, correction_examples=96)
    assert trace_copy.stat().st_size == size and cache_file.stat().st_size == cache_size
    replaced = _cache_slots(cache_file)
    assert sorted(replaced) == sorted(slots) and all(replaced[s] != slots[s] for s in slots)
    if cache == "sidecar":  # the trace only gained the results
        with h5py.File(trace_copy, "r") as f:
            assert len(f["cache"]) == 0 and len(f["results"]) == 4
        assert size - recorded_size < 100_000


def test_no_cache_writes_nothing(recorded, trace_copy):
    _attribute(trace_copy, recorded, "none", correction_examples=64)
    assert not sidecar_path(trace_copy).exists() and _cache_slots(trace_copy) == {}


def test_a_cache_that_does_not_fit_the_trace_is_refitted(recorded, trace_copy):
    reference = _attribute(trace_copy, recorded, "sidecar", correction_examples=64)
    sidecar = sidecar_path(trace_copy)
    with h5py.File(sidecar, "a") as f:  # same key, wrong shape: an edited or corrupt file
        group = f[f"cache/{_final_slot(trace_copy)}"]
        del group["net.0/q_s"]
        group.create_dataset("net.0/q_s", data=np.zeros((5, 5)))
    with pytest.warns(UserWarning, match=r"does not fit the trace's layers \(net.0/q_s is float64 \(5, 5\), expected"):
        again = _attribute(trace_copy, recorded, "sidecar", correction_examples=64)
    assert torch.equal(again[0].values, reference[0].values)
    with h5py.File(sidecar, "r") as f:  # replaced by the refit
        assert f[f"cache/{_final_slot(trace_copy)}/net.0/q_s"].shape == (12, 12)

    with h5py.File(sidecar, "a") as f:  # a sidecar left by another run at the same path: ignored and replaced
        f.attrs["trace_run_id"] = "another-run"
    _attribute(trace_copy, recorded, "sidecar", correction_examples=64)
    with h5py.File(sidecar, "r") as f:
        assert f.attrs["trace_run_id"] == Trace.open(trace_copy).run_id

    sidecar.write_text("someone else's file")  # not a cache: left alone, with a clear error
    with pytest.raises(TraceError, match="is not a lightning_tda cache; it is left alone"):
        _attribute(trace_copy, recorded, "sidecar", correction_examples=64)
    assert sidecar.read_text() == "someone else's file"


def test_inspect_lists_sizes_and_clean_removes_caches_and_compacts(recorded, trace_copy, capsys):
    _attribute(trace_copy, recorded, "trace", correction_examples=64)
    _attribute(trace_copy, recorded, "sidecar", correction_examples=64)
    before = Trace.open(trace_copy)
    assert main(["inspect", str(trace_copy)]) == 0
    printed = capsys.readouterr().out
    assert "results: ekfac " in printed and f"cache inside the trace: {_final_slot(trace_copy)} " in printed
    assert "cache sidecar trace.cache.h5 (" in printed and f"lightning-tda clean {trace_copy}" in printed

    size = trace_copy.stat().st_size
    assert main(["clean", str(trace_copy)]) == 0
    assert "removed sidecar trace.cache.h5, 3 cache entries" in capsys.readouterr().out
    assert not sidecar_path(trace_copy).exists() and _cache_slots(trace_copy) == {}
    assert trace_copy.stat().st_size < size
    after = Trace.open(trace_copy)  # everything recorded is still there
    assert after.run_id == before.run_id and after.checkpoints == before.checkpoints
    np.testing.assert_array_equal(after.steps().loss, before.steps().loss)
    assert after.loss_checks() == before.loss_checks()
    assert torch.equal(after.kfac_sums(1, "net.2")["S_sum"], before.kfac_sums(1, "net.2")["S_sum"])
    assert sorted(h5py.File(trace_copy, "r")["results"]) == ["ekfac", "ekfac-self", "source", "source-self"]

    assert main(["clean", str(trace_copy), "--results", "true"]) == 0
    assert "4 results entries" in capsys.readouterr().out
    with h5py.File(trace_copy, "r") as f:
        assert len(f["results"]) == 0 and f["steps/step"].maxshape == (None,)  # still appendable


def test_bad_cache_argument(recorded):
    with pytest.raises(ValueError, match="cache='disk': use 'sidecar'"):
        EKFACInfluence(Trace.open(recorded["path"]), MLPClassifier(sizes=SIZES), ClassificationTask(), cache="disk")
