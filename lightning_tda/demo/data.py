"""Ready-made data modules for the examples, configs, tests and benchmarks.

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
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


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
