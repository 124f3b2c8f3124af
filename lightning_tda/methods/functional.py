"""Running a model on stacked copies of its parameters: what Forward-INF needs to step every query's own copy
of the model and evaluate them together (``torch.func.functional_call`` under ``vmap``), and the pytree helpers
that go with it. Nothing here knows about attribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

Params = dict[str, Tensor]


class FunctionalModel:
    """Callable stand-in for the model that runs it with the given parameters (``functional_call``),
    so a :class:`Task` (which only calls ``model(...)``) works unchanged on stacked parameters."""

    def __init__(self, model: nn.Module, fixed: Params, moving: Params) -> None:
        self.model, self.fixed, self.moving = model, fixed, moving

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, {**self.fixed, **self.moving}, args, kwargs)


def one_example(batch: Any) -> Any:
    """Give an un-batched example (as vmap hands it over) back its batch dimension of 1."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, batch)


def tensor_leaves(tree: Any) -> Iterator[Tensor]:
    """The tensors of a pytree (a batch: tensors in tuples, lists, dicts)."""
    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor))


def select_rows(batch: Any, rows: Tensor) -> Any:
    """The examples ``rows`` of a batch (every tensor leaf indexed along its first dimension)."""
    return tree_map(lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) else t, batch)


def stack_one(tree: Any) -> Any:
    """A stack of one: every tensor gains a leading dimension of 1."""
    return tree_map(lambda t: t.unsqueeze(0), tree)


def finite_rows(params: Params) -> Tensor:
    """``(P,)`` whether every parameter of each stacked set is finite."""
    return torch.stack([torch.isfinite(p.reshape(p.shape[0], -1)).all(dim=1) for p in params.values()]).all(dim=0)
