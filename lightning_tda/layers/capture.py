"""Layer capture: forward hooks on tracked layers that see their input rows and output gradients.

Used while training (the callback's K-FAC statistics, on statistics steps only) and after it (the
curvature passes and per-example gradients of the attribution methods). How a layer's tensors become
rows is :class:`~lightning_tda.layers.tracked.TrackedLayer`'s. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.layers.tracked import TrackedLayer, UnsupportedModelError

OnRows = Callable[[TrackedLayer, Tensor], None]
OnInputs = Callable[[TrackedLayer, Tensor, "Tensor | None"], None]


class LayerCapture:
    """Forward hooks on tracked layers that record input rows and (optionally) output gradients.

    Use as a context manager, or :meth:`attach` and :meth:`release` the hooks around the forwards to capture
    (the callback attaches them for statistics steps only: a hooked module takes PyTorch's slower call path on
    every forward). While attached and autograd is on, each forward of a tracked layer stores
    ``activations[name]`` (rows from :meth:`TrackedLayer.activation_rows`, detached), the number of rows
    ``row_counts[name]`` (an int, or an int64 tensor when masked) and the output tensor ``outputs[name]`` (unless
    ``keep_outputs=False``); with ``on_gradient`` given, a tensor hook on the output calls it with the gradient
    rows ``(B, R, out)`` during backward. A module called several times per forward has its rows concatenated
    along ``R``.

    ``row_mask`` (``(B, T)`` bool, from ``Task.row_mask``; may be set per batch) drops padded positions
    from the rows of sequence layers. ``batch_size`` (may be set per batch) makes a layer whose input
    lacks the batch dimension (e.g. a position embedding fed ``(1, T)``) fail with a clear error.
    With ``on_inputs`` given, each forward's (detached) input and the current ``row_mask`` are handed to it
    instead of rows being stored: a consumer that reduces them at once, like the K-FAC statistics, never
    holds every layer's rows together (for a 3×3 convolution they are 9× its input) and may not need to
    form them at all.
    """

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        on_gradient: OnRows | None = None,
        keep_outputs: bool = True,
        row_mask: Tensor | None = None,
        batch_size: int | None = None,
        on_inputs: OnInputs | None = None,
    ) -> None:
        self.layers = list(layers)
        self._by_name = {layer.name: layer for layer in self.layers}
        self.on_gradient = on_gradient
        self.on_inputs = on_inputs
        self.keep_outputs = keep_outputs
        self.row_mask = row_mask
        self.batch_size = batch_size
        self.activations: dict[str, Tensor] = {}
        self.row_counts: dict[str, Tensor | int] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self._handles: list[Any] = []

    def clear(self) -> None:
        self.activations.clear()
        self.row_counts.clear()
        self.outputs.clear()

    def attach(self) -> None:
        """Put the forward hooks on the tracked layers (a no-op while they are on)."""
        if not self._handles:
            self._handles = [layer.module.register_forward_hook(self._hook_for(layer)) for layer in self.layers]

    def release(self) -> None:
        """Take the forward hooks off; what was captured stays until :meth:`clear`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerCapture:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.clear()

    def _hook_for(self, layer: TrackedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return None
            inputs = args[0].detach()
            check_batch(layer, inputs.shape[0], self.batch_size)
            if self.on_inputs is not None:
                self.on_inputs(layer, inputs, self.row_mask)
            else:
                rows = layer.activation_rows(inputs)
                if self.row_mask is not None:
                    rows, count = layer.masked_rows(inputs, rows, self.row_mask)
                else:
                    count = rows.shape[0] * rows.shape[1]
                previous = self.activations.get(layer.name)
                self.activations[layer.name] = rows if previous is None else torch.cat([previous, rows], dim=1)
                self.row_counts[layer.name] = self.row_counts.get(layer.name, 0) + count
            if self.keep_outputs:
                self.outputs.setdefault(layer.name, []).append(output)
            if self.on_gradient is not None and output.requires_grad:
                output.register_hook(lambda grad: self.on_gradient(layer, layer.gradient_rows(grad.detach())))
            return None

        return hook

    def output_gradient_rows(self, scalar: Tensor, retain_graph: bool = False) -> dict[str, Tensor]:
        """Gradient rows ``(B, R, out)`` of ``scalar`` w.r.t. every captured layer output.

        Uses ``torch.autograd.grad``, so parameters' ``.grad`` are left untouched.
        """
        names = [n for n in self.outputs]
        flat = [out for n in names for out in self.outputs[n]]
        grads = torch.autograd.grad(scalar, flat, retain_graph=retain_graph, allow_unused=True)
        result: dict[str, Tensor] = {}
        position = 0
        for name in names:
            layer = self._by_name[name]
            parts = []
            for out in self.outputs[name]:
                grad = grads[position]
                position += 1
                parts.append(layer.gradient_rows(torch.zeros_like(out) if grad is None else grad))
            result[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return result


def check_batch(layer: TrackedLayer, rows_batch: int, batch_size: int | None) -> None:
    """Raise if a layer's input rows do not have the batch's leading dimension."""
    if batch_size is not None and rows_batch != batch_size:
        raise UnsupportedModelError(
            f"Layer {layer.name!r} ({type(layer.module).__name__}) got an input with leading dimension {rows_batch} "
            f"for a batch of {batch_size} examples: its input is shared by the batch (e.g. a position embedding fed "
            f"(1, T) positions), so it has no per-example gradients. Leave it out: exclude=[{layer.name!r}]."
        )
