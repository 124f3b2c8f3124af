"""What the recorder needs from the Lightning ``Trainer``: whether it can follow the run (its strategy, its
optimization, its checkpoints), how many optimizer steps a fit plans, the scale that turns autograd's output
gradients into per-example ones, and statistics summed over its ranks.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from torch import Tensor

from lightning_tda.layers.covariances import KFACStatistics


def check_trainer(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    """Refuse a run the recorder cannot follow (:func:`check_strategy`, manual optimization); the warnings about
    what it can follow only in part."""
    check_strategy(trainer.strategy)
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "TDACallback supports automatic optimization only: with manual optimization it cannot tell "
            "which backward belongs to which optimizer step. Set automatic_optimization = True or "
            "remove the callback."
        )
    return [
        "TDACallback: a ModelCheckpoint has save_weights_only=True, so its checkpoints hold no callback state and "
        "a run resumed from them cannot continue the trace."
        for callback in trainer.callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_weights_only
    ]


def check_strategy(strategy: Strategy) -> None:
    """Refuse a strategy the recorder cannot follow: one device, or DDP (every rank holds the whole model).

    Sharded strategies (FSDP, DeepSpeed, model parallelism) hold a slice of each parameter and of Adam's
    state per rank: ``state_dict()`` is a collective there (rank 0 alone would hang in it) and the layer
    hooks would see sharded weights. They are refused at ``setup`` rather than half supported.
    """
    if isinstance(strategy, SingleDeviceStrategy) or (
        isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    ):
        return
    raise RuntimeError(
        f"TDACallback does not support the {type(strategy).__name__} strategy: it shards the model's parameters "
        f"and optimizer state across processes, and the recorder needs every parameter on every rank (checkpoints, "
        f"layer statistics, Adam's second moments). Supported: a single device (strategy='auto' on one device) "
        f"and DDP (strategy='ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', ...). Train with DDP, or "
        f"remove the callback."
    )


def planned_steps(trainer: L.Trainer) -> tuple[int, int | None]:
    """``(optimizer steps this fit will make, optimizer steps per epoch or None)``, for planning segments."""
    total = trainer.estimated_stepping_batches - trainer.global_step
    if not math.isfinite(total):
        if trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps - trainer.global_step
        else:
            raise RuntimeError(
                "TDACallback cannot plan segments: the number of training steps is unknown (iterable "
                "dataloader without max_steps). Set Trainer(max_steps=...)."
            )
    batches = trainer.num_training_batches
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
    return int(total), steps_per_epoch


def per_example_scale(trainer: L.Trainer, batch_size: int) -> Tensor | float:
    """Factor turning autograd's output gradients into per-example gradients. Under a GradScaler it is a
    device tensor: the scale is read without a host synchronisation (``get_scale()`` would synchronise;
    ``update()`` changes the scale in place only after this step's backward)."""
    scale = float(batch_size * trainer.accumulate_grad_batches)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return scale
    current = scaler._get_scale_async()  # None before the first scaled loss: get_scale() is its initial value
    return scale / (float(scaler.get_scale()) if current is None else current.double())


def summed_over_ranks(stats: KFACStatistics, trainer: L.Trainer) -> dict[str, Any]:
    """``stats``' K-FAC sums summed over ranks, on the CPU, plus the skipped-step count under ``"__skipped__"``."""
    if trainer.world_size == 1:
        return stats.summed()
    strategy = trainer.strategy
    return stats.summed(lambda flat: strategy.reduce(flat.to(strategy.root_device), reduce_op="sum"))
