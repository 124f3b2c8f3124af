"""The benchmark's modern-training suite (benchmarks/run.py --suite modern) and its pieces (benchmarks/modern.py)."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import modern, run  # noqa: E402
from lightning_tda import LanguageModelingTask  # noqa: E402


def test_warmup_cosine_schedule():
    factor = modern.WarmupCosine(total=100, warmup=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert factor(99) < 0.01
    values = [factor(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after the warm-up


def test_real_data_loads_offline():
    x, y = modern.load_anes96()
    assert x.shape == (944, 9) and set(y.tolist()) == set(range(7))
    x, y = modern.load_penguins_mass()
    assert x.shape == (333, 10) and abs(float(y.mean())) < 1e-5
    blocks = modern.byte_blocks(modern.docstrings(["textwrap"]), 16)
    assert blocks.shape[1] == 16 and 0 <= int(blocks.min()) and int(blocks.max()) < 256


def test_modern_suite_quick(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    argv = ["--quick", "--suite", "modern", "--experiments", "modern-iris-interpolation"]
    argv += ["--methods", "TracInCP", "DataInf", "--subsets", "3", "--workers", "1"]
    results = run.main([*argv, "--workdir", str(tmp_path / "work"), "--out", str(out)])
    text = out.read_text()
    assert "<!-- BEGIN modern-quick -->" in text and "### Summary: LDS [95% CI]" in text
    assert "| modern-iris-interpolation |" in text and "### Training" in text
    exp = results["lds"]["modern-iris-interpolation"]
    assert exp["training"]["train_loss"] < 0.05  # the interpolation regime: trained to ~zero loss
    lds = {name: m["lds"] for name, m in exp["methods"].items()}
    assert all(-1 <= value <= 1 for value in lds.values())
    # DataInf ranks the re-trained models' losses (0.44 here, 0.37 on the full suite; random -0.19): a sign flip fails
    assert lds["DataInf"] > 0.1 and lds["DataInf"] > lds["random"] + 0.2


def test_lora_fine_tuning_setting_reuses_its_pre_training(tmp_path):
    data = functools.partial(modern.DocstringBytesDataModule, block_size=16, test_blocks=8)
    tiny_lm = functools.partial(modern.ByteLM, width=16, context=16)
    pretrain_data = functools.partial(data, modules=["textwrap"], train_blocks=32)
    pretraining = run.Pretraining("tiny", pretrain_data, tiny_lm, 1, 16)
    setting = run.ModernSetting(
        "tiny-lora",
        "tiny LoRA fine-tuning",
        functools.partial(data, modules=["difflib"], train_blocks=24),
        functools.partial(tiny_lm, lora_rank=2),
        LanguageModelingTask(),
        1,
        8,
        "tiny",
        callback={"layers": "lora"},
        pretraining=pretraining,
    )
    cfg, _ = run.parse(["--quick", "--subsets", "3", "--workers", "1", "--methods", "DataInf"])
    cfg.workdir = tmp_path
    results = {"lds": {}}
    run.lds_experiment(setting, cfg, results)
    weights = tmp_path / "pretrained" / "tiny.pt"
    assert weights.exists() and "from=tiny:" in setting.recipe()
    model = setting.module_factory()  # starts from the pre-trained backbone, with fresh adapters
    base = torch.load(weights, weights_only=True)
    assert torch.equal(model.backbone_state()["transformer.wte.weight"], base["transformer.wte.weight"])
    assert results["lds"]["tiny-lora"]["methods"]["DataInf"]["status"] == "ok"
    again = {"lds": {}}
    cfg.ground_truth_only = True
    run.lds_experiment(setting, cfg, again)
    assert again["lds"]["tiny-lora"]["ground_truth"]["trained"] == 0  # same weights, same recipe: cached
