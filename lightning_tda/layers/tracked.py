"""Tracked layers: which modules attribution follows, and how their tensors become rows and gradient matrices.

A tracked layer's parameters are viewed as one gradient-shaped matrix of shape
``(out_features, in_features + has_bias)``: the weight as ``(out, in)`` with the bias as the last
column. Per example, that matrix's gradient is ``Σ_r δ_r a_rᵀ`` over the rows ``r`` (one row for a
plain Linear, one per token for sequences, one per patch for Conv2d), where ``a_r`` is the input row
(with a trailing 1 for the bias) and ``δ_r`` the output gradient.

Layer kinds (``TrackedLayer.kind``):

* ``"linear"``: ``nn.Linear`` applied to any leading dims (so per token for sequences), hence also
  the ``lora_A``/``lora_B`` adapters inside peft LoRA layers;
* ``"transposed_linear"``: Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and
  MLP projections), a Linear whose weight is stored ``(in, out)``; recognised by class name and its
  ``nx``/``nf`` attributes, so ``transformers`` is never imported here;
* ``"conv2d"``: ``nn.Conv2d`` with ``groups=1`` and zero padding, one row per patch;
* ``"embedding"``: ``nn.Embedding``, a Linear on one-hot inputs: the gradient matrix is
  ``(embedding_dim, num_embeddings)`` and K-FAC's input factor is diagonal (token frequencies).
  Its input rows are kept as token ids ``(B, R)`` (``-1`` where a token gets no gradient: the
  ``padding_idx`` and masked positions), never as one-hot vectors.

Not tracked (reported as skipped): normalisation layers (BatchNorm, LayerNorm, RMSNorm: few
parameters, and in train-mode BatchNorm an example's gradient depends on the whole batch; kronfluence
leaves them out too), other modules owning parameters directly, embeddings of a Hugging Face model
other than its token embedding (``get_input_embeddings()``; GPT-2's position embedding sees one
``(1, T)`` input shared by the batch, so it has no per-example gradient), and the second user of a
tied parameter (:func:`find_layers`). The hooks that see a tracked layer's tensors are in
:mod:`lightning_tda.layers.capture`. Nothing here imports Lightning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS = (
    "nn.Linear (on any leading dims, e.g. per token; also peft LoRA adapters), Hugging Face Conv1D (GPT-2), "
    "nn.Conv2d (groups=1, zero padding) and nn.Embedding (token embeddings)"
)
UNTRACKED_NOTE = (
    "Normalisation layers (BatchNorm, LayerNorm, RMSNorm) are never tracked: they hold few parameters and a "
    "train-mode BatchNorm makes each example's gradient depend on its batch."
)
DIAGONAL_INPUT_KINDS = ("embedding",)  # K-FAC input factor stored as its diagonal (a_dim,)


class UnsupportedModelError(ValueError):
    """The model (or the requested layers) cannot be tracked."""


@dataclass
class TrackedLayer:
    """One tracked module and how to turn its tensors into rows and gradient matrices.

    Attributes:
        name: module name in ``model.named_modules()``.
        module: the module itself.
        kind: ``"linear"``, ``"transposed_linear"``, ``"conv2d"`` or ``"embedding"``.
        in_features: input width of the weight matrix (``C·kh·kw`` for Conv2d, ``num_embeddings`` for an
            Embedding), without bias.
        out_features: output width (``embedding_dim`` for an Embedding).
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

    @property
    def diagonal_input(self) -> bool:
        """Whether K-FAC's input factor ``A`` is diagonal and stored as ``(a_dim,)`` (embeddings)."""
        return self.kind in DIAGONAL_INPUT_KINDS

    @property
    def input_factor_shape(self) -> tuple[int, ...]:
        """``(a_dim,)`` for a diagonal input factor, else ``(a_dim, a_dim)``."""
        return (self.a_dim,) if self.diagonal_input else (self.a_dim, self.a_dim)

    def parameter_names(self) -> list[str]:
        """Names (relative to the model) of the parameters this layer owns, weight first."""
        names = [f"{self.name}.weight"]
        if self.has_bias:
            names.append(f"{self.name}.bias")
        return names

    # --- rows -----------------------------------------------------------------------------------
    def activation_rows(self, inputs: Tensor) -> Tensor:
        """Input rows: ``(B, R, a_dim)`` in the input's dtype, or token ids ``(B, R)`` (int64, ``-1`` at
        ``padding_idx``) for an embedding."""
        if self.kind == "embedding":
            ids = inputs.reshape(inputs.shape[0], -1).long()
            padding = self.module.padding_idx
            return ids if padding is None else ids.masked_fill(ids == padding, -1)
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

    def masked_rows(self, inputs: Tensor, rows: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | int]:
        """Drop the rows of positions where the task's ``(B, T)`` row ``mask`` is False (padding).

        Applies when the layer's input starts with the mask's ``(B, T)`` (sequence layers; never a
        Conv2d). Returns ``(rows, number of kept rows)``: dense rows are zeroed, token ids set to ``-1``;
        the number is an int64 tensor on the mask's device (a Python int when the mask does not apply).
        """
        leading = inputs.shape if self.kind == "embedding" else inputs.shape[:-1]
        if self.kind == "conv2d" or len(leading) < 2 or tuple(leading[:2]) != tuple(mask.shape):
            return rows, rows.shape[0] * rows.shape[1]
        keep = mask.bool().reshape(*mask.shape, *[1] * (len(leading) - 2)).expand(leading).reshape(rows.shape[:2])
        if self.kind == "embedding":
            return rows.masked_fill(~keep, -1), keep.sum()
        return rows * keep.unsqueeze(-1).to(rows.dtype), keep.sum()

    def gradient_rows(self, grad_output: Tensor) -> Tensor:
        """Output-gradient rows, shape ``(B, R, out)``."""
        if self.kind == "conv2d":
            return grad_output.flatten(2).transpose(1, 2)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    # --- what the rows give -----------------------------------------------------------------------
    def gradient_matrices(self, grad_rows: Tensor, activations: Tensor) -> Tensor:
        """Per-example gradient matrices ``Σ_r δ_r a_rᵀ``: ``(B, out, a_dim)`` in the gradient rows' dtype.

        For an embedding, column ``v`` of example ``b`` is the sum of ``δ_r`` over the rows whose token
        is ``v`` (a scatter-add, no one-hot matrix).
        """
        if self.kind != "embedding":
            return torch.einsum("bro,bri->boi", grad_rows, activations.to(grad_rows.dtype))
        batch, out = grad_rows.shape[0], grad_rows.shape[-1]
        valid = activations >= 0
        offsets = torch.arange(batch, device=activations.device)[:, None] * self.a_dim
        flat = grad_rows.new_zeros(batch * self.a_dim, out)
        flat.index_add_(0, (activations + offsets)[valid], grad_rows[valid])
        return flat.reshape(batch, self.a_dim, out).transpose(1, 2)

    def input_sum(self, activations: Tensor) -> Tensor:
        """``Σ_r a_r a_rᵀ`` in float64: ``(a_dim, a_dim)``, or its diagonal ``(a_dim,)`` (token counts) for an
        embedding."""
        if self.kind == "embedding":
            ids = activations[activations >= 0]
            return torch.bincount(ids, minlength=self.a_dim).to(torch.float64)
        flat = activations.reshape(-1, activations.shape[-1]).double()
        return flat.T @ flat

    # --- parameters -----------------------------------------------------------------------------
    def as_matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Parameter-shaped ``weight`` (and ``bias``) as one ``(out, a_dim)`` matrix (a view where possible)."""
        if self.kind in ("transposed_linear", "embedding"):
            matrix = weight.T
        else:
            matrix = weight.reshape(self.out_features, -1)
        if self.has_bias:
            return torch.cat([matrix, bias[:, None]], dim=1)
        return matrix

    def parameter_matrix(self) -> Tensor:
        """The layer's parameters as one ``(out, a_dim)`` matrix (a detached copy)."""
        bias = self.module.bias.detach() if self.has_bias else None
        return self.as_matrix(self.module.weight.detach(), bias).clone()

    def split_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Split a ``(out, a_dim)`` matrix back into ``{parameter name: tensor of its shape}``."""
        weight = matrix[:, : self.in_features]
        if self.kind in ("transposed_linear", "embedding"):
            weight = weight.T
        parts = {f"{self.name}.weight": weight.reshape(self.module.weight.shape)}
        if self.has_bias:
            parts[f"{self.name}.bias"] = matrix[:, self.in_features]
        return parts


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``x @ weight + bias``, weight ``(nx, nf)``), without importing transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(getattr(module, "nx", None), int)
        and isinstance(weight, Tensor)
        and tuple(weight.shape) == (module.nx, module.nf)
    )


def _describe(name: str, module: nn.Module) -> TrackedLayer | str:
    """A TrackedLayer for a supported module, or the reason it is not supported."""
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, Tensor) and bias.requires_grad
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, "linear", module.in_features, module.out_features, has_bias)
    if _is_hf_conv1d(module):
        return TrackedLayer(name, module, "transposed_linear", module.nx, module.nf, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "Conv2d with groups>1, non-zero padding_mode or string padding"
        k = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return TrackedLayer(name, module, "conv2d", k, module.out_channels, has_bias)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "Embedding with max_norm (its forward rescales the weight)"
        return TrackedLayer(name, module, "embedding", module.num_embeddings, module.embedding_dim, False)
    return type(module).__name__


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shared_input_embeddings(model: nn.Module) -> dict[str, str]:
    """Embeddings of Hugging Face models (modules with ``get_input_embeddings``) other than their token
    embedding, with the reason they are skipped: position (and similar) embeddings get one input shared by
    the whole batch, so they have no per-example gradients."""
    owners = {}
    for prefix, module in model.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            token_embedding = getter()
        except (NotImplementedError, AttributeError):
            continue
        for name, sub in module.named_modules(prefix=prefix):
            if isinstance(sub, nn.Embedding) and sub is not token_embedding and name not in owners:
                owners[name] = (
                    "an embedding of a Hugging Face model other than its token embedding (e.g. positions, shared "
                    "by the whole batch: no per-example gradient)"
                )
    return owners


LORA_PATTERNS = ("*lora_A*", "*lora_B*")


class LayerSelection(NamedTuple):
    """What :func:`find_layers` chose.

    Attributes:
        layers: the tracked layers, in module order.
        skipped: ``{module name: reason}`` for modules with trainable parameters that are not tracked.
        tied: ``{module name: tracked module name}`` for layers whose weight is the same parameter as a
            tracked layer's (e.g. GPT-2's ``transformer.wte`` and ``lm_head``): tracked once only.
    """

    layers: list[TrackedLayer]
    skipped: dict[str, str]
    tied: dict[str, str]


def find_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> LayerSelection:
    """Tracked layers of ``model``, the skipped modules that own trainable parameters, and tied layers.

    A parameter shared by two supported layers (tied weights, e.g. GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) is tracked once, never twice: by its Linear-like user (the output head,
    whose gradient is dense; what kronfluence tracks) rather than the embedding, else by the first
    user in module order. Its other use is left out of the per-example gradients (its effect through the
    head is kept); exclude the head to track the embedding instead.

    Args:
        model: the model to scan.
        include: ``None`` (every supported layer with trainable parameters), ``"lora"`` (only the
            peft LoRA adapters), or fnmatch patterns on module names, e.g. ``["encoder.*"]``.
        exclude: fnmatch patterns removed from the selection.

    Returns:
        a :class:`LayerSelection` ``(layers, skipped, tied)``.
    """
    patterns = LORA_PATTERNS if include == "lora" else ([include] if isinstance(include, str) else include)
    shared_inputs = _shared_input_embeddings(model)
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
        elif name in shared_inputs:
            skipped[name] = shared_inputs[name]
        else:
            layers.append(described)
    layers, tied = _untie(layers)
    if include == "lora" and not layers:
        raise UnsupportedModelError(
            "modules='lora' found no LoRA adapter layers (no module named '*lora_A*'/'*lora_B*' with "
            "trainable parameters). Wrap the model with peft.get_peft_model, or pass name patterns."
        )
    if not layers:
        raise UnsupportedModelError(
            f"No trackable layers: nothing among the supported layers ({SUPPORTED_LAYERS}) with trainable "
            f"parameters matched include={include!r}, exclude={exclude!r}. Skipped modules: {skipped or 'none'}."
        )
    return LayerSelection(layers, skipped, tied)


def selection_warnings(skipped: Mapping[str, str], tied: Mapping[str, str]) -> list[str]:
    """What to tell the user about a :func:`find_layers` selection: modules with trainable parameters that are
    not tracked (unsupported), and tied parameters tracked once."""
    messages = []
    if skipped:
        messages.append(
            "does not track these modules with trainable parameters (unsupported): "
            + ", ".join(f"{name} ({why})" for name, why in skipped.items())
            + f". Tracked: {SUPPORTED_LAYERS}. {UNTRACKED_NOTE}"
        )
    if tied:
        messages.append(
            "tracks tied parameters once: "
            + ", ".join(f"{name} shares its weight with {kept}, tracked as {kept}" for name, kept in tied.items())
            + ". The other use of the weight is left out of attribution's gradients (as kronfluence does); "
            "exclude the tracked layer (exclude=[...]) to track the other one instead."
        )
    return messages


def _untie(layers: list[TrackedLayer]) -> tuple[list[TrackedLayer], dict[str, str]]:
    """Keep one layer per shared weight (see :func:`find_layers`); ``{dropped: kept}``."""
    users: dict[int, list[TrackedLayer]] = {}
    for layer in layers:
        users.setdefault(id(layer.module.weight), []).append(layer)
    tied: dict[str, str] = {}
    for group in users.values():
        if len(group) > 1:
            kept = next((la for la in group if la.kind != "embedding"), group[0])
            tied.update({la.name: kept.name for la in group if la is not kept})
    return [la for la in layers if la.name not in tied], tied


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
