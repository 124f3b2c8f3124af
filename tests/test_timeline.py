"""Timeline: the one-pass per-segment sums, the top-k truncation (totals exact), the learning-rate phases,
and saving into / loading from a trace's results, with malformed stored timelines refused."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lightning_tda import Scores, Timeline, TraceError
from lightning_tda.timeline import ScoreSums, SegmentSpans, learning_rate_phase

S, Q, N = 3, 4, 50


def _spans(segments=(0, 1, 2)) -> SegmentSpans:
    count = len(segments)
    steps = np.array([[1 + 10 * i, 10 * (i + 1)] for i in range(count)])
    return SegmentSpans(
        np.array(segments),
        steps,
        np.array([[i, i] for i in range(count)]),
        np.array([0.1, 0.05, 0.01][:count]),
        ["warm-up", "constant rate", "decay"][:count],
        3,
    )


def _accumulate(keep_all_bytes: int, batch: int = 7, seed: int = 0) -> tuple[ScoreSums, torch.Tensor]:
    """Random per-segment scores added in batches of training columns, shuffled within each segment."""
    generator = torch.Generator().manual_seed(seed)
    parts = torch.randn(S, Q, N, generator=generator, dtype=torch.float64)
    sums = ScoreSums(Q, N, torch.device("cpu"), scale=0.5, segments=[0, 1, 2], max_bytes=keep_all_bytes)
    for s in range(S):
        sums.enter(s)
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, batch):
            columns = order[start : start + batch]
            half = parts[s][:, columns] / 2  # two adds per batch, as two checkpoints of a segment
            sums.add(columns, half)
            sums.enter(s)
            sums.add(columns, half)
    return sums, parts * 0.5


def test_score_sums_keep_each_segment_and_the_exact_total():
    sums, parts = _accumulate(keep_all_bytes=S * Q * N * 4)
    timeline = sums.timeline(_spans(), torch.arange(N) + 100, torch.arange(Q), "source", {"unit": "u"})
    assert timeline.kept is None and timeline.shape == (S, Q, N)
    torch.testing.assert_close(timeline.values, parts.float())
    torch.testing.assert_close(timeline.total().values, parts.sum(0).float())
    assert timeline.total().method == "source" and timeline.total().config == {"unit": "u"}
    # without segments: only the total, the same numbers
    plain = ScoreSums(Q, N, torch.device("cpu"), scale=0.5)
    for s in range(S):
        plain.enter(s)
        plain.add(torch.arange(N), parts[s] * 2)
    torch.testing.assert_close(plain.scores(), parts.sum(0))


@pytest.mark.parametrize("in_memory", [True, False])
def test_top_k_keeps_the_strongest_proponents_and_opponents_and_the_exact_total(in_memory):
    sums, parts = _accumulate(keep_all_bytes=S * Q * N * 4 if in_memory else 1000)
    keep = 5 if in_memory else None  # beyond the memory bound, DEFAULT_KEEP applies: here all 50 examples
    timeline = sums.timeline(_spans(), torch.arange(N), torch.arange(Q), "tracin", {}, keep=keep)
    totals = parts.sum(0)
    torch.testing.assert_close(timeline.totals, totals.float())  # every example, whatever is kept
    if not in_memory:
        assert timeline.kept.shape == (Q, N)
        torch.testing.assert_close(timeline.series(0, torch.arange(N)), parts[:, 0].float())
        return
    assert timeline.shape == (S, Q, 2 * keep) and timeline.kept.shape == (Q, 2 * keep)
    for row in range(Q):
        top = totals[row].topk(keep).indices
        bottom = totals[row].topk(keep, largest=False).indices
        assert timeline.kept[row, :keep].tolist() == top.tolist()
        assert sorted(timeline.kept[row, keep:].tolist()) == sorted(bottom.tolist())
        torch.testing.assert_close(timeline.series(row, top), parts[:, row, top].float())
        torch.testing.assert_close(timeline.series(row, bottom), parts[:, row, bottom].float())
        dropped = next(i for i in range(N) if i not in timeline.kept[row].tolist())
        with pytest.raises(KeyError, match=f"Training example {dropped} has no per-segment scores.*larger keep"):
            timeline.series(row, [dropped])


def test_spilled_slices_truncate_to_the_default_keep(monkeypatch):
    import lightning_tda.timeline as timeline_module

    monkeypatch.setattr(timeline_module, "DEFAULT_KEEP", 3)
    sums, parts = _accumulate(keep_all_bytes=1000)  # 2400 bytes of slices: spilled to a temporary file
    timeline = sums.timeline(_spans(), torch.arange(N), torch.arange(Q), "source", {})
    assert timeline.shape == (S, Q, 6)
    for row in range(Q):
        torch.testing.assert_close(timeline.values[:, row], parts[:, row, timeline.kept[row]].float())


def test_sums_refuse_segments_out_of_order_and_bad_keep():
    sums = ScoreSums(Q, N, torch.device("cpu"), segments=[0, 2])
    with pytest.raises(RuntimeError, match="before enter"):
        sums.add(torch.arange(2), torch.zeros(Q, 2))
    sums.enter(2)
    with pytest.raises(RuntimeError, match="Segment 0 entered out of order"):
        sums.enter(0)
    unfinished = ScoreSums(Q, N, torch.device("cpu"), segments=[0, 2])
    unfinished.enter(0)
    with pytest.raises(RuntimeError, match="ended before it entered segment 2"):
        unfinished.scores()
    done, _ = _accumulate(S * Q * N * 4)
    with pytest.raises(ValueError, match="keep=0"):
        done.timeline(_spans(), torch.arange(N), torch.arange(Q), "source", {}, keep=0)


def test_learning_rate_phases_and_labels():
    assert learning_rate_phase(np.linspace(0.0, 0.1, 10)) == "warm-up"
    assert learning_rate_phase(np.cos(np.linspace(0, 1.5, 10))) == "decay"
    assert learning_rate_phase(np.r_[np.linspace(0.01, 0.1, 5), np.linspace(0.1, 0.02, 5)]) == "warm-up and decay"
    assert learning_rate_phase(np.full(10, 0.1) + 1e-5 * np.arange(10)) == "constant rate"
    sums, _ = _accumulate(S * Q * N * 4)
    timeline = sums.timeline(_spans(), torch.arange(N), torch.arange(Q), "source", {})
    assert timeline.label(2) == "steps 21–30 (segment 3 of 3, during the decay)"
    assert timeline.label(1) == "steps 11–20 (segment 2 of 3, at a constant rate)"


@pytest.fixture
def saved(tmp_path):
    sums, _ = _accumulate(S * Q * N * 4)
    timeline = sums.timeline(_spans(), torch.arange(N) + 7, torch.tensor([9, 3, 5, 1]), "source", {"k": [1, 2]}, keep=4)
    path = tmp_path / "trace.h5"
    timeline.total().save(path)
    assert timeline.save(path) == "source-timeline"
    return timeline, path


def test_save_and_load_through_the_trace_results(saved):
    timeline, path = saved
    assert Timeline.available(path) == ["source-timeline"] and Scores.available(path) == ["source"]
    loaded = Timeline.load(path, "source-timeline")
    for key in ("values", "totals", "train_ids", "query_ids", "segments", "steps", "epochs", "learning_rates", "kept"):
        torch.testing.assert_close(getattr(loaded, key), getattr(timeline, key))
    assert loaded.phases == timeline.phases and loaded.config == {"k": [1, 2]} and loaded.trace_segments == 3
    torch.testing.assert_close(loaded.total().values, Scores.load(path, "source").values)
    before = path.stat().st_size
    timeline.save(path)  # saving again overwrites in place
    assert path.stat().st_size == before
    with pytest.raises(KeyError, match="are a timeline; read them with Timeline.load"):
        Scores.load(path, "source-timeline")
    with pytest.raises(KeyError, match="No results named 'tracin-timeline'"):
        Timeline.load(path, "tracin-timeline")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda g: _replace(g, "values", np.zeros((S, Q, 5), np.float32)), r"values.*shape"),
        (lambda g: _replace(g, "totals", np.zeros((Q, N + 1), np.float32)), r"totals.*shape"),
        (lambda g: _replace(g, "kept", np.full((Q, 8), N, np.int64)), r"kept must be"),
        (lambda g: _replace(g, "steps", np.array([[5, 1]] * S)), r"steps must be"),
        (lambda g: _replace(g, "values", np.full((S, Q, 8), np.nan, np.float32)), r"not finite"),
        (lambda g: _replace(g, "description", np.bytes_(b'{"phases": ["x", "y", "z"]}')), r"phase 0"),
        (lambda g: g.attrs.__setitem__("kind", "self"), r"attribute 'kind'"),
    ],
)
def test_malformed_timelines_are_refused_naming_the_part(saved, edit, problem):
    _, path = saved
    with h5py.File(path, "a") as f:
        edit(f["results/source-timeline"])
    with pytest.raises(TraceError, match=problem):
        Timeline.load(path, "source-timeline")


def _replace(group: h5py.Group, key: str, array: np.ndarray) -> None:
    del group[key]
    group.create_dataset(key, data=array)
