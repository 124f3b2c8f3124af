"""Modern training recipes on real data that works offline: AdamW with warm-up and cosine decay.

The benchmarks' other settings train MLPs and a small CNN with SGD (momentum 0.9) at a constant learning
rate. The pieces here are what people train now, small enough to re-train a hundred times on a CPU:

* :class:`WarmupCosine` / :class:`WarmupCosineAdamW`: AdamW (weight decay 0.01) with a linear warm-up over
  the first 10% of the optimizer steps, then cosine decay to zero, stepped every optimizer step.
* :class:`ResidualMLP`: a pre-norm residual MLP (LayerNorm, GELU) for tabular classification or regression.
* :class:`WarmupCosineCNN`: :class:`~lightning_tda.demo.SmallCNN` trained with the recipe above.
* :class:`ByteLM`: a byte-level GPT-2 (Hugging Face ``GPT2LMHeadModel`` from a config, no download) trained
  from scratch, or fine-tuned (fully or with peft LoRA adapters) from weights saved by an earlier run.
* Data modules over real data that ships inside installed packages (nothing is downloaded at run time):
  the Palmer penguins (``palmerpenguins``), the 1996 American National Election Study (``statsmodels``),
  scikit-learn's iris, and documentation strings of installed modules (``inspect.getdoc``) packed into
  fixed-length byte blocks.

Every data module exposes ``train_set`` / ``test_set`` (map-style, ids = indices) after ``setup``; language
data are ``TensorDataset(blocks, blocks)`` (``(input_ids, labels)`` tuples, which
:class:`~lightning_tda.tasks.LanguageModelingTask` reads and the model shifts).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.demo import ArrayDataModule, SmallCNN
from lightning_tda.demo.language import LORA_TARGETS, CausalLanguageModel


# --- the schedule -------------------------------------------------------------------------------
class WarmupCosine:
    """Learning-rate factor of step ``s``: linear warm-up to 1 over ``warmup`` of ``total`` steps, then cosine to 0.

    A picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per optimizer step).
    """

    def __init__(self, total: int, warmup: float = 0.1) -> None:
        self.total = max(1, int(total))
        self.warmup_steps = max(1, int(round(warmup * self.total))) if warmup > 0 else 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = max(1, self.total - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineAdamW:
    """Mixin for a LightningModule: AdamW with :class:`WarmupCosine` over the whole fit, stepped every step.

    The module sets ``lr``, ``weight_decay`` and ``warmup`` (fraction of the optimizer steps); the number
    of steps is the trainer's ``estimated_stepping_batches``, so the schedule ends with the fit.
    """

    lr: float
    weight_decay: float
    warmup: float

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --- models -------------------------------------------------------------------------------------
class PreNormBlock(nn.Module):
    """``x + W2 GELU(W1 LayerNorm(x))``: a pre-norm residual MLP block."""

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden or width)
        self.fc2 = nn.Linear(hidden or width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(WarmupCosineAdamW, L.LightningModule):
    """A pre-norm residual MLP for tabular data: input projection, residual blocks, LayerNorm, linear head.

    Args:
        inputs: number of input features.
        classes: number of classes (cross-entropy on logits), or ``0`` for regression (a scalar output, MSE).
        width: hidden width.
        blocks: number of :class:`PreNormBlock`.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        warmup: fraction of the optimizer steps spent warming up.
    """

    def __init__(
        self,
        inputs: int,
        classes: int,
        width: int = 64,
        blocks: int = 2,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.weight_decay, self.warmup, self.classes = lr, weight_decay, warmup, classes
        self.embed = nn.Linear(inputs, width)
        self.blocks = nn.Sequential(*(PreNormBlock(width) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes or 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.norm(self.blocks(self.embed(x))))
        return out if self.classes else out.squeeze(-1)

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y) if self.classes else F.mse_loss(output, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(self(x), y))


class WarmupCosineCNN(WarmupCosineAdamW, SmallCNN):
    """:class:`~lightning_tda.demo.SmallCNN` (``(1, 8, 8)`` digit images) trained with AdamW, warm-up and cosine."""

    def __init__(self, channels: int = 8, lr: float = 3e-3, weight_decay: float = 0.01, warmup: float = 0.1) -> None:
        super().__init__(channels=channels, lr=lr, optimizer="adamw", weight_decay=weight_decay)
        self.save_hyperparameters()
        self.warmup = warmup


class ByteLM(WarmupCosineAdamW, CausalLanguageModel):
    """A byte-level GPT-2 (vocabulary 256) trained with AdamW, warm-up and cosine decay.

    Batches are ``(input_ids, labels)`` tuples or Hugging Face-style dicts of fixed-length blocks (no
    padding, so the Hugging Face ``.loss`` is the batch mean of
    :class:`~lightning_tda.tasks.LanguageModelingTask`'s per-example mean loss).

    Args:
        width, layers, heads, context: the GPT-2 configuration (``context`` ≥ the block length).
        lr, weight_decay, warmup: the optimizer and schedule.
        init: path of a ``torch.save``-d state dict of a ``ByteLM`` without adapters (its
            :meth:`backbone_state`) to start from, e.g. for fine-tuning after pre-training; ``None`` =
            random initialisation.
        lora_rank: ``0`` trains every parameter; ``r > 0`` wraps the (initialised) GPT-2 with peft LoRA
            adapters of rank ``r`` on its attention and MLP projections and trains only them.
        lora_alpha: LoRA scaling numerator (default ``2 r``).
    """

    def __init__(
        self,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        context: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
        init: str | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
    ) -> None:
        super().__init__(
            architecture="gpt2",
            vocab_size=256,
            width=width,
            layers=layers,
            heads=heads,
            context=context,
            lr=lr,
            optimizer="adamw",
            weight_decay=weight_decay,
        )
        self.save_hyperparameters()
        self.warmup = warmup
        if init is not None:
            state = torch.load(init, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or 2 * lora_rank,
                target_modules=LORA_TARGETS["gpt2"],
                lora_dropout=0.0,
                fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out)
            )
            self.model = get_peft_model(self.model, config)

    def backbone_state(self) -> dict[str, Tensor]:
        """The GPT-2's own state dict (no adapters), what ``init`` loads."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {key: value.detach().clone() for key, value in model.state_dict().items()}


# --- tabular data -------------------------------------------------------------------------------
def _standardized(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def _one_hot(values: Sequence[Any]) -> np.ndarray:
    levels = sorted(set(values))
    return np.asarray([[float(v == level) for level in levels] for v in values])


def load_penguins_mass() -> tuple[np.ndarray, np.ndarray]:
    """Palmer penguins (``palmerpenguins``): body mass from species, island, sex and three measurements.

    333 penguins (those with every value), 10 features (one-hot species and island, sex, bill length,
    bill depth, flipper length; standardized), target body mass standardized (regression).
    """
    from palmerpenguins import load_penguins

    frame = load_penguins().dropna()
    numeric = frame[["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]].to_numpy(dtype=np.float64)
    x = np.hstack(
        [
            _one_hot(frame["species"].tolist()),
            _one_hot(frame["island"].tolist()),
            (frame["sex"].to_numpy() == "male")[:, None].astype(np.float64),
            numeric,
        ]
    )
    y = frame["body_mass_g"].to_numpy(dtype=np.float64)
    return _standardized(x), ((y - y.mean()) / y.std()).astype(np.float32)


def load_anes96() -> tuple[np.ndarray, np.ndarray]:
    """The 1996 American National Election Study (``statsmodels.datasets.anes96``): party identification.

    944 respondents, 7 classes (strong Democrat … strong Republican), 9 standardized features (log
    population, TV news days, self- and candidate left-right placements, age, education, income, vote).
    A noisy problem: the classes overlap.
    """
    from statsmodels.datasets import anes96

    data = anes96.load_pandas().data
    columns = ["logpopul", "TVnews", "selfLR", "ClinLR", "DoleLR", "age", "educ", "income", "vote"]
    return _standardized(data[columns].to_numpy(dtype=np.float64)), data["PID"].to_numpy().astype(np.int64)


def load_iris_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's iris: 150 flowers, 4 standardized features, 3 classes."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return _standardized(data.data), data.target.astype(np.int64)


class PenguinsMassDataModule(ArrayDataModule):
    """Palmer penguins body-mass regression (:func:`load_penguins_mass`)."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_penguins_mass()


class Anes96DataModule(ArrayDataModule):
    """ANES 1996 party identification, 7 classes (:func:`load_anes96`)."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_anes96()


class IrisDataModule(ArrayDataModule):
    """scikit-learn iris, 3 classes (:func:`load_iris_arrays`)."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_iris_arrays()


# --- text ---------------------------------------------------------------------------------------
STDLIB_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pprint",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "typing",
)

# Another package's documentation, for fine-tuning after pre-training on the standard library's.
NUMPY_MODULES = ("numpy.linalg", "numpy.fft")


def docstrings(modules: Sequence[str]) -> str:
    """The documentation strings (``inspect.getdoc``) of ``modules`` and of their public classes and functions.

    Each module's own docstring first, then its members' in name order (only members defined in that
    module, once each), separated by blank lines. Depends only on the installed versions of the modules.
    """
    texts: list[str] = []
    seen: set[int] = set()
    for name in modules:
        module = importlib.import_module(name)
        objects = [module] + [
            getattr(module, member)
            for member in sorted(dir(module))
            if not member.startswith("_")
            and (inspect.isclass(getattr(module, member, None)) or inspect.isroutine(getattr(module, member, None)))
            and getattr(getattr(module, member), "__module__", None) == name
        ]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and id(obj) not in seen:
                seen.add(id(obj))
                texts.append(doc.strip())
    return "\n\n".join(texts)


def byte_blocks(text: str, block_size: int) -> Tensor:
    """``text`` as UTF-8 bytes cut into consecutive ``(N, block_size)`` int64 blocks (the remainder dropped)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    n = len(data) // block_size
    return torch.from_numpy(data[: n * block_size].astype(np.int64)).reshape(n, block_size)


class DocstringBytesDataModule(L.LightningDataModule):
    """Documentation strings of installed modules (:func:`docstrings`) as byte blocks, split at random.

    The text is cut into consecutive blocks of ``block_size`` bytes; a seeded permutation picks
    ``train_blocks`` training blocks and the next ``test_blocks`` held-out blocks (the queries).

    Args:
        modules: importable module names whose documentation makes the corpus.
        train_blocks, test_blocks: sizes of the two splits (``None`` train blocks = all the rest).
        block_size: bytes per block (the model's context must be at least this).
        batch_size: training batch size.
        seed: split and shuffling seed.
    """

    def __init__(
        self,
        modules: Sequence[str] = STDLIB_MODULES,
        train_blocks: int | None = 512,
        test_blocks: int = 64,
        block_size: int = 32,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.modules = tuple(modules)
        self.train_blocks, self.test_blocks = train_blocks, test_blocks
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        blocks = byte_blocks(docstrings(self.modules), self.block_size)
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(blocks)))
        test = blocks[order[: self.test_blocks]]
        rest = order[self.test_blocks :]
        if self.train_blocks is not None:
            if self.train_blocks > len(rest):
                raise ValueError(f"train_blocks={self.train_blocks}: the corpus has only {len(rest)} more blocks.")
            rest = rest[: self.train_blocks]
        train = blocks[rest]
        self.train_set = TensorDataset(train, train)
        self.test_set = TensorDataset(test, test)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """A hash of a state dict's keys and values (names pre-trained weights in cache keys)."""
    digest = hashlib.sha1()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), path)
    return path
