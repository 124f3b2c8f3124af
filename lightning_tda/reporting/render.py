"""How an example is shown in a report: small pluggable renderers with good defaults.

A renderer is any callable ``renderer(inputs) -> Rendered`` taking one example's model input (what
``task.inputs`` returns for a batch, indexed at one example). Every reporter shows the same
:class:`Rendered`: W&B tables use the image (``wandb.Image``) or the text, the HTML report and the
per-query figures use both, CSV/text trackers use the text.

Defaults: :class:`ImageRenderer` for image tensors (``(H, W)``, ``(C, H, W)``, or flat vectors with
a ``shape``), :class:`TextRenderer` for token ids (with a tokenizer's ``decode`` or a vocabulary),
:class:`TabularRenderer` for feature rows. :class:`AutoRenderer` picks one from the tensor's shape
and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass
class Rendered:
    """One example as the reports show it.

    Attributes:
        text: a short description (the only thing CSV and text trackers get).
        image: ``(H, W)`` or ``(H, W, 3)`` uint8 pixels, or ``None`` for non-image data.
    """

    text: str
    image: np.ndarray | None = None


class Renderer(Protocol):
    def __call__(self, inputs: Any) -> Rendered: ...


def _as_array(inputs: Any) -> np.ndarray:
    if isinstance(inputs, Tensor):
        return inputs.detach().cpu().float().numpy() if inputs.is_floating_point() else inputs.detach().cpu().numpy()
    return np.asarray(inputs)


class ImageRenderer:
    """Image tensors as uint8 pixels, scaled per image to the full grey (or colour) range.

    Args:
        shape: reshape flat inputs to this ``(H, W)`` or ``(C, H, W)`` first (e.g. ``[8, 8]`` for
            the digits MLP, which sees 64 pixels as a vector).
        min_size: enlarge small images (nearest neighbour) so the shorter side has at least this
            many pixels; tiny images stay sharp in browsers and W&B.
        invert: draw high values dark (ink on paper), as digits are usually shown.
    """

    def __init__(self, shape: Sequence[int] | None = None, min_size: int = 64, invert: bool = True) -> None:
        self.shape = tuple(shape) if shape is not None else None
        self.min_size = min_size
        self.invert = invert

    def __call__(self, inputs: Any) -> Rendered:
        array = _as_array(inputs).astype(np.float64)
        if self.shape is not None:
            if array.size != math.prod(self.shape):
                raise ValueError(
                    f"ImageRenderer(shape={list(self.shape)}) cannot reshape an input of {array.size} values; "
                    f"give the shape of one example."
                )
            array = array.reshape(self.shape)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise ValueError(
                f"ImageRenderer got an input of shape {array.shape}; pass shape=[H, W] (or [C, H, W]) for flat inputs."
            )
        low, high = np.nanmin(array), np.nanmax(array)
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        if self.invert:
            scaled = 1.0 - scaled
        pixels = np.round(scaled * 255).astype(np.uint8)
        factor = max(1, math.ceil(self.min_size / min(pixels.shape[:2])))
        if factor > 1:
            pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
        return Rendered(text=f"image {array.shape[0]}x{array.shape[1]}", image=pixels)


class TextRenderer:
    """Token ids as text.

    Args:
        tokenizer: anything with ``decode(ids) -> str`` (e.g. a Hugging Face tokenizer).
        vocabulary: alternatively, the token strings by id (joined with spaces).
        ignore_ids: ids left out (padding).
        max_chars: longer texts are cut with an ellipsis.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        vocabulary: Sequence[str] | None = None,
        ignore_ids: Sequence[int] = (),
        max_chars: int = 300,
    ) -> None:
        if tokenizer is not None and not hasattr(tokenizer, "decode"):
            raise ValueError(f"TextRenderer(tokenizer=...) needs an object with decode(ids); got {type(tokenizer)}.")
        self.tokenizer = tokenizer
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.ignore_ids = set(int(i) for i in ignore_ids)
        self.max_chars = max_chars

    def __call__(self, inputs: Any) -> Rendered:
        ids = [int(i) for i in _as_array(inputs).reshape(-1) if int(i) not in self.ignore_ids]
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids)
        elif self.vocabulary is not None:
            text = " ".join(self.vocabulary[i] if 0 <= i < len(self.vocabulary) else f"<{i}>" for i in ids)
        else:
            text = "ids " + " ".join(str(i) for i in ids)
        if len(text) > self.max_chars:
            text = text[: self.max_chars - 1] + "…"
        return Rendered(text=text)


class TabularRenderer:
    """A feature row as ``name=value`` pairs.

    Args:
        feature_names: names of the columns (default ``x0, x1, ...``).
        max_features: show at most this many features (the first ones).
        precision: significant digits.
    """

    def __init__(self, feature_names: Sequence[str] | None = None, max_features: int = 12, precision: int = 3) -> None:
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.max_features = max_features
        self.precision = precision

    def __call__(self, inputs: Any) -> Rendered:
        values = _as_array(inputs).reshape(-1)
        names = self.feature_names or [f"x{i}" for i in range(len(values))]
        if len(names) != len(values):
            raise ValueError(
                f"TabularRenderer has {len(names)} feature names for rows of {len(values)} values; "
                f"give one name per feature."
            )
        shown = [f"{name}={value:.{self.precision}g}" for name, value in zip(names, values)][: self.max_features]
        if len(values) > self.max_features:
            shown.append(f"… ({len(values) - self.max_features} more)")
        return Rendered(text=", ".join(shown))


class AutoRenderer:
    """Choose by the input: integer vectors are token ids, 2-D arrays (or ``(C, H, W)`` with
    ``C`` of 1 or 3) are images, anything else is a feature row.

    Args:
        tokenizer: decodes token ids (anything with ``decode``, e.g. a Hugging Face tokenizer or a data
            module's ``tokenizer``); without one, token ids are shown as ``ids 12 5 7 ...``.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.image = ImageRenderer()
        self.text = TextRenderer(tokenizer=tokenizer)
        self.tabular = TabularRenderer()

    def __call__(self, inputs: Any) -> Rendered:
        array = inputs if isinstance(inputs, Tensor) else torch.as_tensor(np.asarray(inputs))
        if not array.is_floating_point() and array.dim() == 1:
            return self.text(array)
        if array.dim() == 2 or (array.dim() == 3 and array.shape[0] in (1, 3)):
            return self.image(array)
        return self.tabular(array)
