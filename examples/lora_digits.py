"""LoRA fine-tuning recorded with TDACallback, attributed with DataInf.

1. Pre-train an MLP (64-128-128-5) to classify digits 0–4.
2. Wrap it with peft LoRA adapters (rank 4 on every Linear) and fine-tune only the adapters to
   classify digits 5–9 with the same five outputs (digit ``5 + c`` is class ``c``), with
   ``TDACallback(layers="lora")``; optionally some fine-tuning labels are flipped.
3. Score every fine-tuning example with DataInf on the LoRA layers: per test query, and against the
   mean test gradient (the paper's mislabel detection: flipped labels get the most negative scores).

Run: ``python examples/lora_digits.py`` (under 10 s on an idle 2-core CPU). The pieces are importable so a
test or a benchmark can run them small.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback
from lightning_tda.demo import DigitsDataModule, MLPClassifier, headless_trainer
from lightning_tda.methods import DataInf
from lightning_tda.trace import Trace

SIZES = [64, 128, 128, 5]


@dataclass
class DigitsSplit:
    """Digits 0–4 for pre-training, 5–9 for fine-tuning (train / test; class = digit − 5), and the
    flipped-label mask of the fine-tuning set."""

    pretrain: TensorDataset
    finetune: TensorDataset
    test: TensorDataset
    flipped: Tensor


def digits_split(flip_fraction: float = 0.0, seed: int = 0, max_finetune: int | None = None) -> DigitsSplit:
    """Split scikit-learn digits by class; flip ``flip_fraction`` of the fine-tuning labels to another
    of the five classes. ``max_finetune`` keeps only the first examples of the fine-tuning set."""
    dm = DigitsDataModule(seed=seed)
    dm.setup()
    x, y = dm.train_set.tensors
    xt, yt = dm.test_set.tensors
    low, high = y < 5, y >= 5
    x_ft, y_ft = x[high], y[high] - 5
    if max_finetune is not None:
        x_ft, y_ft = x_ft[:max_finetune], y_ft[:max_finetune]
    flipped = torch.zeros(len(y_ft), dtype=torch.bool)
    if flip_fraction > 0:
        rng = np.random.default_rng(seed)
        chosen = torch.as_tensor(rng.choice(len(y_ft), size=int(round(flip_fraction * len(y_ft))), replace=False))
        shift = torch.as_tensor(rng.integers(1, 5, size=len(chosen)))
        y_ft[chosen] = (y_ft[chosen] + shift) % 5
        flipped[chosen] = True
    return DigitsSplit(
        TensorDataset(x[low], y[low]), TensorDataset(x_ft, y_ft), TensorDataset(xt[yt >= 5], yt[yt >= 5] - 5), flipped
    )


class LoRAClassifier(MLPClassifier):
    """An MLP classifier with peft LoRA adapters on every Linear; only the adapters train.

    Args:
        sizes: MLP widths (default 64-128-128-5).
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (scaling ``alpha / r``); default ``2 r``.
        lr, optimizer: as in :class:`~lightning_tda.demo.MLPClassifier` (Adam by default).
    """

    def __init__(
        self,
        sizes: list[int] | None = None,
        rank: int = 4,
        alpha: float | None = None,
        lr: float = 0.01,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(sizes or SIZES, lr=lr, optimizer=optimizer)
        from peft import LoraConfig, get_peft_model

        targets = [name for name, module in self.net.named_children() if isinstance(module, torch.nn.Linear)]
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=0.0)
        self.net = get_peft_model(self.net, config)

    def load_base(self, state: dict[str, Tensor]) -> None:
        """Load a pre-trained ``MLPClassifier.net`` state into the frozen base layers."""
        base = self.net.get_base_model()
        mapped = {key.replace(".", ".base_layer.", 1): value for key, value in state.items()}
        missing = [key for key in mapped if key not in base.state_dict()]
        if missing:
            raise KeyError(f"Pre-trained weights {missing} have no place in the LoRA model.")
        base.load_state_dict(mapped, strict=False)


def _trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    return headless_trainer(max_epochs=epochs, callbacks=callbacks or [])


def pretrain(data: DigitsSplit, sizes: list[int] | None = None, epochs: int = 5, seed: int = 0) -> dict:
    """Train the MLP on digits 0–4 and return ``net``'s state dict."""
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(sizes or SIZES, lr=0.01, optimizer="adam")
    loader = DataLoader(data.pretrain, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    _trainer(epochs).fit(model, loader)
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def finetune(
    data: DigitsSplit,
    base_state: dict,
    path: str | Path,
    sizes: list[int] | None = None,
    rank: int = 4,
    epochs: int = 8,
    batch_size: int = 32,
    seed: int = 0,
) -> LoRAClassifier:
    """LoRA-fine-tune on digits 5–9 with ``TDACallback(layers="lora")`` writing the trace to ``path``."""
    L.seed_everything(seed, verbose=False)
    model = LoRAClassifier(sizes, rank=rank)
    model.load_base(base_state)
    loader = DataLoader(
        data.finetune, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    callback = TDACallback(str(path), task=ClassificationTask(), layers="lora", if_exists="overwrite")
    _trainer(epochs, [callback]).fit(model, loader)
    return model


def accuracy(model: torch.nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def auc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` ranking ``positives`` first (ties count 1/2)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positives.numpy(), scores.double().numpy()))


def main(flip_fraction: float = 0.2, rank: int = 4, workdir: str | None = None) -> None:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lora_digits_"))
    data = digits_split(flip_fraction)
    base = pretrain(data)
    model = finetune(data, base, workdir / "trace.h5", rank=rank)
    print(f"fine-tuned on {len(data.finetune)} examples of digits 5-9, test accuracy {accuracy(model, data.test):.3f}")

    trace = Trace.open(workdir / "trace.h5")
    task = ClassificationTask()
    method = DataInf(trace, model=LoRAClassifier(rank=rank), task=task, modules="lora")
    scores = method.attribute(queries=data.test, train=data.finetune)
    _, helpful = scores.top_k(3)
    digits = data.finetune.tensors[1][helpful[0]] + 5
    print(
        f"DataInf scores {tuple(scores.shape)}; test query 0 (digit {int(data.test.tensors[1][0]) + 5}) is helped "
        f"most by fine-tuning examples {helpful[0].tolist()} (labelled digits {digits.tolist()})"
    )

    per_layer = method.attribute_per_layer(queries=data.test, train=data.finetune)
    share = {name: float(s.values.abs().sum()) for name, s in per_layer.items()}
    total = sum(share.values())
    print("share of |influence| per LoRA layer: " + ", ".join(f"{n}: {v / total:.2f}" for n, v in share.items()))

    if flip_fraction > 0:
        mean = DataInf(trace, model=LoRAClassifier(rank=rank), task=task, modules="lora", mean_query=True)
        harm = -mean.attribute(queries=data.test, train=data.finetune).values[0]
        print(f"mislabel detection AUC (most harmful to the mean test loss first): {auc(harm, data.flipped):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flip-fraction", type=float, default=0.2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    main(args.flip_fraction, args.rank, args.workdir)
