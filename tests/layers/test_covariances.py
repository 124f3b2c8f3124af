"""K-FAC products under mixed precision: computed outside autocast in at least float32, counts that cannot
overflow, and one host-to-device copy of the counts per step."""

from __future__ import annotations

import torch
from torch import nn

from lightning_tda.layers.covariances import KFACStatistics, conv_input_product, outer_product
from lightning_tda.layers.tracked import find_layers


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.double() - exact).abs().max() / exact.abs().max())


def test_products_under_bf16_autocast_are_float32_products():
    torch.manual_seed(0)
    rows = torch.randn(4, 64, 300)  # a 300-wide factor: float32 products by default
    exact = rows.double().reshape(-1, 300).T @ rows.double().reshape(-1, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = outer_product(rows)
        assert (rows.reshape(-1, 300).T @ rows.reshape(-1, 300)).dtype == torch.bfloat16  # what autocast does
    assert product.dtype == torch.float32
    assert relative_error(product, exact) < 1e-6  # bf16 products: ~4e-3

    conv = nn.Conv2d(32, 8, 3, padding=1)
    layer = find_layers(nn.Sequential(conv))[0][0]
    x = torch.randn(2, 32, 8, 8)
    reference = outer_product(layer.activation_rows(x.double()), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = conv_input_product(conv, x, True)
    assert fast.dtype == torch.float32
    assert relative_error(fast, reference) < 1e-6


def test_fp16_row_counts_past_65504_stay_exact():
    """An fp16 bias column summed in fp16 reaches inf at 65,505 rows; the statistics count in float32/float64."""
    layer = find_layers(nn.Sequential(nn.Linear(300, 4)))[0][0]
    stats = KFACStatistics([layer])
    rows = 70_000
    inputs = (torch.randn(rows, 300) * 0.1).half()
    with torch.autocast("cpu", dtype=torch.float16):
        stats.stage_inputs(layer, inputs)
        stats.stage_gradients(layer.name, torch.randn(rows, 1, 4).half())
    stats.commit()
    sums = stats.sums[layer.name]
    assert bool(stats.last_step_finite) and stats.skipped_steps == 0
    assert sums["A_count"].dtype == torch.float64 and sums["A_count"] == rows and sums["S_count"] == rows
    assert sums["A_sum"][-1, -1] == rows  # the bias column's Σ 1·1
    exact = inputs.double()
    torch.testing.assert_close(sums["A_sum"][:-1, -1], exact.sum(0), rtol=1e-5, atol=1e-3)


def test_host_counts_reach_the_device_once_per_step(monkeypatch):
    layers = find_layers(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))[0]
    stats = KFACStatistics(layers)
    created = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: created.append(a) or original(*a, **k))
    for layer in layers:
        stats.stage_inputs(layer, torch.randn(4, layer.shape[1] - 1))
        stats.stage_gradients(layer.name, torch.randn(4, 1, layer.shape[0]))
    stats.commit()
    assert len(created) == 1 and sorted(created[0][0]) == [4] * 4  # every layer's A and S count in one tensor
    assert all(stats.sums[layer.name]["A_count"] == 4 for layer in layers)


def test_the_sync_free_class_draw_has_the_softmax_distribution():
    """The true Fisher's draw on accelerators (an exponential race) picks each class with its probability."""
    from lightning_tda.tasks import exponential_race

    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(200_000, 4)
    drawn = exponential_race(probs, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4).double() / len(drawn)
    torch.testing.assert_close(frequencies, probs[0].double(), rtol=0, atol=0.005)  # 3.5 standard errors
    assert frequencies[3] == 0
