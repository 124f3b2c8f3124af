"""Layer capture: which layers are tracked, and hooks that see their inputs and output gradients.

A tracked layer's parameters are viewed as one gradient-shaped matrix of shape
``(out_features, in_features + has_bias)``: the weight (flattened to ``(out, in)`` for Conv2d) with
the bias as the last column. Per example, that matrix's gradient is ``Σ_r δ_r a_rᵀ`` over the rows
``r`` (one row for a plain Linear, one per token for sequences, one per patch for Conv2d), where
``a_r`` is the input row (with a trailing 1 for the bias) and ``δ_r`` the output gradient.

Supported: ``nn.Linear`` (any leading dims), ``nn.Conv2d`` (``groups=1``, zero padding) and
therefore the ``lora_A``/``lora_B`` Linear adapters inside peft LoRA layers. Layers are tracked
only if they have trainable parameters. Nothing here imports Lightning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UnsupportedModelError(ValueError):
    """The model (or the requested layers) cannot be tracked."""


@dataclass
class TrackedLayer:
    """One tracked module and how to turn its tensors into rows.

    Attributes:
        name: module name in ``model.named_modules()``.
        module: the module itself.
        kind: ``"linear"`` or ``"conv2d"``.
        in_features: input width of the weight matrix (``C·kh·kw`` for Conv2d), without bias.
        out_features: output width.
        has_bias: whether a bias column is appended.
    """

    name: str
    module: nn.Module
    kind: str
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def a_dim(self) -> int:
        """Width of an activation row, bias column included."""
        return self.in_features + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(out, a_dim)`` of the layer's gradient matrix."""
        return (self.out_features, self.a_dim)

    def parameter_names(self) -> list[str]:
        """Names (relative to the model) of the parameters this layer owns, weight first."""
        names = [f"{self.name}.weight"]
        if self.has_bias:
            names.append(f"{self.name}.bias")
        return names

    def activation_rows(self, inputs: Tensor) -> Tensor:
        """Input rows, shape ``(B, R, a_dim)``, in the input's dtype."""
        if self.kind == "conv2d":
            conv = self.module
            patches = F.unfold(
                inputs, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
            )
            rows = patches.transpose(1, 2)
        else:
            rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)
        return rows

    def gradient_rows(self, grad_output: Tensor) -> Tensor:
        """Output-gradient rows, shape ``(B, R, out)``."""
        if self.kind == "conv2d":
            return grad_output.flatten(2).transpose(1, 2)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def parameter_matrix(self) -> Tensor:
        """The layer's parameters as one ``(out, a_dim)`` matrix (a detached copy)."""
        weight = self.module.weight.detach().reshape(self.out_features, -1)
        if self.has_bias:
            return torch.cat([weight, self.module.bias.detach()[:, None]], dim=1)
        return weight.clone()

    def split_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Split a ``(out, a_dim)`` matrix back into ``{parameter name: tensor of its shape}``."""
        weight = matrix[:, : self.in_features].reshape(self.module.weight.shape)
        parts = {f"{self.name}.weight": weight}
        if self.has_bias:
            parts[f"{self.name}.bias"] = matrix[:, self.in_features]
        return parts


def _describe(name: str, module: nn.Module) -> TrackedLayer | str:
    """A TrackedLayer for a supported module, or the reason it is not supported."""
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, Tensor) and bias.requires_grad
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, "linear", module.in_features, module.out_features, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "Conv2d with groups>1, non-zero padding_mode or string padding"
        k = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return TrackedLayer(name, module, "conv2d", k, module.out_channels, has_bias)
    return type(module).__name__


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


LORA_PATTERNS = ("*lora_A*", "*lora_B*")


def find_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[list[TrackedLayer], dict[str, str]]:
    """Tracked layers of ``model`` and the skipped modules that own trainable parameters.

    Args:
        model: the model to scan.
        include: ``None`` (every supported layer with trainable parameters), ``"lora"`` (only the
            peft LoRA adapters), or fnmatch patterns on module names, e.g. ``["encoder.*"]``.
        exclude: fnmatch patterns removed from the selection.

    Returns:
        ``(layers, skipped)`` where ``skipped`` maps module name to the reason it is not tracked.
    """
    patterns = LORA_PATTERNS if include == "lora" else ([include] if isinstance(include, str) else include)
    layers: list[TrackedLayer] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own or not _matches(name, patterns) or (exclude and _matches(name, exclude)):
            continue
        described = _describe(name, module)
        if isinstance(described, str):
            skipped[name] = described
        elif not described.module.weight.requires_grad:
            skipped[name] = "frozen weight with a trainable bias"
        else:
            layers.append(described)
    if include == "lora" and not layers:
        raise UnsupportedModelError(
            "modules='lora' found no LoRA adapter layers (no module named '*lora_A*'/'*lora_B*' with "
            "trainable parameters). Wrap the model with peft.get_peft_model, or pass name patterns."
        )
    if not layers:
        raise UnsupportedModelError(
            f"No trackable layers: nothing among nn.Linear/nn.Conv2d with trainable parameters matched "
            f"include={include!r}, exclude={exclude!r}. Skipped modules: {skipped or 'none'}."
        )
    return layers, skipped


def layers_by_name(model: nn.Module, names: Iterable[str]) -> list[TrackedLayer]:
    """Rebuild tracked layers of ``model`` for the given module names (e.g. those in a trace)."""
    modules = dict(model.named_modules())
    layers = []
    for name in names:
        if name not in modules:
            raise UnsupportedModelError(f"Layer {name!r} recorded in the trace does not exist in the model.")
        described = _describe(name, modules[name])
        if isinstance(described, str):
            raise UnsupportedModelError(f"Layer {name!r} is a {described}, which cannot be tracked.")
        layers.append(described)
    return layers


OnRows = Callable[[TrackedLayer, Tensor], None]


class LayerCapture:
    """Forward hooks on tracked layers that record input rows and (optionally) output gradients.

    Use as a context manager. While ``enabled()`` returns True and autograd is on, each forward of a
    tracked layer stores ``activations[name]`` (rows ``(B, R, a_dim)``, detached) and the output
    tensor ``outputs[name]`` (unless ``keep_outputs=False``); with ``on_gradient`` given, a tensor hook on
    the output calls it with the gradient rows ``(B, R, out)`` during backward. A module called several
    times per forward has its rows concatenated along ``R``.
    """

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        enabled: Callable[[], bool] = lambda: True,
        on_gradient: OnRows | None = None,
        keep_outputs: bool = True,
    ) -> None:
        self.layers = list(layers)
        self._by_name = {layer.name: layer for layer in self.layers}
        self.enabled = enabled
        self.on_gradient = on_gradient
        self.keep_outputs = keep_outputs
        self.activations: dict[str, Tensor] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self._handles: list[Any] = []

    def clear(self) -> None:
        self.activations.clear()
        self.outputs.clear()

    def __enter__(self) -> LayerCapture:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook_for(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _hook_for(self, layer: TrackedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and self.enabled()):
                return None
            rows = layer.activation_rows(args[0].detach())
            previous = self.activations.get(layer.name)
            self.activations[layer.name] = rows if previous is None else torch.cat([previous, rows], dim=1)
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
            result[name] = torch.cat(parts, dim=1)
        return result


def per_example_gradients(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    per_example_values: Callable[[nn.Module], Tensor],
) -> dict[str, Tensor]:
    """Per-example gradients of ``per_example_values(model)`` (shape ``(B,)``) for tracked layers.

    Examples must be independent in the forward pass (no batch norm in train mode), so that the
    gradient of the sum gives each example's own gradient.

    Returns:
        ``{layer name: tensor (B, out, a_dim)}`` in the model's dtype.
    """
    with LayerCapture(layers) as capture:
        values = per_example_values(model)
        rows = capture.output_gradient_rows(values.sum())
        return {
            layer.name: torch.einsum("bro,bri->boi", rows[layer.name], capture.activations[layer.name])
            for layer in layers
        }
