"""What recording costs, and that the cheaper ways of recording give the same statistics.

Statistics steps chosen by an overhead budget (with a minimum per segment), convolution factors
without unfolding, the true Fisher from the training graph, float32 factor storage, factors too large
for their layer left out, and float64 statistics under bf16 autocast.
"""

from __future__ import annotations

import copy
import json

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_tda import ClassificationTask, RegressionTask, TDACallback, Trace
from lightning_tda.cli import main
from lightning_tda.demo import MLPClassifier
from lightning_tda.layers.covariances import KFACStatistics, conv_input_product, outer_product
from lightning_tda.layers.tracked import find_layers
from lightning_tda.methods import SOURCE, ForwardINF
from lightning_tda.recording.cadence import BudgetCadence, FixedCadence
from lightning_tda.recording.cost import RecordingCost
from lightning_tda.trace import TraceError
from lightning_tda.trace.records import cost_percent
from lightning_tda.trace.schema import COST_KINDS


def loader(n: int = 128, width: int = 64, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=generator)), batch_size=batch_size)


# ------------------------------------------------------------------------------------------ products
@pytest.mark.parametrize(
    "channels, height, width, kernel, bias",
    [(16, 9, 11, 3, True), (16, 8, 8, 3, False), (16, 6, 7, 5, True), (32, 12, 12, 3, False)],
)
def test_convolution_factor_without_unfolding_equals_the_unfolded_one(channels, height, width, kernel, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 8, kernel, padding=kernel // 2, bias=bias)
    layer = find_layers(nn.Sequential(conv))[0][0]
    x = torch.randn(5, channels, height, width, dtype=torch.float64)
    reference = outer_product(layer.activation_rows(x))
    torch.testing.assert_close(conv_input_product(conv, x, bias), reference, rtol=1e-12, atol=1e-10)
    strided = nn.Conv2d(channels, 8, 3, stride=2, padding=1)
    assert conv_input_product(strided, x, True) is None  # unfolding handles the rest


def test_per_example_products_of_wide_convolution_rows_equal_one_product():
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64)
    rows = F.unfold(x, 3, padding=1).transpose(1, 2)  # (3, 1024, 18), a view the batched path takes
    flat = rows.reshape(-1, 18)
    torch.testing.assert_close(outer_product(rows), flat.T @ flat, rtol=1e-12, atol=1e-10)


# ------------------------------------------------------------------------------------------ cadence
def simulate(
    cadence: BudgetCadence, segments: list[int], plain: float, extra: float, io: float = 0.0, fixed: float = 0.0
):
    """Run the cadence over segments of the given lengths with a fake clock; return the statistics steps
    of each segment and the extra time they (and ``io`` per segment) cost, relative to the plain time. A statistics
    step costs ``extra`` on a whole batch, of which ``fixed`` does not shrink on a share of it."""
    step, taken, extra_time = 0, [], 0.0
    for length in segments:
        cadence.open_segment(step, length)
        chosen = []
        for _ in range(length):
            if cadence.is_statistics_step(step) and cadence.is_optional(step):  # as the callback: costs may move it
                cadence.confirm(step)
            stats = cadence.is_statistics_step(step)
            cost = fixed + (extra - fixed) * cadence.statistics_share(step) if stats else 0.0
            cadence.record_step(step, plain + cost, stats)
            if stats:
                chosen.append(step)
                extra_time += cost
                cadence.plan_next(step)
            step += 1
        cadence.spend(io)
        extra_time += io
        taken.append(chosen)
    return taken, extra_time / (plain * sum(segments))


def test_budget_cadence_keeps_the_minimum_per_segment_and_spends_the_budget_otherwise():
    # statistics cheap enough for the minimum: it sits at the middles of equal parts of each segment
    taken, _ = simulate(BudgetCadence(budget=0.05, min_per_segment=4), [80, 80, 40], plain=1.0, extra=0.2)
    assert [step for step in (10, 30, 50, 70, 90, 110, 130, 150, 165, 175, 185, 195) if not any(
        step in chosen for chosen in taken)] == []  # fmt: skip
    # statistics cost 20 plain steps: by default only the minimum, which wins over the budget
    taken, _ = simulate(BudgetCadence(budget=0.05, min_per_segment=4), [80, 80, 40], plain=1.0, extra=20.0)
    assert taken == [[10, 30, 50, 70], [90, 110, 130, 150], [165, 175, 185, 195]]
    # strict: the first statistics step (it measures their cost, on a quarter of each batch) is the only cost
    # allowed past the budget; the first segment plans the minimum until it is timed, then re-plans its rest; the
    # budget affords no other
    strict = BudgetCadence(budget=0.05, min_per_segment=4, strict=True)
    taken, overhead = simulate(strict, [80, 80, 40], plain=1.0, extra=20.0)
    assert taken == [[10], [], []] and overhead == pytest.approx(20 / 4 / 200)
    # ... and as many as the budget affords when it affords some (2 per 80 steps at 2 plain steps each)
    taken, overhead = simulate(BudgetCadence(budget=0.05, min_per_segment=4, strict=True), [80, 80], 1.0, 2.0)
    assert [len(chosen) for chosen in taken] == [2, 2] and overhead <= 0.05
    # a segment shorter than the minimum takes statistics on every step
    taken, _ = simulate(BudgetCadence(budget=0.05, min_per_segment=4), [3, 50], plain=1.0, extra=0.2)
    assert taken[0] == [0, 1, 2] and len(taken[1]) >= 4
    # cheap statistics: many more than the minimum, the extra time within the budget
    taken, overhead = simulate(BudgetCadence(budget=0.05, min_per_segment=4), [400] * 3, plain=1.0, extra=0.5)
    assert all(len(chosen) > 20 for chosen in taken)
    assert 0.04 < overhead <= 0.055
    # the recorder's other costs (checkpoints, segment writes) are paid from the same budget
    _, with_io = simulate(BudgetCadence(budget=0.05, min_per_segment=4), [400] * 3, plain=1.0, extra=0.5, io=10.0)
    assert 0.04 < with_io <= 0.06


def test_an_optional_statistics_step_moves_when_costs_paid_after_its_plan_took_its_credit():
    """The next optional statistics step is planned where the credit will pay for one; a checkpoint or segment write
    paid in between takes part of that credit, and the step then moves to where the credit will pay for it."""
    cadence = BudgetCadence(budget=0.125, min_per_segment=1)  # credits in exact binary fractions
    cadence.open_segment(0, 1000)
    for step in range(10):
        cadence.record_step(step, 1.0, False)
    cadence.record_step(10, 2.0, True)  # a statistics step: one plain step of extra time
    planned = cadence.plan_next(10).next_optional
    assert planned is not None and planned > 11
    kept, moved = copy.deepcopy(cadence), copy.deepcopy(cadence)
    moved.spend(0.5)  # a checkpoint after the plan: four steps' credit
    for each in (kept, moved):
        for step in range(11, planned):
            each.record_step(step, 1.0, False)
        assert each.is_statistics_step(planned) and each.is_optional(planned)
    assert kept.confirm(planned).next_optional == planned and kept.is_statistics_step(planned)
    assert moved.confirm(planned).next_optional == planned + 4 and not moved.is_statistics_step(planned)
    assert not moved.is_optional(0) and not FixedCadence(2).is_optional(4)


def test_the_cost_measuring_step_takes_a_quarter_of_the_batch_and_its_scaled_cost_stands_until_a_whole_one():
    cadence = BudgetCadence(budget=0.05, min_per_segment=4, strict=True)
    cadence.open_segment(0, 400)
    for step in range(10):
        cadence.record_step(step, 1.0, False)
    assert cadence.statistics_share(10) == 0.25
    cadence.record_step(10, 1.0 + 1.0 + 4.0 * 0.25, True)  # a fixed 1.0 and products of 4.0 on the whole batch
    assert cadence.extra_seconds == 4.0  # 2.0 measured, scaled by 2 (the whole step's 5.0 is not known yet)
    assert cadence.credit == pytest.approx(0.05 - 2.0 + 0.05)  # what the step really cost is paid (credit capped)
    resumed = BudgetCadence(budget=0.05, min_per_segment=4, strict=True)
    resumed.load_state_dict(cadence.state_dict())
    for each in (cadence, resumed):
        assert each.statistics_share(11) == 1.0
        each.record_step(11, 6.0, True)
        assert each.extra_seconds == 5.0  # a whole-batch statistics step replaces the estimate
        each.record_step(12, 6.0, True)
        assert list(each.extra) == [5.0, 5.0]


def test_a_rank_that_follows_the_plan_opens_segments_with_the_same_required_steps():
    """Under DDP every rank adopts rank 0's plan; a rank's own timings may differ (here it has none), yet the next
    segment must plan the same required statistics steps on it, or the ranks' collectives would not match."""
    leader, follower = (BudgetCadence(budget=0.05, min_per_segment=4, strict=True) for _ in range(2))
    leader.open_segment(0, 400)
    for step in range(10):
        leader.record_step(step, 1.0, False)
    leader.statistics_share(10)
    leader.record_step(10, 3.0, True)  # spent past the budget: the leader's own re-plan pays that back
    follower.follow(leader.plan_next(10))
    for cadence in (leader, follower):
        cadence.open_segment(400, 400)
    assert follower.required == leader.required and len(leader.required) == 4


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.10])
@pytest.mark.parametrize("extra, io", [(3.0, 0.0), (3.0, 2.0), (0.7, 1.0), (4.0, 0.5)])
def test_the_budget_is_honoured_within_two_points_on_runs_of_200_steps_or_more(budget, extra, io):
    """Statistics steps of known cost (a fake clock), ``strict_budget``: where one per segment fits the budget, the
    extra time of statistics steps and of the other costs (``io`` plain steps per segment) is the budget ± 2
    percentage points, although the minimum of 4 per segment would cost more (extra = 3: 36 steps of 300, 12%).
    (One statistics step is at most 1.6% of these runs: whole steps can be placed within ± 2 points.)"""
    for segments in ([100, 100, 100], [250], [70, 70, 70, 70]):
        if extra + io > budget * min(segments):
            continue  # one statistics step per segment is more than its budget: the floor, shown above
        _, overhead = simulate(BudgetCadence(budget=budget, min_per_segment=4, strict=True), segments, 1.0, extra, io)
        assert abs(overhead - budget) <= 0.02, (segments, overhead)


def test_auto_cadence_gives_every_segment_the_minimum_and_records_the_choice(tmp_path):
    path = tmp_path / "trace.h5"
    L.seed_everything(0, verbose=False)
    # a generous budget affords the minimum (a statistics step costs about one plain step here)
    tda = TDACallback(path, task=ClassificationTask(), segments=3, min_statistics_steps=3, overhead_budget=0.9)
    quiet_trainer(max_epochs=4, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())  # 32 steps
    trace = Trace.open(path)
    assert all(segment.stats_steps >= 3 for segment in trace.segments)
    counts = [float(trace.kfac_sums(s.index, "net.0")["S_count"]) for s in trace.segments]  # examples used
    assert counts == [16 // 4 + 16 * (trace.segments[0].stats_steps - 1)] + [
        16 * s.stats_steps for s in trace.segments[1:]
    ]
    steps = trace.steps()
    for segment in trace.segments:
        assert steps.statistics[segment.start_step : segment.end_step].sum() == segment.stats_steps
    assert trace.meta["every_n_steps"] == "auto"
    assert (trace.meta["overhead_budget"], trace.meta["min_statistics_steps"]) == (0.9, 3)
    assert "90% overhead budget" in trace.summary()
    # a tiny one does not: the minimum wins, or with strict_budget (the default) as many as it affords: none
    for strict, expected in ((False, [3, 3]), (True, [0, 0])):
        tda = TDACallback(
            path, ClassificationTask(), min_statistics_steps=3, overhead_budget=0.001, strict_budget=strict,
            if_exists="overwrite",
        )  # fmt: skip
        quiet_trainer(max_epochs=4, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())
        trace = Trace.open(path)
        assert [segment.stats_steps for segment in trace.segments][1:] == expected
        assert trace.meta["strict_budget"] == strict
    # segments without statistics store no K-FAC sums (all zero); the reader gives the zeros
    with h5py.File(path, "r") as f:
        assert len(f["segments/0001/kfac"]) == 0 and len(f["segments/0000/kfac"]) == 2
    assert {key: float(value.abs().sum()) for key, value in trace.kfac_sums(1, "net.0").items()} == dict.fromkeys(
        ("A_sum", "A_count", "S_sum", "S_count"), 0.0
    )
    # segments without statistics: SOURCE recomputes their covariances, a method reading streamed ones names the fix
    with pytest.raises(TraceError, match="no K-FAC statistics .*covariances='recompute'.*strict_budget=False"):
        trace.covariances(1, "net.0")
    data = loader().dataset
    source = SOURCE(trace, MLPClassifier(sizes=[64, 16, 10]), ClassificationTask(), response="unrolled")
    assert torch.isfinite(source.attribute(Subset(data, range(4)), data).values).all()
    assert source.config()["covariances_by_segment"]["1"].startswith("recompute: segment 1 holds 0 statistics")
    forward = ForwardINF(trace, MLPClassifier(sizes=[64, 16, 10]), ClassificationTask())
    assert torch.isfinite(forward.attribute(Subset(data, range(4)), data).values).all()
    assert set(forward._curvature_factors()) == {"net.0", "net.2"}  # segment 0's: the last one with statistics
    with pytest.raises(ValueError, match="overhead budget"):
        TDACallback(path, task=ClassificationTask(), overhead_budget=0.0)


# ------------------------------------------------------------------------------------- true Fisher
class Regressor(L.LightningModule):
    """A two-layer regressor; ``direct=True`` makes ``training_step`` call ``self.net`` itself, so the
    callback cannot reuse the training graph and needs its second forward pass."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.direct = direct
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.forwards = 0
        self.net[0].register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        prediction = self.net(x).squeeze(-1) if self.direct else self(x)
        return F.mse_loss(prediction, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_true_fisher_from_the_training_graph_equals_the_one_from_a_second_forward(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randn(64, generator=generator))
    traces = {}
    for direct in (False, True):
        L.seed_everything(0, verbose=False)
        model = Regressor(direct)
        tda = TDACallback(
            tmp_path / f"{direct}.h5", task=RegressionTask(), segments=2, every_n_steps=1, loss_check_steps=0
        )
        quiet_trainer(max_epochs=2, callbacks=[tda]).fit(model, DataLoader(data, batch_size=16))
        assert model.forwards == (16 if direct else 8)  # 8 steps: a second forward only when needed
        traces[direct] = Trace.open(tmp_path / f"{direct}.h5")
    for segment in (0, 1):
        for layer in ("net.0", "net.2"):
            reused, second = traces[False].kfac_sums(segment, layer), traces[True].kfac_sums(segment, layer)
            for key in reused:
                torch.testing.assert_close(reused[key], second[key], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------- trace size
def test_float32_factors_equal_the_float64_ones_to_float32_precision(tmp_path):
    sums = {}
    for dtype in ("float32", "float64"):
        L.seed_everything(0, verbose=False)
        tda = TDACallback(tmp_path / f"{dtype}.h5", task=ClassificationTask(), every_n_steps=1, factor_dtype=dtype)
        quiet_trainer(max_epochs=1, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 32, 10]), loader())
        with h5py.File(tmp_path / f"{dtype}.h5", "r") as f:
            group = f["segments/0000/kfac/net.0"]
            assert group["A_sum"].dtype == np.dtype(dtype) and group["A_count"].dtype == np.float64
        sums[dtype] = Trace.open(tmp_path / f"{dtype}.h5").kfac_sums(0, "net.0")
        assert all(t.dtype == torch.float64 for t in sums[dtype].values())  # read back as float64
    for key, exact in sums["float64"].items():  # float32 products and storage: float32 rounding of the matrix
        error = (sums["float32"][key] - exact).abs().max() / exact.abs().max()
        assert error < 4 * 2**-24, (key, error)  # measured 6e-8
    with pytest.raises(ValueError, match="factor_dtype"):
        TDACallback(tmp_path / "x.h5", task=ClassificationTask(), factor_dtype="float16")


def test_factors_far_larger_than_a_lora_adapter_are_not_recorded(tmp_path):
    from peft import LoraConfig, get_peft_model

    class WideLoRA(MLPClassifier):  # a frozen 1024-wide layer with a rank-4 adapter, and a frozen head
        def __init__(self):
            super().__init__(sizes=[1024, 1024, 10])
            self.net = get_peft_model(self.net, LoraConfig(r=4, target_modules=["0"], lora_dropout=0.0))

    def record(path, **kwargs):
        L.seed_everything(0, verbose=False)
        model = WideLoRA()
        tda = TDACallback(path, task=ClassificationTask(), layers="lora", every_n_steps=1, **kwargs)
        quiet_trainer(max_epochs=1, callbacks=[tda]).fit(model, loader(64, width=1024))
        return Trace.open(path)

    lean, full = record(tmp_path / "lean.h5"), record(tmp_path / "full.h5", max_factor_ratio=None)
    recorded = {layer.name.split(".")[-2]: (layer.A_recorded, layer.S_recorded) for layer in lean.layers}
    assert recorded == {"lora_A": (False, True), "lora_B": (True, False)}  # 1024² factors for 4k parameters
    lora_a = next(name for name in lean.layer_names if "lora_A" in name)
    assert set(lean.kfac_sums(0, lora_a)) == {"A_count", "S_sum", "S_count"}
    assert lean.kfac_sums(0, lora_a)["A_count"] == full.kfac_sums(0, lora_a)["A_count"]
    torch.testing.assert_close(lean.kfac_sums(0, lora_a)["S_sum"], full.kfac_sums(0, lora_a)["S_sum"])
    with pytest.raises(TraceError, match=r"no K-FAC factor A for layer .*lora_A.*max_factor_ratio=None"):
        lean.covariances(0, lora_a)
    assert all(layer.A_recorded and layer.S_recorded for layer in full.layers)
    assert full.path.stat().st_size > 5 * lean.path.stat().st_size
    assert "not recorded" in lean.summary()


# --------------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_keeps_the_statistics_in_float64(tmp_path):
    seen: list[torch.dtype] = []
    sums = {}
    for precision in ("bf16-mixed", "32-true"):
        L.seed_everything(0, verbose=False)
        model = MLPClassifier(sizes=[64, 32, 10])
        model.net[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        path = tmp_path / f"{precision}.h5"
        tda = TDACallback(path, task=ClassificationTask(), every_n_steps=1, factor_dtype="float64")
        quiet_trainer(max_epochs=1, precision=precision, callbacks=[tda]).fit(model, loader())
        assert all(t.dtype == torch.float64 for t in tda.stats.flat_tensors())
        sums[precision] = Trace.open(path).kfac_sums(0, "net.2")
    assert torch.bfloat16 in seen  # the layers did run in bf16
    for key, exact in sums["32-true"].items():
        assert torch.isfinite(sums["bf16-mixed"][key]).all()
        torch.testing.assert_close(sums["bf16-mixed"][key], exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


def test_a_version_1_trace_still_reads(tmp_path):
    """Schema v1: float64 sums of every factor, no recorded-factor attributes, an integer cadence."""
    path = tmp_path / "trace.h5"
    L.seed_everything(0, verbose=False)
    tda = TDACallback(path, task=ClassificationTask(), every_n_steps=2, factor_dtype="float64")
    quiet_trainer(max_epochs=1, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())
    expected = Trace.open(path).covariances(0, "net.0")
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 1
        for key in ("factor_dtype", "max_factor_ratio"):
            del f["meta"].attrs[key]
        for name in ("net.0", "net.2"):
            for key in ("A_recorded", "S_recorded"):
                del f["layers"][name].attrs[key]
    trace = Trace.open(path)
    assert trace.schema_version == 1 and all(layer.A_recorded and layer.S_recorded for layer in trace.layers)
    for got, want in zip(trace.covariances(0, "net.0"), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "statistics every 2 step(s), float64 factors" in trace.summary()


def test_a_hugging_face_training_call_is_reused_for_the_true_fisher(tmp_path):
    """``training_step`` returning ``self.model(**batch).loss`` (the Hugging Face way): the model's logits are
    the task's outputs, so no second forward runs, and the statistics equal those of a second forward."""
    from lightning_tda import LanguageModelingTask
    from lightning_tda.demo.language import CausalLanguageModel, SyntheticTextDataModule

    class SecondForward(LanguageModelingTask):  # never recognises a training call
        def outputs_of_call(self, batch, args, kwargs, output):
            return None

    traces, forwards = {}, {}
    for task in (LanguageModelingTask(), SecondForward()):
        L.seed_everything(0, verbose=False)
        data = SyntheticTextDataModule(train_blocks=16, test_blocks=2, batch_size=8)
        model = CausalLanguageModel(architecture="gpt2")
        calls = []
        model.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        path = tmp_path / f"{type(task).__name__}.h5"
        tda = TDACallback(path, task=task, segments=1, every_n_steps=1, loss_check_steps=0)
        quiet_trainer(max_epochs=1, callbacks=[tda]).fit(model, data)
        traces[type(task)], forwards[type(task)] = Trace.open(path), len(calls)
    assert forwards == {LanguageModelingTask: 2, SecondForward: 4}  # 2 steps
    reused, second = traces[LanguageModelingTask], traces[SecondForward]
    for layer in reused.layer_names:
        for key, value in reused.kfac_sums(0, layer).items():
            torch.testing.assert_close(value, second.kfac_sums(0, layer)[key], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------- the measured cost
def test_timed_sections_exclude_the_sections_nested_in_them(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 10.0, 10.0, 11.5])  # created, each section's start and end, record()
    monkeypatch.setattr("lightning_tda.recording.cost.time.perf_counter", lambda: next(clock))
    cost = RecordingCost()
    with cost.timed("io"):  # 1.0 .. 10.0, of which 3.0 .. 4.0 is a checkpoint inside it
        with cost.timed("checkpoints"):
            pass
    with cost.timed("statistics"):
        pass
    assert cost.seconds["io"] == 8.0 and cost.seconds["checkpoints"] == 1.0 and cost.seconds["statistics"] == 0.0
    record = cost.record(last_step=5)
    assert record["training_seconds"] == 11.5 and record["first_step"] == 0 and cost.total == 9.0
    assert cost_percent(record) == pytest.approx(100 * 9.0 / 2.5)


def test_the_recorded_cost_is_in_the_trace_and_shown_by_inspect(tmp_path, capsys):
    path = tmp_path / "trace.h5"
    L.seed_everything(0, verbose=False)
    tda = TDACallback(path, task=ClassificationTask(), segments=2, every_n_steps=2)
    quiet_trainer(max_epochs=2, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())  # 16 steps
    (cost,) = Trace.open(path).recording_costs()
    assert (cost["first_step"], cost["last_step"]) == (0, 16)
    assert set(cost["seconds"]) == set(COST_KINDS)
    for kind in ("trace_creation", "initial_checkpoint", "loss_check", "statistics", "checkpoints", "io"):
        assert cost["seconds"][kind] > 0, kind
    assert sum(cost["seconds"].values()) < cost["training_seconds"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recording cost (steps 1-16): " in out and "% on top of" in out and "statistics" in out
    # a second fit appends its own record
    quiet_trainer(max_epochs=1, callbacks=[TDACallback(path, task=ClassificationTask(), if_exists="append")]).fit(
        MLPClassifier(sizes=[64, 16, 10]), loader()
    )
    assert [(c["first_step"], c["last_step"]) for c in Trace.open(path).recording_costs()] == [(0, 16), (16, 24)]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"first_step": 0, "last_step": 4, "training_seconds": 1.0, "seconds": {"io": -1.0}}, "seconds\\['io'\\]"),
        ({"first_step": 5, "last_step": 4, "training_seconds": 1.0, "seconds": {}}, "last_step"),
        ({"first_step": 0, "last_step": 4, "training_seconds": "NaN", "seconds": {}}, "training_seconds"),
        ({"first_step": 0, "last_step": 4, "training_seconds": 1.0}, "'seconds' object"),
    ],
)
def test_a_malformed_cost_record_is_refused_naming_it(tmp_path, record, problem):
    path = tmp_path / "trace.h5"
    quiet_trainer(max_epochs=1, callbacks=[TDACallback(path, task=ClassificationTask(), segments=1)]).fit(
        MLPClassifier(sizes=[64, 16, 10]), loader(n=32)
    )
    with h5py.File(path, "a") as f:
        del f["meta/recording_cost"]
        f["meta"].create_dataset("recording_cost", data=json.dumps([record]))
    with pytest.raises(TraceError, match=f"meta/recording_cost record 0.*{problem}"):
        Trace.open(path).recording_costs()


def test_the_cost_goes_into_the_summary_of_the_trainers_wandb_run(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from wandb_reader import OfflineRun, find_runs

    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    tda = TDACallback(tmp_path / "trace.h5", task=ClassificationTask(), segments=1, every_n_steps=2)
    quiet_trainer(max_epochs=1, callbacks=[tda], logger=logger).fit(MLPClassifier(sizes=[64, 16, 10]), loader())
    wandb.finish()
    (cost,) = Trace.open(tmp_path / "trace.h5").recording_costs()
    summary = OfflineRun.read(find_runs(tmp_path)[0]).summary
    assert summary["tda/recording/seconds"] == pytest.approx(sum(cost["seconds"].values()))
    assert summary["tda/recording/checkpoints_seconds"] == pytest.approx(cost["seconds"]["checkpoints"])
    assert summary["tda/recording/percent_of_training"] == pytest.approx(cost_percent(cost))


def test_convolution_factors_recorded_without_unfolding_equal_the_unfolded_inputs_seen(tmp_path, monkeypatch):
    """End to end through the callback: a ResNet's 16-channel stride-1 3×3 convolutions take the fast path
    (conv_input_product), and the recorded A_sum equals the float64 product of the unfolded inputs they saw."""
    import lightning_tda.layers.covariances as covariances
    from lightning_tda.demo import ResNet

    fast_path = []
    original = covariances.conv_input_product
    monkeypatch.setattr(
        covariances, "conv_input_product", lambda *a, **k: fast_path.append(original(*a, **k)) or fast_path[-1]
    )
    L.seed_everything(0, verbose=False)
    model = ResNet(width=16, blocks=[1, 1, 1, 1], in_channels=1)
    name = "net.3.conv1"  # 16 → 16 channels, 3×3, stride 1, on 8×8 inputs
    conv = model.get_submodule(name)
    seen: list[torch.Tensor] = []
    conv.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None
    )
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    )
    path = tmp_path / "resnet.h5"
    tda = TDACallback(path, task=ClassificationTask(), segments=1, every_n_steps=1, loss_check_steps=0)
    quiet_trainer(max_epochs=1, callbacks=[tda]).fit(model, DataLoader(data, batch_size=8))
    assert any(product is not None for product in fast_path)
    layer = find_layers(nn.Sequential(conv))[0][0]
    rows = layer.activation_rows(torch.cat(seen).double())  # (B, 64, 144)
    exact = outer_product(rows, torch.float64)
    recorded = Trace.open(path).kfac_sums(0, name)
    assert recorded["A_count"] == 32 * 64
    torch.testing.assert_close(recorded["A_sum"], exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


# ------------------------------------------------------------------------------ sub-batch statistics
def test_statistics_from_a_sub_batch_are_the_statistics_of_its_first_examples():
    """``max_examples=k`` (the callback's ``statistics_examples``) gives exactly the sums and counts of the batch's
    first k examples: convolution (the unfold-free product), linear layers on masked sequences, embeddings."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"conv": nn.Conv2d(16, 8, 3, padding=1), "linear": nn.Linear(12, 5), "embedding": nn.Embedding(30, 4)}
    )
    layers, _, _ = find_layers(model)
    by_name = {layer.name: layer for layer in layers}
    images, tokens = torch.randn(10, 16, 9, 9), torch.randn(10, 7, 12)
    ids, mask = torch.randint(0, 30, (10, 7)), torch.rand(10, 7) > 0.3
    gradients = {"conv": torch.randn(10, 81, 8), "linear": torch.randn(10, 7, 5), "embedding": torch.randn(10, 7, 4)}

    def statistics(k, max_examples):
        stats = KFACStatistics(layers, max_examples=max_examples, factor_dtype="float64")
        stats.stage_inputs(by_name["conv"], images[:k])
        stats.stage_inputs(by_name["linear"], tokens[:k], mask[:k])
        stats.stage_inputs(by_name["embedding"], ids[:k], mask[:k])
        for name, rows in gradients.items():
            stats.stage_gradients(name, rows[:k], scale=2.0)
        stats.commit()
        return stats.sums

    sub, first = statistics(10, max_examples=4), statistics(4, max_examples=None)
    for name in first:
        for key in ("A_sum", "A_count", "S_sum", "S_count"):
            torch.testing.assert_close(sub[name][key], first[name][key], rtol=1e-12, atol=0)
    assert sub["conv"]["S_count"] == 4 and sub["conv"]["A_count"] == 4 * 81
    assert sub["linear"]["A_count"] == mask[:4].sum()  # masked positions are not rows
    assert not torch.equal(statistics(10, max_examples=None)["conv"]["A_sum"], first["conv"]["A_sum"])


def test_the_callback_takes_statistics_from_the_first_examples_of_each_batch(tmp_path):
    counts = {}
    for examples in (None, 5):
        path = tmp_path / f"{examples}.h5"
        L.seed_everything(0, verbose=False)
        tda = TDACallback(path, task=ClassificationTask(), segments=1, every_n_steps=2, statistics_examples=examples)
        quiet_trainer(max_epochs=1, callbacks=[tda]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())  # 8 steps
        trace = Trace.open(path)
        sums = trace.kfac_sums(0, "net.0")
        counts[examples] = (float(sums["A_count"]), float(sums["S_count"]))
        assert trace.config["statistics_examples"] == examples
    assert counts == {None: (4 * 16, 4 * 16), 5: (4 * 5, 4 * 5)}  # 4 statistics steps of batches of 16
    with pytest.raises(ValueError, match="statistics_examples"):
        TDACallback(tmp_path / "x.h5", task=ClassificationTask(), statistics_examples=0)


class _HookWatcher(L.Callback):
    """Per optimizer step: whether the tracked layers and the LightningModule had forward hooks during its forward."""

    def __init__(self) -> None:
        self.layers: list[bool] = []
        self.root: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.layers.append(any(m._forward_hooks for m in pl_module.modules() if isinstance(m, nn.Linear)))
        self.root.append(bool(pl_module._forward_hooks))


def test_forward_hooks_are_on_only_for_the_steps_that_need_them(tmp_path):
    """A hooked module takes PyTorch's slower call path on every forward: the layers are hooked on statistics steps
    only, the model on those and the loss check's steps, and nothing stays hooked after the fit."""
    path, watcher = tmp_path / "trace.h5", _HookWatcher()
    callback = TDACallback(str(path), task=ClassificationTask(), every_n_steps=3, loss_check_steps=2)
    model = MLPClassifier(sizes=[64, 16, 10])
    quiet_trainer(max_epochs=2, callbacks=[callback, watcher]).fit(model, loader())
    statistics = Trace.open(path).steps().statistics.astype(bool).tolist()
    assert watcher.layers == statistics and sum(statistics) == 6
    assert watcher.root == [s or step < 2 for step, s in enumerate(statistics)]
    assert not any(m._forward_hooks for m in model.modules())
