"""Per-example gradients of tracked layers, kept factored, and the products attribution needs.

A tracked layer's per-example gradient is ``G_b = Σ_r δ_{b,r} a_{b,r}ᵀ`` (``capture.py``): ``R`` rows
of output gradients ``δ`` ``(B, R, out)`` and of inputs ``a`` ``(B, R, a_dim)`` (one row for a plain
Linear, one per patch for Conv2d, one per token for sequences; an embedding's inputs are one-hot,
kept as token ids ``(B, R)``). Attribution needs only a few products of these matrices: dot products
with a handful of query-side matrices, each example's dot product with its own matrix, squared norms
and weighted sums over examples. :class:`LayerGradients` computes each product either from the rows
or from the dense ``(B, out, a_dim)`` gradients, whichever takes fewer multiplications (an
embedding's always from its rows, by gathering and scattering columns), one layer at a time, and
materializes dense gradients in chunks of examples of at most ``DENSE_CHUNK_BYTES``. Memory is
bounded by the largest layer, not by ``batch size × parameters``: concatenating every layer's
float64 per-example gradients of a 2.8M-parameter ResNet at batch 128 took 8 GB.

Products are computed in the gradients' dtype (the model's, at least float32) and returned in
float64, so sums over batches and layers accumulate in float64. Everything stays on the device of
the rows. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_tda.layers.capture import LayerCapture, check_batch
from lightning_tda.layers.tracked import TrackedLayer

DENSE_CHUNK_BYTES = 64 * 2**20  # largest dense per-example gradient block (or intermediate) formed at once


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products are computed in: the gradients' own, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LayerGradients:
    """Per-example gradients ``G_b = Σ_r δ_{b,r} a_{b,r}ᵀ`` of one layer for a batch, as rows.

    Attributes:
        layer: the tracked layer (its kind decides how rows become matrices).
        deltas: ``(B, R, out)`` output-gradient rows.
        activations: ``(B, R, a_dim)`` input rows (with the bias column when the layer has a bias), or
            an embedding's token ids ``(B, R)`` (``-1`` for rows without a gradient).
    """

    layer: TrackedLayer
    deltas: Tensor
    activations: Tensor

    def __post_init__(self) -> None:
        dtype = compute_dtype(self.deltas.dtype)
        self.deltas = self.deltas.to(dtype)
        if self.activations.is_floating_point():
            self.activations = self.activations.to(dtype)

    def __len__(self) -> int:
        return self.deltas.shape[0]

    def __getitem__(self, examples: slice) -> LayerGradients:
        """The gradients of a slice of the batch's examples."""
        return LayerGradients(self.layer, self.deltas[examples], self.activations[examples])

    @property
    def rows(self) -> int:
        return self.deltas.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, out, a_dim)``, the shape of the dense gradients."""
        return (len(self), self.deltas.shape[2], self.layer.a_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.deltas.dtype

    @property
    def one_hot(self) -> bool:
        """Whether the inputs are an embedding's token ids."""
        return not self.activations.is_floating_point()

    def dense(self, examples: slice = slice(None)) -> Tensor:
        """Dense gradients ``(b, out, a_dim)`` of ``examples`` in the compute dtype."""
        return self.layer.gradient_matrices(self.deltas[examples], self.activations[examples])

    def examples(self, elements_per_example: int) -> Iterator[slice]:
        """Consecutive chunks of examples whose intermediates of ``elements_per_example`` each stay
        under ``DENSE_CHUNK_BYTES``."""
        size = max(1, DENSE_CHUNK_BYTES // (elements_per_example * self.deltas.element_size()))
        for start in range(0, len(self), size):
            yield slice(start, min(len(self), start + size))

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """``(examples, dense gradients)`` in consecutive chunks of at most ``DENSE_CHUNK_BYTES``."""
        _, out, a_dim = self.shape
        for chunk in self.examples(out * a_dim):
            yield chunk, self.dense(chunk)

    def _rows_cheaper(self, others: int) -> bool:
        """Whether products with ``others`` matrices are cheaper from the rows (``others·R`` multiplications
        of size ``out·a_dim`` per example) than through dense gradients (``R + others`` of them)."""
        return self.one_hot or others * self.rows <= others + self.rows

    def _token_ids(self, examples: slice) -> tuple[Tensor, Tensor]:
        """An embedding's token ids of ``examples`` with ``-1`` replaced by 0, and the rows' validity mask."""
        ids = self.activations[examples]
        return ids.clamp(min=0), ids >= 0

    def dot(self, matrices: Tensor) -> Tensor:
        """``⟨M_q, G_b⟩`` for ``M`` of shape ``(Q, out, a_dim)`` (or ``(Q, out·a_dim)``): ``(Q, B)`` float64."""
        queries, (batch, out, a_dim) = matrices.shape[0], self.shape
        matrices = matrices.to(self.dtype).reshape(queries, out, a_dim)
        result = torch.empty(queries, batch, dtype=torch.float64, device=self.deltas.device)
        if not self._rows_cheaper(queries):
            flat = matrices.reshape(queries, -1)
            for chunk, dense in self.chunks():
                result[:, chunk] = (flat @ dense.reshape(dense.shape[0], -1).T).double()
            return result
        for chunk in self.examples(self.rows * queries * out):  # Σ_r δ_rᵀ M_q a_r
            deltas = self.deltas[chunk]
            if self.one_hot:  # M_q a_r is column token_r of M_q
                ids, valid = self._token_ids(chunk)
                projected = matrices[:, :, ids].permute(2, 3, 0, 1)  # (b, R, Q, out)
                deltas = deltas * valid[..., None]
            else:
                inputs = self.activations[chunk].reshape(-1, a_dim)
                projected = (inputs @ matrices.reshape(-1, a_dim).T).reshape(*deltas.shape[:2], queries, out)
            result[:, chunk] = (projected * deltas[:, :, None, :]).sum(dim=(1, 3)).T.double()
        return result

    def self_dot(self, matrices: Tensor) -> Tensor:
        """``⟨M_b, G_b⟩`` per example for ``M`` of shape ``(B, out, a_dim)``: ``(B,)`` float64.

        Always from the rows (``Σ_r δ_rᵀ M_b a_r``), which costs no more than forming ``G_b``."""
        matrices = matrices.to(self.dtype)
        if self.one_hot:
            ids, valid = self._token_ids(slice(None))
            projected = matrices.gather(2, ids[:, None, :].expand(-1, matrices.shape[1], -1))  # (B, out, R)
            return (projected.transpose(1, 2) * self.deltas * valid[..., None]).sum(dim=(1, 2)).double()
        projected = torch.bmm(matrices, self.activations.transpose(1, 2))  # (B, out, R)
        return (projected.transpose(1, 2) * self.deltas).sum(dim=(1, 2)).double()

    def squared_norms(self) -> Tensor:
        """``‖G_b‖²`` per example: ``(B,)`` float64.

        From the rows as ``Σ_{r,r'} (δ_r·δ_r')(a_r·a_r')`` when ``R (out + a_dim) < out · a_dim`` (for an
        embedding, ``a_r·a_r'`` is whether the two tokens are the same)."""
        _, out, a_dim = self.shape
        if self.one_hot or self.rows * (out + a_dim) < out * a_dim:
            gram_deltas = self.deltas @ self.deltas.transpose(1, 2)
            if self.one_hot:
                ids, valid = self._token_ids(slice(None))
                same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
                gram_inputs = same.to(self.dtype)
            else:
                gram_inputs = self.activations @ self.activations.transpose(1, 2)
            return (gram_deltas * gram_inputs).sum(dim=(1, 2)).double()
        result = torch.empty(len(self), dtype=torch.float64, device=self.deltas.device)
        for chunk, dense in self.chunks():
            result[chunk] = dense.pow(2).sum(dim=(1, 2)).double()
        return result

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``Σ_b w_{q,b} G_b`` for weights ``(Q, B)``: ``(Q, out, a_dim)`` float64."""
        weights = weights.to(self.dtype)
        queries, (_, out, a_dim) = weights.shape[0], self.shape
        if not self._rows_cheaper(queries):
            result = torch.zeros(queries, out * a_dim, dtype=torch.float64, device=self.deltas.device)
            for chunk, dense in self.chunks():
                result += (weights[:, chunk] @ dense.reshape(dense.shape[0], -1)).double()
            return result.reshape(queries, out, a_dim)
        result = torch.zeros(queries, out, a_dim, dtype=torch.float64, device=self.deltas.device)
        for chunk in self.examples(self.rows * queries * out):  # Σ_{b,r} (w_{q,b} δ_{b,r}) a_{b,r}ᵀ
            scaled = weights[:, chunk, None, None] * self.deltas[None, chunk]  # (Q, b, R, out)
            if self.one_hot:  # add each scaled row into its token's column
                ids, valid = self._token_ids(chunk)
                columns = torch.zeros(queries, a_dim, out, dtype=self.dtype, device=self.deltas.device)
                columns.index_add_(1, ids[valid], scaled[:, valid])
                result += columns.transpose(1, 2).double()
            else:
                inputs = self.activations[chunk].reshape(-1, a_dim)
                result += (scaled.reshape(queries, -1, out).transpose(1, 2) @ inputs).double()
        return result


Gradients = dict[str, LayerGradients]  # layer name -> per-example gradients of a batch


def per_example_rows(
    model: nn.Module, layers: Sequence[TrackedLayer], per_example_values: Callable[[nn.Module], Tensor]
) -> Gradients:
    """Per-example gradients of ``per_example_values(model)`` (shape ``(B,)``) for the tracked layers,
    as :class:`LayerGradients` (one backward pass; examples must be independent in the forward pass)."""
    with LayerCapture(layers) as capture:
        values = per_example_values(model)
        for layer in layers:
            check_batch(layer, capture.activations[layer.name].shape[0], values.shape[0])
        rows = capture.output_gradient_rows(values.sum())
        return {
            layer.name: LayerGradients(layer, rows[layer.name], capture.activations[layer.name]) for layer in layers
        }


def per_example_gradients(
    model: nn.Module, layers: Sequence[TrackedLayer], per_example_values: Callable[[nn.Module], Tensor]
) -> dict[str, Tensor]:
    """Dense per-example gradients of ``per_example_values(model)``: ``{layer name: (B, out, a_dim)}`` in the
    model's dtype (at least float32); for a few examples, or as a reference (see :func:`per_example_rows`)."""
    return {name: grads.dense() for name, grads in per_example_rows(model, layers, per_example_values).items()}


def total_dot(gradients: Mapping[str, LayerGradients], matrices: Mapping[str, Tensor]) -> Tensor:
    """``Σ_l ⟨M_{l,q}, G_{l,b}⟩`` over the layers of ``matrices``: ``(Q, B)`` float64."""
    return sum(gradients[name].dot(m) for name, m in matrices.items())
