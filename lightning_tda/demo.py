"""Ready-made Lightning modules and data modules for the examples, configs, tests and benchmarks.

Real data that works offline: scikit-learn's bundled digits (1,797 8×8 images, 10 classes) and
the UCI Concrete regression set bundled with this package, plus synthetic images for the ResNet
(a real architecture at a size where recording cost matters). Every data module exposes
``train_set`` / ``test_set`` (map-style, ids = indices) after ``setup``.
"""

from __future__ import annotations

from importlib import resources

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.models import resnet


class ArrayDataModule(L.LightningDataModule):
    """Train/test split of in-memory arrays; optional label noise on the training split.

    Args:
        batch_size: training batch size.
        test_fraction: fraction held out as the test (query) set.
        seed: split and noise seed.
        shuffle: shuffle training batches each epoch.
        flip_fraction: fraction of training labels replaced by a different random class
            (classification only); ``flipped`` then holds the mask.
    """

    def __init__(
        self,
        batch_size: int = 64,
        test_fraction: float = 0.2,
        seed: int = 0,
        shuffle: bool = True,
        flip_fraction: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.seed = seed
        self.shuffle = shuffle
        self.flip_fraction = flip_fraction
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.flipped: Tensor | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.arrays()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        n_test = int(round(len(x) * self.test_fraction))
        test, train = order[:n_test], order[n_test:]
        x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
        y_train = y_t[train].clone()
        self.flipped = torch.zeros(len(train), dtype=torch.bool)
        if self.flip_fraction > 0:
            classes = int(y_t.max()) + 1
            chosen = rng.choice(len(train), size=int(round(self.flip_fraction * len(train))), replace=False)
            shift = torch.as_tensor(rng.integers(1, classes, size=len(chosen)))
            y_train[chosen] = (y_train[chosen] + shift) % classes
            self.flipped[chosen] = True
        self.train_set = TensorDataset(x_t[train], y_train)
        self.test_set = TensorDataset(x_t[test], y_t[test])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn digits, pixels scaled to [0, 1]; ``images=True`` gives ``(1, 8, 8)`` tensors."""

    def __init__(self, *args, images: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images = images

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data.astype(np.float32) / 16.0
        if self.images:
            x = x.reshape(-1, 1, 8, 8)
        return x, digits.target.astype(np.int64)


def load_concrete() -> tuple[np.ndarray, np.ndarray]:
    """UCI Concrete: ``(x (1030, 8), y (1030,))`` float32, standardized."""
    with resources.files("lightning_tda").joinpath("data/concrete.data").open() as handle:
        raw = np.loadtxt(handle, dtype=np.float64)
    x, y = raw[:, :8], raw[:, 8]
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


class ConcreteDataModule(ArrayDataModule):
    """UCI Concrete compressive strength, inputs and target standardized (regression)."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_concrete()


def headless_trainer(**overrides) -> L.Trainer:
    """A one-process CPU ``Trainer`` without logger, checkpoints, progress bar or model summary.

    What tests, benchmarks and re-training loops want; ``overrides`` are any other ``Trainer`` arguments.
    """
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **overrides})


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Supervised(L.LightningModule):
    """Shared optimizer set-up: SGD (with momentum) or Adam/AdamW, optional step-wise cosine decay."""

    def __init__(self, lr: float, optimizer: str, momentum: float, weight_decay: float, cosine: bool) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer={optimizer!r}: use 'sgd', 'adam' or 'adamw'.")
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.weight_decay, self.cosine = weight_decay, cosine

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine:
            return opt
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss(self(x), y))


class MLPClassifier(_Supervised):
    """MLP classifier; the default sizes give the 26k-parameter digits MLP (64-128-128-10)."""

    def __init__(
        self,
        sizes: list[int] | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, cosine)
        self.save_hyperparameters()
        self.net = mlp(sizes or [64, 128, 128, 10])

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)


class MLPRegressor(_Supervised):
    """MLP regressor with a scalar output (the SOURCE paper's Concrete model is 3 layers)."""

    def __init__(
        self,
        sizes: list[int] | None = None,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, cosine)
        self.save_hyperparameters()
        self.net = mlp(sizes or [8, 64, 64, 1])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, pred: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(pred, y)


class SmallCNN(_Supervised):
    """A small CNN for ``(1, 8, 8)`` digit images: two 3×3 convolutions and a linear head."""

    def __init__(
        self,
        channels: int = 8,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, cosine)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * 16, 10),
        )

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)


class SyntheticImageDataModule(ArrayDataModule):
    """Synthetic ``(channels, size, size)`` images in ``classes`` classes, generated offline.

    Each class has a fixed random template; an image is its class template times ``signal`` plus
    standard normal noise, so the classes are learnable but not trivially separable.

    Args:
        num_examples: train and test examples together (``test_fraction`` of them are held out).
        size: image height and width.
        channels: image channels.
        classes: number of classes.
        signal: template scale relative to the unit noise.
    """

    def __init__(
        self,
        *args,
        num_examples: int = 2_000,
        size: int = 32,
        channels: int = 3,
        classes: int = 10,
        signal: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.num_examples, self.size, self.channels = num_examples, size, channels
        self.classes, self.signal = classes, signal

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed + 1)
        shape = (self.channels, self.size, self.size)
        templates = rng.standard_normal((self.classes, *shape)).astype(np.float32)
        y = rng.integers(0, self.classes, size=self.num_examples)
        x = self.signal * templates[y] + rng.standard_normal((self.num_examples, *shape)).astype(np.float32)
        return x, y.astype(np.int64)


class ResNet(_Supervised):
    """A ResNet of basic blocks for small images (no torchvision needed; :func:`lightning_tda.models.resnet`).

    The defaults give ResNet-18 at half width (stages of 32, 64, 128, 256 channels, two blocks each;
    2.8M parameters) with the 3×3 stride-1 stem usual for 32×32 inputs: 20 Conv2d, 20 BatchNorm2d
    and one Linear head. ``stem="imagenet"`` is torchvision's layout (7×7 stride-2 convolution and a
    max pool), 16× cheaper per image. Attribution tracks the convolutions and the head, not the
    BatchNorm layers (they keep their trained values in every method, as in kronfluence).

    Args:
        width: channels of the first stage; each later stage doubles them.
        blocks: basic blocks per stage (``[2, 2, 2, 2]`` is ResNet-18).
        in_channels: image channels.
        num_classes: output classes.
        stem: ``"cifar"`` or ``"imagenet"``.
    """

    def __init__(
        self,
        width: int = 32,
        blocks: list[int] | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        stem: str = "cifar",
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine: bool = False,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, cosine)
        self.save_hyperparameters()
        self.net = resnet(width, blocks or [2, 2, 2, 2], in_channels, num_classes, stem)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)
