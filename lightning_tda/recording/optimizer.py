"""What the callback records about the optimizer: its class and per-group hyper-parameters, which param group
holds each tracked layer, and the bias-corrected second moments ``v̂`` of Adam-family optimizers.

Under Adam/AdamW an update is ``η · m̂ / (√v̂ + ε)``, not ``η · g``: the methods that follow the optimizer
(SOURCE's preconditioned segments, Adam-aware TracInCP) need ``v̂``. It is read from the optimizer's own state
(``exp_avg_sq`` and ``step``), arranged as each tracked layer's gradient matrix ``(out, a_dim)`` (bias as the
last column), kept in float32 on the model's device (8 bytes per parameter in float64 would double what Adam
itself keeps) and moved to the CPU only when written or checkpointed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tda.layers.tracked import TrackedLayer


def optimizer_record(optimizer: Any) -> dict[str, Any]:
    """Optimizer class and per-group hyper-parameters (everything but the parameters)."""
    groups = []
    for group in optimizer.param_groups:
        groups.append(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            | {"num_params": len(group["params"])}
        )
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": cls.__name__,
        "param_groups": groups,
        "preconditioned": any("betas" in g for g in optimizer.param_groups),
    }


def layer_param_groups(optimizer: Any, layers: Sequence[TrackedLayer]) -> dict[str, int]:
    """Index of the optimizer param group holding each tracked layer's weight."""
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    return {layer.name: group_of.get(id(layer.module.weight), 0) for layer in layers}


class AdamSecondMoments:
    """Reads Adam's bias-corrected second moments of the tracked layers as ``(out, a_dim)`` float32 matrices."""

    def __init__(self, layers: Sequence[TrackedLayer]) -> None:
        self.layers = list(layers)
        self._slots = {
            id(getattr(layer.module, part)): (layer, part)
            for layer in self.layers
            for part in (("weight", "bias") if layer.has_bias else ("weight",))
        }

    def read(self, optimizer: Any) -> dict[str, Tensor]:
        """``{layer: v̂}`` now, for every tracked layer whose parameters the optimizer keeps ``exp_avg_sq`` of
        (empty for SGD). ``v̂ = v / (1 − β₂^t)``; the step count ``t`` is read from the optimizer state without
        a host synchronisation (a capturable or fused Adam keeps it on the device, and it is used there; Adam
        otherwise keeps it as a CPU tensor, read on the host)."""
        parts: dict[str, dict[str, Tensor]] = {}
        for group in optimizer.param_groups:
            betas = group.get("betas")
            if betas is None:
                continue
            for param in group["params"]:
                slot = self._slots.get(id(param))
                state = optimizer.state.get(param, {})
                if slot is None or "exp_avg_sq" not in state:
                    continue
                layer, part = slot
                second = state["exp_avg_sq"].detach()
                step = state["step"]  # 1 − β₂ᵗ cancels for small t: formed in float64
                if isinstance(step, Tensor) and step.device.type != "cpu":  # fused/capturable: stays on the device
                    steps = step.to(torch.float64)
                else:  # a number, or a CPU tensor: reading it waits for no device (no host-device copy either)
                    steps = float(step)
                parts.setdefault(layer.name, {})[part] = (second / (1 - betas[1] ** steps)).float()
        return {
            layer.name: layer.as_matrix(parts[layer.name]["weight"], parts[layer.name].get("bias"))
            for layer in self.layers
            if layer.name in parts
        }


@dataclass
class SecondMomentMean:
    """Running sum of ``v̂`` matrices over a segment's statistics steps (float32, on the model's device)."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, matrices: dict[str, Tensor]) -> None:
        if not matrices:
            return
        for name, matrix in matrices.items():
            self.sums[name] = self.sums[name] + matrix if name in self.sums else matrix.clone()
        self.count += 1

    def means(self) -> dict[str, tuple[Tensor, int]]:
        """``{layer: (mean v̂ on the CPU, number of steps averaged)}``, what a segment write takes."""
        return {name: ((total / self.count).cpu(), self.count) for name, total in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors: a Lightning checkpoint must load on a machine without the training device."""
        return {"sums": {name: t.cpu() for name, t in self.sums.items()}, "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> SecondMomentMean:
        return cls({name: t.to(device, torch.float32) for name, t in state["sums"].items()}, int(state["count"]))
