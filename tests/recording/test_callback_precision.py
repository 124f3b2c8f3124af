"""The recorder under mixed precision and unusual strategies: bf16 autocast leaves the recorded factors at
float32 precision, and a sharded strategy is refused at setup with the supported ones named."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.callback import check_strategy


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
