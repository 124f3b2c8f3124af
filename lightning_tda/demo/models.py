"""Ready-made Lightning modules for the examples, configs, tests and benchmarks: MLPs, a small CNN and a
ResNet, sharing one optimizer set-up (SGD with momentum, Adam or AdamW; optional step-wise cosine decay).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tda.demo.resnet import resnet


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SupervisedModule(L.LightningModule):
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


class MLPClassifier(SupervisedModule):
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


class MLPRegressor(SupervisedModule):
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


class SmallCNN(SupervisedModule):
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


class ResNet(SupervisedModule):
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
