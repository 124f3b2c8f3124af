"""The recorder under mixed precision, strategies and devices: bf16 autocast leaves the recorded factors at
float32 precision, a sharded strategy is refused at setup with the supported ones named, and the callback never
waits for the device on steps without statistics (and a fixed number of times, whatever the number of layers, on
steps with them)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.trainer import check_strategy


def test_bf16_mixed_factors_equal_float64_products_of_the_inputs_seen(tmp_path):
    """A 512-wide MLP under bf16 autocast, default factor_dtype (float32 for ≥256-wide factors): the recorded
    A_sum equals the float64 product of the very inputs each layer saw, to float32 precision (bf16 products
    were 1.8e-3 off)."""
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(sizes=[512, 512, 10])
    seen: dict[str, list[torch.Tensor]] = {"net.0": [], "net.2": []}
    for name in seen:
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: (
                seen[name].append(args[0].detach().clone()) if torch.is_grad_enabled() else None
            )
        )
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 512, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    path = tmp_path / "trace.h5"
    tda = TDACallback(
        path, task=ClassificationTask(), segments=1, every_n_steps=1, loss_check_steps=0, max_factor_ratio=None
    )
    quiet_trainer(max_epochs=1, precision="bf16-mixed", callbacks=[tda]).fit(model, DataLoader(data, batch_size=16))
    trace = Trace.open(path)
    assert seen["net.2"][0].dtype == torch.bfloat16  # the second layer's input came out of a bf16 layer
    for name, inputs in seen.items():
        rows = torch.cat([torch.cat(inputs).double(), torch.ones(64, 1, dtype=torch.float64)], dim=1)
        exact = rows.T @ rows
        recorded = trace.kfac_sums(0, name)
        assert recorded["A_count"] == 64
        error = float((recorded["A_sum"] - exact).abs().max() / exact.abs().max())
        assert error < 1e-6, (name, error)  # float32 products and storage: measured ~1e-7


def fake_trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, callbacks=[])


@pytest.mark.parametrize("sharded", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_are_refused_at_setup(tmp_path, sharded):
    strategy = sharded.__new__(sharded)  # a test double: only its type matters to the check
    tda = TDACallback(tmp_path / "t.h5", task=ClassificationTask())
    with pytest.raises(RuntimeError, match=rf"{sharded.__name__} strategy.*Supported: a single device.*DDP"):
        tda.setup(fake_trainer(strategy), MLPClassifier(sizes=[4, 3]), "fit")
    assert not tda.layers  # refused before anything was set up


def test_single_device_and_ddp_are_accepted():
    check_strategy(SingleDeviceStrategy(torch.device("cpu")))
    check_strategy(DDPStrategy())


# ----------------------------------------------------------------------------------- host synchronisation
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
HOOKS += ("on_train_batch_end",)
READS = {Tensor.item, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.tolist}
READS |= {Tensor.cpu, Tensor.numpy, Tensor.__array__}


class DeviceReads(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for the device (a value read, a copy to the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is Tensor.to and any(str(a).startswith("cpu") for a in [*args[1:], *kwargs.values()])
        if func in READS or to_host:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


def reads_per_step(
    tmp_path, sizes: list[int], every_n_steps, model: L.LightningModule | None = None
) -> tuple[dict[int, Counter], Trace]:
    """Device reads made by the callback's hooks during each optimizer step (0-based), and the trace of a
    32-step run with one segment and one checkpoint (at its end), of ``model`` (default: an MLP of ``sizes``)."""
    reads: dict[int, Counter] = {}
    path = tmp_path / f"{len(sizes)}-{every_n_steps}-{type(model).__name__}-{getattr(model, 'tensor_lr', '')}.h5"
    tda = TDACallback(
        path, task=ClassificationTask(), segments=1, checkpoints_per_segment=1, every_n_steps=every_n_steps,
        loss_check_steps=0, min_statistics_steps=3, overhead_budget=0.9,  # "auto": several statistics steps
    )  # fmt: skip

    def counted(hook):
        def run(*args, **kwargs):
            step = tda.step
            with DeviceReads() as mode:
                result = hook(*args, **kwargs)
            reads.setdefault(step, Counter()).update(mode.calls)
            return result

        return run

    for name in HOOKS:
        setattr(tda, name, counted(getattr(tda, name)))
    L.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, sizes[0], generator=generator), torch.randint(0, 10, (256,)))
    model = model or MLPClassifier(sizes=sizes)
    quiet_trainer(max_epochs=1, callbacks=[tda]).fit(model, DataLoader(data, batch_size=8))
    return reads, Trace.open(path)


@pytest.mark.parametrize("every_n_steps", ["auto", 4])
def test_no_device_reads_on_steps_without_statistics(tmp_path, every_n_steps):
    reads, trace = reads_per_step(tmp_path, [16, 8, 10], every_n_steps)
    statistics = trace.steps().statistics
    assert len(reads) == len(statistics) == 32 and 3 <= statistics.sum() < 32
    last = len(statistics) - 1  # the checkpoint and the segment's write
    assert sum(reads[last].values()) > 0  # the counter sees reads where there are some
    plain = {step: calls for step, calls in reads.items() if not statistics[step] and step != last}
    assert plain and all(not calls for calls in plain.values()), {s: c for s, c in plain.items() if c}


class DecayedLearningRate(MLPClassifier):
    """SGD at learning rate 0.1 × 0.9^step from ``ExponentialLR`` stepped every optimizer step, the learning
    rate held as a float or as a float64 tensor (which the scheduler updates in place)."""

    def __init__(self, sizes: list[int], tensor_lr: bool) -> None:
        super().__init__(sizes=sizes)
        self.tensor_lr = tensor_lr

    def configure_optimizers(self):
        lr = torch.tensor(0.1, dtype=torch.float64) if self.tensor_lr else 0.1
        optimizer = torch.optim.SGD(self.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_tensor_learning_rate_is_recorded_as_a_float_one_without_device_reads(tmp_path):
    """A learning rate held as a tensor (allowed for capturable/fused Adam; float() on it syncs a GPU every
    step) is recorded step by step and as the segment's mean exactly as the same schedule held as floats, and
    the steps without statistics read nothing from the device."""
    recorded = {}
    for tensor_lr in (False, True):
        model = DecayedLearningRate([16, 8, 10], tensor_lr)
        reads, trace = reads_per_step(tmp_path, [16, 8, 10], 4, model)
        recorded[tensor_lr] = trace.steps().lr, trace.segments[0].mean_lr
    steps, mean = recorded[True]
    expected = 0.1 * 0.9 ** np.arange(32)  # the learning rate each step was taken at
    np.testing.assert_allclose(steps[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(mean, [expected.mean()], rtol=1e-12)
    np.testing.assert_array_equal(steps, recorded[False][0])
    np.testing.assert_array_equal(mean, recorded[False][1])
    statistics, last = trace.steps().statistics, 31
    plain = {step: calls for step, calls in reads.items() if not statistics[step] and step != last}
    assert len(plain) >= 20 and all(not calls for calls in plain.values()), {s: c for s, c in plain.items() if c}


def test_device_reads_on_statistics_steps_do_not_grow_with_the_number_of_layers(tmp_path):
    counts = {}
    for sizes in ([16, 8, 10], [16, 8, 8, 8, 8, 10]):
        reads, trace = reads_per_step(tmp_path, sizes, 4)
        statistics = trace.steps().statistics
        counts[len(sizes)] = {sum(reads[step].values()) for step in range(31) if statistics[step]}
    assert len(counts[3]) == 1 and counts[3] == counts[6], counts  # a fixed number per step (measured 0)


def test_a_grad_scalers_scale_is_taken_out_of_the_empirical_fisher(tmp_path):
    """fp16 with a GradScaler (scale 256, read as a device tensor after the first step) records the same output
    factor as fp16 without one: the scaled gradients are divided by the scale, not by its square or not at all."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    sums = {}
    for name, scaler in (("plain", None), ("scaled", torch.amp.GradScaler("cpu", init_scale=256.0))):
        L.seed_everything(0, verbose=False)
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator))
        path = tmp_path / f"{name}.h5"
        tda = TDACallback(path, task=ClassificationTask(), fisher="empirical", every_n_steps=1, segments=1)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        trainer = quiet_trainer(max_epochs=1, plugins=[plugin], callbacks=[tda])
        trainer.fit(MLPClassifier(sizes=[8, 16, 3]), DataLoader(data, batch_size=16))
        sums[name] = Trace.open(path).kfac_sums(0, "net.2")["S_sum"]
    assert torch.isfinite(sums["scaled"]).all() and sums["plain"].abs().max() > 0
    torch.testing.assert_close(sums["scaled"], sums["plain"], rtol=2e-2, atol=2e-2 * float(sums["plain"].abs().max()))
