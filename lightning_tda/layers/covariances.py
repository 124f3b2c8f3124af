"""Streaming K-FAC statistics: per-layer sums of activation and gradient outer products.

Per tracked layer we keep, in float64,

* ``A_sum = Σ_rows a aᵀ`` with ``A_count`` = number of rows (examples × tokens/patches; padded
  tokens masked by the task are not rows), kept as its diagonal ``(a_dim,)`` for embeddings, whose
  one-hot inputs make it diagonal (token counts; a vocabulary-squared matrix is never formed),
* ``S_sum = Σ_rows δ δᵀ`` with ``S_count`` = number of examples,

so ``A = A_sum / A_count`` and ``S = S_sum / S_count`` give the K-FAC factors with the convention
used by kronfluence for sequences (``A ⊗ S`` then approximates the per-example Gauss-Newton
Hessian). Sums and counts are exact, mergeable across steps, checkpoints and ranks.

Precision and cost: the sums are float64. One step's product ``Σ_r x_r x_rᵀ`` is computed in its
factor's precision (:func:`factor_dtypes`): float64 for factors narrower than
``FLOAT32_FACTOR_WIDTH`` (cheap, and exact enough for tests against exact computations on small
models), float32 for wider ones, where a float64 product of float32 rows costs twice the time for a
relative difference of about 1e-7, far below the sampling error of the factor itself; the same
precision is used to store the factor in the trace. Half-precision rows (mixed-precision training)
are widened first; float64 rows always give float64 products. The products run with autocast turned
off (:func:`full_precision`): the capture hooks run inside the training step's autocast, where a
float32 matrix product would silently be computed in bf16/fp16 (a 1e-3 relative error, and an fp16
bias column's row count overflowing at 65,505 rows). Counts are float64 on the device. Everything
stays on the rows' device (the model's); the sums move to the CPU only when a segment is written.

A factor much larger than its layer (a LoRA adapter's ``d × d`` output factor for a rank-``r``
adapter, a large vocabulary's output factor) need not be recorded at all: :func:`recorded_factors`
decides, and unrecorded factors are neither computed nor kept.
Contributions of one step are staged and added only if every value is finite. Nothing here imports
Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tda.layers.tracked import TrackedLayer

FACTORS = ("A_sum", "A_count", "S_sum", "S_count")
FACTOR_DTYPE_CHOICES = ("auto", "float32", "float64")
FLOAT32_FACTOR_WIDTH = 256  # with factor_dtype="auto", factors at least this wide are float32
FAST_CONV_MIN_CHANNELS = 16  # conv_input_product applies from this many input channels
BATCHED_MIN_POSITIONS = 512  # rows per example from which outer_product multiplies example by example
BATCHED_BYTES = 32 << 20  # memory of one batch of per-example products
ALWAYS_RECORDED_ENTRIES = 2**18  # factors up to this many entries (2 MB in float64) are always recorded


def full_precision(device: torch.device) -> AbstractContextManager:
    """Autocast off on ``device``'s type: inside it a product of float32 tensors is computed in float32
    even when the caller (a forward hook during a mixed-precision training step) runs under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def outer_product(rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``Σ_r x_r x_rᵀ`` over all rows of a ``(..., d)`` tensor: ``(d, d)`` on the rows' device, computed in
    ``dtype`` or the rows' dtype, whichever is wider (the summand added to float64 sums).

    Convolution rows arrive as ``(B, R, d)`` views of a contiguous ``(B, d, R)`` unfold; with many
    positions per example (``R ≥ BATCHED_MIN_POSITIONS``) they are multiplied example by example in
    batches, which skips copying them into one ``(B·R, d)`` matrix (measured 1.7x faster for the first
    stage of a ResNet); with few positions one large product is faster. Autocast is off inside.
    """
    with full_precision(rows.device):
        return _outer_product(rows.to(torch.promote_types(rows.dtype, dtype)))


def _outer_product(rows: Tensor) -> Tensor:
    if rows.dim() == 3 and rows.shape[1] >= BATCHED_MIN_POSITIONS and rows.transpose(1, 2).is_contiguous():
        per_example = rows.transpose(1, 2)  # (B, d, R)
        d = per_example.shape[1]
        chunk = max(1, BATCHED_BYTES // (d * d * per_example.element_size()))
        total = per_example.new_zeros(d, d)
        for start in range(0, per_example.shape[0], chunk):
            block = per_example[start : start + chunk]
            total += torch.bmm(block, block.transpose(1, 2)).sum(dim=0)
        return total
    flat = rows.reshape(-1, rows.shape[-1])
    return flat.T @ flat


def conv_input_product(
    conv: nn.Conv2d, inputs: Tensor, has_bias: bool, dtype: torch.dtype = torch.float32
) -> Tensor | None:
    """``Σ_rows a aᵀ`` of a stride-1 "same" convolution's unfolded input rows, without unfolding them.

    For a ``k × k`` kernel (``k = 2p + 1``, padding ``p``, stride and dilation 1) an entry of the input
    factor pairs channel ``c`` at kernel offset ``(u, v)`` with channel ``c'`` at ``(u', v')``; summed over
    output positions it is the correlation of the two channels at the shift ``(u' − u, v' − v)``, over
    the positions offset ``(u, v)`` sees. So the ``(k² C)²`` factor needs only ``(2k − 1)²`` products of
    the ``C``-wide input with itself shifted (each over every position; half of them by symmetry),
    minus the border rows and columns a given offset does not see: measured 2-4x faster than unfolding
    for a ResNet's 3×3 convolutions (32-256 channels, 32×32 to 4×4 inputs), no ``k²``-times larger
    unfolded copy, and the same sum up to rounding (the layout and the bias column are those of
    :meth:`TrackedLayer.activation_rows`).

    Args:
        conv: the layer (its kernel, padding, stride, dilation decide whether this applies).
        inputs: its input ``(B, C, H, W)``.
        has_bias: whether the rows end with a ones column.
        dtype: computed in this dtype or the inputs', whichever is wider (autocast off).

    Returns:
        ``(a_dim, a_dim)``, or None when the layer is not a
        stride-1 "same" convolution with an odd square kernel, or has fewer than
        ``FAST_CONV_MIN_CHANNELS`` input channels (unfolding is faster there).
    """
    kh, kw = conv.kernel_size
    if (
        kh != kw
        or kh % 2 == 0
        or kh == 1
        or tuple(conv.stride) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or tuple(conv.padding) != (kh // 2, kh // 2)
        or inputs.dim() != 4
        or min(inputs.shape[2], inputs.shape[3]) < kh + 1
        or inputs.shape[1] < FAST_CONV_MIN_CHANNELS
    ):
        return None
    with full_precision(inputs.device):
        return _shifted_conv_product(conv, inputs.to(torch.promote_types(inputs.dtype, dtype)), has_bias)


def _shifted_conv_product(conv: nn.Conv2d, x: Tensor, has_bias: bool) -> Tensor:
    """:func:`conv_input_product` once it applies (``x`` already in the product's dtype)."""
    k = conv.kernel_size[0]
    p = k // 2
    batch, channels, height, width = x.shape
    hp, wp = height + 2 * p, width + 2 * p
    image = hp * wp
    margin = 2 * p * (wp + 1)  # zeros around the flat buffer: every shifted read stays inside it
    # channels first, every padded image flattened behind the previous one: a shift is a flat offset, and
    # reads that leave an image (or wrap into the next row) land in padding zeros because |shift| <= 2p
    flat = F.pad(F.pad(x, (p, p, p, p)).transpose(0, 1).reshape(channels, batch * image), (margin, margin))
    total = batch * image

    def window(offset: int, sizes: tuple[int, ...], strides: tuple[int, ...]) -> Tensor:
        view = flat.as_strided((channels, *sizes), (flat.stride(0), *strides), flat.storage_offset() + offset)
        return view.reshape(channels, -1)

    def shifted_product(shift: tuple[int, int], rows: range | None, cols: range | None) -> Tensor:
        """Σ over positions q (in the given padded rows/columns, all when None) of x[q] x[q + shift]ᵀ."""
        move = shift[0] * wp + shift[1]
        if rows is None and cols is None:
            start, sizes, strides = margin, (total,), (1,)
        elif cols is None:
            start, sizes, strides = margin + rows.start * wp, (batch, len(rows) * wp), (image, 1)
        elif rows is None:
            start, sizes, strides = margin + cols.start, (batch, hp, len(cols)), (image, wp, 1)
        else:
            start = margin + rows.start * wp + cols.start
            sizes, strides = (batch, len(rows), len(cols)), (image, wp, 1)
        left = window(start, sizes, strides)
        return left @ window(start + move, sizes, strides).T

    def unseen(offset: int, size: int) -> range | None:
        """Padded rows (or columns) of real input that kernel offset ``offset`` never reads."""
        if offset < p:
            return range(offset + size, p + size)
        if offset > p:
            return range(p, offset)
        return None

    cache: dict[tuple, Tensor] = {}

    def cached(shift: tuple[int, int], rows: range | None, cols: range | None) -> Tensor:
        key = (shift, rows, cols)
        if key not in cache:
            if rows is None and cols is None and shift < (0, 0):  # over every position: F(-s) = F(s)ᵀ
                cache[key] = cached((-shift[0], -shift[1]), None, None).T
            else:
                cache[key] = shifted_product(shift, rows, cols)
        return cache[key]

    factor = x.new_empty(channels, k, k, channels, k, k)
    offsets = [(u, v) for u in range(k) for v in range(k)]
    for first, (u, v) in enumerate(offsets):
        rows, cols = unseen(u, height), unseen(v, width)
        for u2, v2 in offsets[first:]:  # the factor is symmetric: each pair of offsets once
            shift = (u2 - u, v2 - v)
            block = cached(shift, None, None)
            if rows is not None:
                block = block - cached(shift, rows, None)
            if cols is not None:
                block = block - cached(shift, None, cols)
            if rows is not None and cols is not None:
                block = block + cached(shift, rows, cols)
            factor[:, u, v, :, u2, v2] = block
            factor[:, u2, v2, :, u, v] = block.T
    a_dim = channels * k * k
    factor = factor.reshape(a_dim, a_dim)
    if not has_bias:
        return factor
    # the ones column: per (c, u, v), the sum of the inputs offset (u, v) reads
    sums = x.sum(dim=0)  # (C, H, W)
    column = x.new_zeros(channels, k, k)
    for u in range(k):
        for v in range(k):
            column[:, u, v] = sums[:, _seen(u, p, height), _seen(v, p, width)].sum(dim=(1, 2))
    count = batch * height * width
    with_bias = x.new_empty(a_dim + 1, a_dim + 1)
    with_bias[:a_dim, :a_dim] = factor
    with_bias[:a_dim, a_dim] = column.reshape(-1)
    with_bias[a_dim, :a_dim] = column.reshape(-1)
    with_bias[a_dim, a_dim] = count
    return with_bias


def _row_count(layer: TrackedLayer, inputs: Tensor) -> int:
    """Number of rows ``layer.activation_rows(inputs)`` would have (examples × positions)."""
    if layer.kind != "conv2d":
        return inputs.numel() // inputs.shape[-1]
    conv = layer.module
    positions = 1
    for size, k, s, p, d in zip(inputs.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return inputs.shape[0] * positions


def _seen(offset: int, p: int, size: int) -> slice:
    """The real input indices kernel offset ``offset`` reads (stride 1, padding ``p``)."""
    return slice(max(0, offset - p), min(size, size + offset - p))


def outer_sum(rows: Tensor) -> Tensor:
    """``Σ_r x_r x_rᵀ`` computed in float64: ``(d, d)``."""
    return outer_product(rows, torch.float64)


def recorded_factors(layer: TrackedLayer, max_factor_ratio: float | None) -> tuple[bool, bool]:
    """Whether the input factor ``A`` and the output factor ``S`` of ``layer`` are recorded.

    A factor is left out when it has more than ``max_factor_ratio`` times as many entries as the
    layer has parameters and more than ``ALWAYS_RECORDED_ENTRIES`` entries; ``None`` records both.
    E.g. a rank-16 LoRA ``B`` of a 1,024-wide projection: ``S`` is 1,024² = 1M entries for 16k
    parameters (ratio 64), so it is not recorded; a ResNet convolution's ``A`` (ratio ≈ 9) is.
    """
    if max_factor_ratio is None:
        return True, True
    out, a_dim = layer.shape
    limit = max(max_factor_ratio * out * a_dim, ALWAYS_RECORDED_ENTRIES)
    return math.prod(layer.input_factor_shape) <= limit, out * out <= limit


def factor_dtypes(layer: TrackedLayer, factor_dtype: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """Precision of the per-step products and the stored sums of ``layer``'s ``(A, S)``.

    ``"float32"`` or ``"float64"`` for both; ``"auto"``: float32 for a factor at least
    ``FLOAT32_FACTOR_WIDTH`` wide, float64 below (a 129-wide MLP factor stays float64, a 3×3
    convolution's ``9·C``-wide input factor with ``C ≥ 29`` is float32). An embedding's diagonal ``A``
    (token counts) is always float64.
    """
    if factor_dtype not in FACTOR_DTYPE_CHOICES:
        raise ValueError(f"factor_dtype={factor_dtype!r}: use one of {FACTOR_DTYPE_CHOICES}.")
    out, a_dim = layer.shape
    if factor_dtype != "auto":
        a_dtype = s_dtype = getattr(torch, factor_dtype)
    else:
        a_dtype, s_dtype = (torch.float32 if width >= FLOAT32_FACTOR_WIDTH else torch.float64 for width in (a_dim, out))
    return (torch.float64 if layer.diagonal_input else a_dtype), s_dtype


class KFACStatistics:
    """Float64 K-FAC sums for a set of layers, with per-step staging.

    Call :meth:`stage_activations` / :meth:`stage_gradients` during a step, then :meth:`commit`
    (adds the staged sums if they are all finite, else adds nothing and counts the step in
    ``skipped_steps``; ``last_step_finite`` says which). :meth:`factors` returns the averaged ``(A, S)`` of a layer.

    Args:
        layers: the tracked layers.
        device: where the sums live (the model's device).
        recorded: per layer name, whether ``(A, S)`` are recorded (default: both); an unrecorded
            factor's rows are ignored and its sum stays empty (shape ``(0, 0)``); counts are kept.
        factor_dtype: precision of the per-step products (see :func:`factor_dtypes`).
        max_examples: :meth:`stage_inputs` and :meth:`stage_gradients` use the first this many examples of
            what they are given (``None``: all); the counts are those of the examples used, so the factors
            are the same means over fewer examples (the recorder's ``statistics_examples``).
    """

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        device: torch.device | str | None = None,
        recorded: Mapping[str, tuple[bool, bool]] | None = None,
        factor_dtype: str = "auto",
        max_examples: int | None = None,
    ) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.max_examples = max_examples
        self.dtypes = {layer.name: factor_dtypes(layer, factor_dtype) for layer in layers}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.recorded = {name: (recorded or {}).get(name, (True, True)) for name in self.layers}
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.last_step_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._zero = False  # every sum is zero: nothing was added since the last reset
        self.reset()
        self._staged: dict[str, dict[str, list[tuple[Tensor | int, Tensor | float]]]] = {}
        self._last_step: dict[str, dict[str, list[tuple[Tensor | int, Tensor | float]]]] = {}

    def reset(self) -> None:
        """Zero every sum (used when a segment closes). Sums nothing was added to since are kept: allocating them
        anew costs a segment close more than its writes on a small model (fresh pages)."""
        if not self._zero:
            self.sums = {name: self._zeros(name) for name in self.layers}
            self.skipped_steps = torch.zeros((), dtype=torch.float64, device=self.device)
            self._zero = True
        self._last_step = {}

    def _zeros(self, name: str) -> dict[str, Tensor]:
        layer = self.layers[name]
        keep_a, keep_s = self.recorded[name]
        options = {"dtype": torch.float64, "device": self.device}
        a_shape = layer.input_factor_shape if keep_a else (0,) * len(layer.input_factor_shape)
        out = layer.out_features if keep_s else 0
        return {
            "A_sum": torch.zeros(a_shape, **options),
            "A_count": torch.zeros((), **options),
            "S_sum": torch.zeros(out, out, **options),
            "S_count": torch.zeros((), **options),
        }

    def _stage(self, name: str, key: str, value: Tensor | int, scale: Tensor | float = 1.0) -> None:
        self._staged.setdefault(name, {}).setdefault(key, []).append((value, scale))

    def stage_activations(self, name: str, rows: Tensor, count: Tensor | int | None = None) -> None:
        """Stage input rows of layer ``name`` (``LayerCapture.activations``: ``(B, R, a_dim)``, or token
        ids ``(B, R)`` for an embedding) and their number (``LayerCapture.row_counts``; default ``B·R``)."""
        layer = self.layers[name]
        if self.recorded[name][0]:
            product = layer.input_sum(rows) if layer.diagonal_input else outer_product(rows, self.dtypes[name][0])
            self._stage(name, "A_sum", product)
        self._stage(name, "A_count", rows.shape[0] * rows.shape[1] if count is None else count)

    def stage_inputs(self, layer: TrackedLayer, inputs: Tensor, row_mask: Tensor | None = None) -> None:
        """Stage the raw input of ``layer`` (what its forward received; ``row_mask`` as in
        :class:`~lightning_tda.layers.capture.LayerCapture`): the same sums as :meth:`stage_activations` of its
        (masked) rows, computed without unfolding a convolution's input where :func:`conv_input_product`
        applies, and without forming its rows when ``A`` is not recorded and no mask applies."""
        if self.max_examples is not None:
            inputs = inputs[: self.max_examples]
            row_mask = None if row_mask is None else row_mask[: self.max_examples]
        name = layer.name
        if layer.kind == "conv2d":  # never masked (masked_rows leaves convolutions alone)
            product = None
            if self.recorded[name][0]:
                product = conv_input_product(layer.module, inputs, layer.has_bias, self.dtypes[name][0])
                if product is None:
                    self.stage_activations(name, layer.activation_rows(inputs))
                    return
                self._stage(name, "A_sum", product)
            self._stage(name, "A_count", _row_count(layer, inputs))
            return
        rows = layer.activation_rows(inputs)
        count = None
        if row_mask is not None:
            rows, count = layer.masked_rows(inputs, rows, row_mask)
        self.stage_activations(name, rows, count)

    def stage_gradients(self, name: str, rows: Tensor, scale: Tensor | float = 1.0) -> None:
        """Stage per-example output-gradient rows ``(B, R, out)``, multiplied by ``scale`` first (a number, or a
        scalar tensor on the rows' device, e.g. a GradScaler's scale, read without a host synchronisation)."""
        if self.max_examples is not None:
            rows = rows[: self.max_examples]
        if self.recorded[name][1]:
            self._stage(name, "S_sum", outer_product(rows, self.dtypes[name][1]), scale * scale)
        self._stage(name, "S_count", rows.shape[0])

    def commit(self, keep_step: bool = False) -> None:
        """Add the staged step to the sums if all of it is finite; else add nothing and count the step.
        With ``keep_step`` the step stays readable through :meth:`last_step` until the next commit.

        The check runs on the device without a host synchronization (``last_step_finite`` and
        ``skipped_steps`` are device tensors). It reads only the diagonals: an outer product ``Σ x xᵀ``
        has a NaN/Inf entry only if its diagonal has one (``|Σ x_i y_i|² ≤ Σ x_i² Σ y_i²``). Counts known
        on the host (row numbers) reach the device as one float64 tensor per step, not one per layer.
        """
        staged, self._staged = self._staged, {}
        self._zero = False
        diagonals = [
            value.diagonal().sum() if value.dim() == 2 else value.sum()  # an embedding's A is its diagonal
            for parts in staged.values()
            for key, terms in parts.items()
            if key.endswith("_sum")
            for value, _ in terms
        ]
        if diagonals:
            finite = torch.stack(diagonals).isfinite().all().to(self.device)
        else:
            finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._last_step = staged if keep_step else {}
        host_counts: list[tuple[Tensor, int]] = []
        for name, parts in staged.items():
            for key, terms in parts.items():
                target = self.sums[name][key]
                for value, scale in terms:
                    if key.endswith("_sum"):  # in place: the staged product is ours
                        value = value.masked_fill_(~finite, 0)
                        if isinstance(scale, Tensor):
                            target.add_(value.mul_(scale.to(value.dtype)))
                        else:
                            target.add_(value, alpha=scale)
                    elif isinstance(value, Tensor):  # a masked row count, already on the device
                        target.add_(value.to(torch.float64) * finite)
                    else:
                        host_counts.append((target, value))
        if host_counts:
            counts = torch.tensor([count for _, count in host_counts], dtype=torch.float64).to(self.device) * finite
            for (target, _), count in zip(host_counts, counts):
                target.add_(count)
        self.skipped_steps += (~finite).double()
        self.last_step_finite = finite

    def last_step(self) -> dict[str, dict[str, Tensor]]:
        """The step last committed, as float64 sums per layer (for an adaptive segment policy to read)."""
        return {
            name: {key: sum(torch.as_tensor(v, dtype=torch.float64, device=self.device) * s for v, s in terms)
                   for key, terms in parts.items()}
            for name, parts in self._last_step.items()
        }  # fmt: skip

    def discard_staged(self) -> None:
        self._staged = {}

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Averaged ``(A, S)`` of layer ``name``, float64, shapes ``(a_dim, a_dim)`` (``(a_dim,)``, the diagonal,
        for an embedding) and ``(out, out)``."""
        sums = self.sums[name]
        if sums["A_count"] == 0 or sums["S_count"] == 0:
            raise ValueError(f"No statistics were accumulated for layer {name!r}.")
        return sums["A_sum"] / sums["A_count"], sums["S_sum"] / sums["S_count"]

    def flat_tensors(self) -> list[Tensor]:
        """All sums in a fixed order (for cross-process reduction and checkpointing)."""
        return [self.sums[name][key] for name in sorted(self.sums) for key in FACTORS]

    def summed(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
        """The sums ``{layer: {A_sum, A_count, S_sum, S_count}}`` on the CPU, and the skipped-step count under
        ``"__skipped__"``; with ``reduce`` (a sum across processes) summed over every process by one collective
        on a single flat tensor."""
        flat = self.flat_tensors() + [self.skipped_steps.reshape(())]
        if reduce is not None:
            sizes = [t.numel() for t in flat]
            joined = reduce(torch.cat([t.reshape(-1) for t in flat]))
            flat = [part.reshape(t.shape) for part, t in zip(joined.split(sizes), flat)]
        on_host = iter([t.cpu() for t in flat])
        result: dict[str, Any] = {name: {key: next(on_host) for key in FACTORS} for name in sorted(self.sums)}
        result["__skipped__"] = next(on_host)
        return result

    def load_flat_tensors(self, tensors: Sequence[Tensor]) -> None:
        tensors, self._zero = iter(tensors), False
        for name in sorted(self.sums):
            for key in FACTORS:
                self.sums[name][key] = next(tensors).to(device=self.device, dtype=torch.float64).clone()

    def nbytes(self) -> int:
        """Bytes held by the sums (the callback's statistics memory, besides one staged step)."""
        return sum(t.numel() * t.element_size() for t in self.flat_tensors())
