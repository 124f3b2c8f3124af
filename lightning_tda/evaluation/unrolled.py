"""Exact unrolled differentiation through a traced training run: the reference no approximation touches.

SOURCE, TracInCP and influence functions all approximate one quantity of a training run: how the
query measurement at the end of training, ``f(q, θ_T)``, depends on each training example. This
module computes it exactly for a small model. Every training example ``i`` gets a weight ``ε_i`` on
its loss in every step it appears in (the step's loss is ``(1/B) Σ_{i∈batch} ε_i ℓ_i(θ)``), the run
is replayed step by step in float64 from the trace's initial state with the trace's learning rates
and the same batches, and ``d f(q, θ_T)/dε_i`` at ``ε = 1`` is taken by reverse-mode autograd
through every optimizer step (optionally in chunks of steps, recomputing each chunk's graph, so
memory holds one chunk). The scores follow the library's convention (the predicted change of the
query's measurement when the example is removed, ``ε_i: 1 → 0`` to first order; positive = helped)::

    τ_exact(q, i) = −d f(q, θ_T) / d ε_i

This is the quantity SOURCE estimates for one trajectory (its expectation over batch orders); the
LDS ground truth additionally averages over re-training seeds and removes half of the data at once.

How the batch order of a Lightning run is obtained: the run is **replayed**, not re-sampled. Pass the
index batches of every optimizer step, or the training ``DataLoader`` itself, freshly built exactly
as for the traced fit (same dataset, batch size and seeded generator); :func:`replay_batches`
iterates it epoch after epoch the way the fit loop did and reads off the example indices. The
replay then checks itself against the trace: each step's batch size and loss against the step log,
and the final parameters against the final checkpoint (:class:`ReplayCheck`); a mismatch raises an
error naming the step, because a reference that replays a different run is worse than none.

Supported: one optimizer param group; ``torch.optim.SGD`` (plain, momentum, Nesterov, dampening,
weight decay) and ``Adam``/``AdamW`` (weight decay; not ``amsgrad``), with the learning rate of every
step read from the trace (so any scheduler is covered); deterministic training forward passes
(no dropout); one process, no gradient accumulation, no gradient clipping. Cost: one replay without
a graph, then one with a graph per chunk, plus a batched backward pass per chunk for all queries
(``(Q, parameters)`` float64 adjoints): seconds for a few hundred steps of a 26k-parameter MLP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_tda.batches import Data, as_loader, move_to, progress_bar
from lightning_tda.methods.base import optimizer_name
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.trace.reader import Trace

MEMBERSHIPS = ("batches", "expected")
_CHUNK = 512  # examples per forward-mode pass over the whole training set
SUPPORTED_TEXT = "SGD (plain, momentum, Nesterov, dampening, weight decay), Adam and AdamW (not amsgrad)"


class _IndexDataset(Dataset):
    """Yields its own indices: the same sampler over it gives the batches' example indices."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def replay_batches(loader: DataLoader, num_steps: int) -> list[Tensor]:
    """The example indices of the first ``num_steps`` batches ``loader`` yields, epoch after epoch.

    ``loader`` must be built exactly as the traced fit built it (same dataset, batch size, sampler and
    seeded generator) and not iterated yet: it is iterated here the way Lightning's fit loop iterates
    it (``iter(loader)`` once per epoch, which also draws the worker base seed from the generator, then
    exactly ``len(loader)`` batches), so its random state is consumed. A plain ``for batch in loader``
    loop differs when the last batch is full: it runs the sampler to exhaustion, which draws one more
    permutation; pass such a run's index batches explicitly. Indices of a ``Subset`` are mapped to the
    underlying dataset's.

    Returns:
        ``num_steps`` int64 tensors of dataset indices, one per optimizer step.
    """
    if num_steps < 1:
        raise ValueError(f"replay_batches(num_steps={num_steps}): replay at least one step.")
    if loader.batch_sampler is None:
        raise ValueError("replay_batches needs a DataLoader that batches (batch_size or batch_sampler set).")
    dataset = loader.dataset
    mapping = None
    if isinstance(dataset, Subset):
        mapping = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
    twin = DataLoader(_IndexDataset(len(dataset)), batch_sampler=loader.batch_sampler, generator=loader.generator)
    per_epoch = len(twin)
    if per_epoch == 0:
        raise ValueError("replay_batches: the loader yields no batches; pass the training DataLoader.")
    batches: list[Tensor] = []
    while len(batches) < num_steps:
        # Lightning's fit loop takes len(loader) batches and never asks for one more: a sampler whose last
        # batch is full is not run to exhaustion (which would draw one more permutation from the generator).
        for position, indices in enumerate(twin):
            batch = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
            batches.append(mapping[batch] if mapping is not None else batch)
            if len(batches) == num_steps or position + 1 == per_epoch:
                break
    return batches


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of the traced run as the replay applies it (read from the trace)."""

    name: str  # "SGD", "Adam" or "AdamW"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def from_trace(cls, trace: Trace) -> OptimizerSpec:
        name = optimizer_name(trace)
        groups = trace.optimizer.get("param_groups", [])
        if name not in ("SGD", "Adam", "AdamW"):
            raise ValueError(f"The unrolled reference replays {SUPPORTED_TEXT}; the trace {trace.path} used {name}.")
        if len(groups) != 1:
            raise ValueError(
                f"The unrolled reference replays one optimizer param group; the trace {trace.path} has {len(groups)}."
            )
        group = groups[0]
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError(f"The unrolled reference does not replay maximize/amsgrad ({SUPPORTED_TEXT}).")
        if name == "SGD":
            return cls(
                name,
                momentum=float(group.get("momentum", 0.0) or 0.0),
                dampening=float(group.get("dampening", 0.0) or 0.0),
                nesterov=bool(group.get("nesterov", False)),
                weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
            )
        betas = tuple(float(b) for b in group.get("betas", (0.9, 0.999)))
        return cls(
            name, weight_decay=float(group.get("weight_decay", 0.0) or 0.0), betas=betas, eps=float(group["eps"])
        )

    @property
    def state_names(self) -> tuple[str, ...]:
        """Per-parameter optimizer state carried between steps."""
        if self.name == "SGD":
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")

    def step(
        self, params: list[Tensor], grads: Sequence[Tensor], state: dict[str, list[Tensor]], lr: float, step: int
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """One functional update ``(params, state) -> (params, state)``, as ``torch.optim`` computes it.

        ``step`` counts from 1; an empty ``state`` means the optimizer has no state yet (first step).
        """
        if self.name == "SGD":
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)] if self.weight_decay else list(grads)
            if not self.momentum:
                return [p - lr * g for p, g in zip(params, grads)], {}
            if state:
                buffers = [
                    self.momentum * b + (1 - self.dampening) * g for b, g in zip(state["momentum_buffer"], grads)
                ]
            else:  # torch starts the buffer at the first gradient, without dampening
                buffers = list(grads)
            directions = [g + self.momentum * b for g, b in zip(grads, buffers)] if self.nesterov else buffers
            return [p - lr * d for p, d in zip(params, directions)], {"momentum_buffer": buffers}
        beta1, beta2 = self.betas
        if self.name == "AdamW":
            params = [p * (1 - lr * self.weight_decay) for p in params]
        elif self.weight_decay:
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)]
        exp_avg = state.get("exp_avg") or [torch.zeros_like(p) for p in params]
        exp_avg_sq = state.get("exp_avg_sq") or [torch.zeros_like(p) for p in params]
        exp_avg = [beta1 * m + (1 - beta1) * g for m, g in zip(exp_avg, grads)]
        exp_avg_sq = [beta2 * v + (1 - beta2) * g * g for v, g in zip(exp_avg_sq, grads)]
        step_size = lr / (1 - beta1**step)
        root_correction = math.sqrt(1 - beta2**step)
        params = [
            p - step_size * m / (_safe_sqrt(v) / root_correction + self.eps)
            for p, m, v in zip(params, exp_avg, exp_avg_sq)
        ]
        return params, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _safe_sqrt(v: Tensor) -> Tensor:
    """``√v`` whose derivative at ``v = 0`` (a parameter that never had a gradient) is 0, not inf·0 = NaN."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


class _LossModule(nn.Module):
    """``task.train_loss`` of a batch as a module, so ``functional_call`` can swap all of its parameters."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any, measure: bool = False) -> Tensor:
        return self.task.measurement(self.model, batch) if measure else self.task.train_loss(self.model, batch)


@dataclass
class ReplayCheck:
    """How well the float64 replay reproduces the traced run.

    Attributes:
        max_loss_error: largest relative difference between a replayed step loss and the step log's.
        worst_step: the step (1-based) where it occurs.
        parameter_error: ``‖θ_replay − θ_trace‖ / ‖θ_trace‖`` at the final checkpoint.
    """

    max_loss_error: float
    worst_step: int
    parameter_error: float

    def __str__(self) -> str:
        return (
            f"step losses within {self.max_loss_error:.1e} (relative, worst at step {self.worst_step}); "
            f"final parameters within {self.parameter_error:.1e}"
        )


class UnrolledTraining:
    """A traced training run replayed in float64, differentiable with respect to per-example loss weights.

    Args:
        trace: the trace of the run (initial state, per-step learning rates, optimizer, step log).
        model: an instance of the trained architecture (copied; the copy is moved to float64).
        task: the task whose ``train_loss`` the run minimised (batch mean) and whose ``measurement``
            the queries are judged by.
        train: the training set the batch indices refer to (map-style dataset or tensors).
        batches: the example indices of every optimizer step (``(B_k,)`` int64 each), or a fresh
            training ``DataLoader`` built as for the traced fit (see :func:`replay_batches`).
        device: where to compute (default: the model's device).
        progress: show progress bars (default: when stderr is a terminal).

    Raises ``ValueError`` for what the replay does not support (see the module docstring) and when
    the number of batches differs from the trace's number of steps.
    """

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        train: Data,
        batches: Sequence[Tensor] | DataLoader,
        *,
        membership: str = "batches",
        device: str | torch.device | None = None,
        progress: bool | None = None,
    ) -> None:
        if int(trace.meta.get("world_size", 1)) != 1 or int(trace.meta.get("accumulate_grad_batches", 1)) != 1:
            raise ValueError(
                f"The unrolled reference replays one-process runs without gradient accumulation; the trace "
                f"{trace.path} has world_size={trace.meta.get('world_size')}, "
                f"accumulate_grad_batches={trace.meta.get('accumulate_grad_batches')}."
            )
        self.trace = trace
        self.task = task
        self.spec = OptimizerSpec.from_trace(trace)
        self.progress = progress
        self.dataset = as_loader(train, 1, "train").dataset
        self.n_train = len(self.dataset)
        steps = trace.steps()
        if isinstance(batches, DataLoader):
            batches = replay_batches(batches, len(steps))
        self.batches = [torch.as_tensor(b, dtype=torch.int64).reshape(-1) for b in batches]
        if len(self.batches) != len(steps):
            raise ValueError(
                f"{len(self.batches)} batches given, but the trace {trace.path} recorded {len(steps)} optimizer "
                f"steps. Pass one index batch per step (or the training DataLoader)."
            )
        for k, (batch, size) in enumerate(zip(self.batches, steps.batch_size), start=1):
            if len(batch) != int(size) or (len(batch) and (batch.min() < 0 or batch.max() >= self.n_train)):
                raise ValueError(
                    f"Batch of step {k} has {len(batch)} indices (range [{int(batch.min())}, {int(batch.max())}]), "
                    f"but the trace recorded {int(size)} examples at that step and the training set has "
                    f"{self.n_train}. The batches do not follow the traced run."
                )
        self.lrs = [float(lr) for lr in steps.lr[:, 0]]
        self.recorded_losses = torch.as_tensor(steps.loss, dtype=torch.float64)
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
        self.module = _LossModule(_float64_copy(model), task).to(self.device)
        self.module.model.load_state_dict(
            {k: v.double() if v.is_floating_point() else v for k, v in trace.initial_state().items()}
        )
        self.module.train()  # the fit loop runs training_step in train mode
        self.names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for name, p in self.module.named_parameters() if p.requires_grad]
        self.buffers = {name: b for name, b in self.module.named_buffers()}
        if membership not in MEMBERSHIPS:
            raise ValueError(f"membership={membership!r}: use one of {', '.join(map(repr, MEMBERSHIPS))}.")
        self.membership = membership
        self._all: Any = None

    # --- the replay -----------------------------------------------------------------------------
    def _batch(self, k: int) -> Any:
        indices = self.batches[k]
        items = [self.dataset[int(i)] for i in indices]
        batch = torch.utils.data.default_collate(items)
        return _to_float64(move_to(batch, self.device))

    def _everything(self) -> Any:
        if self._all is None:
            items = [self.dataset[i] for i in range(self.n_train)]
            self._all = _to_float64(move_to(torch.utils.data.default_collate(items), self.device))
        return self._all

    def _losses(self, params: Sequence[Tensor], batch: Any, measure: bool = False) -> Tensor:
        values = {**dict(zip(self.names, params)), **self.buffers}
        return torch.func.functional_call(self.module, values, (batch,), {"measure": measure})

    def _step(
        self, k: int, params: list[Tensor], state: dict[str, list[Tensor]], weights: Tensor
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], Tensor]:
        """Optimizer step ``k`` (0-based, no graph kept) with per-example loss weights ``(N,)``; also the batch loss."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            losses = self._losses(leaves, self._batch(k))
            if self.membership == "batches":
                loss = (weights[self.batches[k]] * losses).mean()
            else:
                loss = losses.mean()
                if not bool((weights == 1).all()):  # (1/N) Σ_i (ε_i − 1) ℓ_i(θ): every example in every step
                    loss = loss + ((weights - 1) * self._losses(leaves, self._everything())).sum() / self.n_train
            grads = torch.autograd.grad(loss, leaves)
        params, state = self.spec.step([p.detach() for p in leaves], grads, state, self.lrs[k], k + 1)
        return params, state, loss.detach()

    def _replay(
        self, weights: Tensor, start: int, end: int, params: list[Tensor], state: dict[str, list[Tensor]], keep: int
    ) -> tuple[list, list[Tensor], dict[str, list[Tensor]], Tensor]:
        """Steps ``start..end−1`` from ``(params, state)``; returns the ``(step, params, state)`` before every
        ``keep``-th step, the parameters and state after ``end − 1``, and the batch losses."""
        kept, losses = [], []
        steps = range(start, end)
        for k in progress_bar(steps, self.progress and end - start > 1, "unrolled replay", len(steps)):
            if (k - start) % keep == 0:
                kept.append((k, params, state))
            params, state, loss = self._step(k, params, state, weights)
            losses.append(loss)
        return kept, params, state, torch.stack(losses)

    def _forward(self, weights: Tensor, keep_every: int | None = None) -> tuple[list, list[Tensor], Tensor]:
        """The whole replay without a graph: kept ``(step, params, state)``, final parameters, batch losses."""
        total = len(self.batches)
        kept, params, _, losses = self._replay(weights, 0, total, list(self.initial), {}, keep_every or total + 1)
        return kept, params, losses

    def train(self, weights: Tensor | None = None) -> dict[str, Tensor]:
        """Re-train (replay) with per-example loss weights ``(N,)`` (default all 1); the final parameters."""
        weights = self._weights(weights)
        _, params, _ = self._forward(weights)
        return dict(zip(self.names, params))

    def check(self) -> ReplayCheck:
        """Compare the replay (all weights 1) with the trace's step log and final checkpoint."""
        _, params, losses = self._forward(self._weights(None))
        recorded = self.recorded_losses.to(losses.device)
        finite = torch.isfinite(recorded)
        errors = torch.where(finite, (losses - recorded).abs() / recorded.abs().clamp(min=1e-12), 0.0)
        worst = int(errors.argmax())
        final = self.trace.checkpoint_state(self.trace.final_checkpoint.index)
        ours = torch.cat([p.flatten() for p in params])
        theirs = torch.cat(
            [final[name.removeprefix("model.")].double().flatten().to(ours.device) for name in self.names]
        )
        parameter_error = float((ours - theirs).norm() / theirs.norm().clamp(min=1e-300))
        return ReplayCheck(float(errors[worst]), worst + 1, parameter_error)

    def _weights(self, weights: Tensor | None) -> Tensor:
        if weights is None:
            return torch.ones(self.n_train, dtype=torch.float64, device=self.device)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=self.device)
        if weights.shape != (self.n_train,):
            raise ValueError(
                f"weights of shape {tuple(weights.shape)}: give one weight per training example ({self.n_train},)."
            )
        return weights

    # --- the derivative -------------------------------------------------------------------------
    def query_gradients(self, params: Sequence[Tensor], queries: Data) -> list[Tensor]:
        """``∇θ f(q, θ)`` of every query, one ``(Q, *shape)`` float64 tensor per parameter."""
        rows: list[list[Tensor]] = []
        for batch in as_loader(queries, 64, "query"):
            batch = _to_float64(move_to(batch, self.device))
            for q in range(self.task.batch_size(batch)):
                single = _slice_batch(batch, q, q + 1)
                leaves = [p.detach().requires_grad_(True) for p in params]
                with torch.enable_grad():
                    value = self._losses(leaves, single, measure=True).sum()
                    rows.append(list(torch.autograd.grad(value, leaves, allow_unused=True)))
        return [
            torch.stack([r[j] if r[j] is not None else torch.zeros_like(params[j]) for r in rows])
            for j in range(len(params))
        ]

    def derivatives(self, queries: Data, chunk_steps: int | None = None) -> Tensor:
        """``d f(q, θ_T) / d ε_i`` for every query and training example: ``(Q, N)`` float64.

        Reverse mode, one optimizer step at a time: the adjoint ``(λ_θ, λ_state)`` of every query (``(Q, ...)``)
        is pulled back through the optimizer update, which gives the adjoint ``μ_k`` of the step's loss
        gradient, and then through the gradient itself (a Hessian-vector product with ``μ_k``). Example
        ``i`` enters step ``k`` through its loss gradient only, so its share is the directional derivative
        ``⟨μ_k, ∇ℓ_i(θ_k)⟩ / B_k`` (``/ N`` for every example with ``membership="expected"``), one forward-mode
        pass per query. States are kept every ``chunk_steps`` steps (default: every step) and the steps in
        between are replayed again, so memory holds one chunk of states.
        """
        total = len(self.batches)
        chunk = total if chunk_steps is None else int(chunk_steps)
        if chunk < 1:
            raise ValueError(f"chunk_steps={chunk_steps}: use a positive number of steps (or None for all).")
        ones = self._weights(None)
        kept, final, _ = self._forward(ones, keep_every=chunk)
        adjoint = self.query_gradients(final, queries)
        adjoint_state: dict[str, list[Tensor]] = {}
        result = torch.zeros(adjoint[0].shape[0], self.n_train, dtype=torch.float64, device=self.device)
        for start, params, state in progress_bar(kept[::-1], self.progress, "unrolled backward", len(kept)):
            states, *_ = self._replay(ones, start, min(start + chunk, total), params, state, 1)
            for k, params_k, state_k in reversed(states):
                adjoint, adjoint_state, mu = self._pull_back(k, params_k, state_k, adjoint, adjoint_state)
                self._add_example_shares(result, k, params_k, mu)
        return result

    def _pull_back(
        self,
        k: int,
        params: list[Tensor],
        state: dict[str, list[Tensor]],
        adjoint: list[Tensor],
        adjoint_state: dict[str, list[Tensor]],
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], list[Tensor]]:
        """Adjoints before step ``k`` from those after it, and ``μ_k``, the adjoint of the step's loss gradient."""
        leaves = [p.clone().requires_grad_(True) for p in params]
        state_leaves = {n: [t.clone().requires_grad_(True) for t in v] for n, v in state.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(self._losses(leaves, self._batch(k)).mean(), leaves, create_graph=True)
            gradient_leaves = [g.detach().requires_grad_(True) for g in grads]
            new_params, new_state = self.spec.step(leaves, gradient_leaves, state_leaves, self.lrs[k], k + 1)
            outputs, grad_outputs = list(new_params), list(adjoint)
            for name, tensors in new_state.items():
                if name in adjoint_state:
                    outputs += tensors
                    grad_outputs += adjoint_state[name]
            order = [(name, len(v)) for name, v in state_leaves.items()]
            inputs = leaves + [t for name, _ in order for t in state_leaves[name]] + gradient_leaves
            pulled = _batched_grad(outputs, inputs, grad_outputs)
            mu = pulled[len(inputs) - len(gradient_leaves) :]
            through_gradient = _batched_grad(list(grads), leaves, mu)  # Hessian-vector products H_k μ_k
        direct = pulled[: len(leaves)]
        position = len(leaves)
        new_adjoint_state = {}
        for name, count in order:
            new_adjoint_state[name] = pulled[position : position + count]
            position += count
        return [a + b for a, b in zip(direct, through_gradient)], new_adjoint_state, mu

    def _add_example_shares(self, result: Tensor, k: int, params: list[Tensor], mu: list[Tensor]) -> None:
        """``result[:, i] += ⟨μ_k, ∇ℓ_i(θ_k)⟩ / B_k`` over the batch (or ``/ N`` over every example)."""
        if self.membership == "batches":
            indices = self.batches[k].to(self.device)
            result.index_add_(1, indices, self._directional(params, self._batch(k), mu) / len(indices))
            return
        everything = self._everything()
        for start in range(0, self.n_train, _CHUNK):
            part = _slice_batch(everything, start, start + _CHUNK)
            result[:, start : start + _CHUNK] += self._directional(params, part, mu) / self.n_train

    def _directional(self, params: list[Tensor], batch: Any, directions: list[Tensor]) -> Tensor:
        """``⟨d_q, ∇ℓ_b(θ)⟩`` for every direction ``q`` and example ``b`` of ``batch``: ``(Q, B)`` (forward mode)."""
        primals = tuple(p.detach() for p in params)

        def along(*tangent: Tensor) -> Tensor:
            return torch.func.jvp(lambda *p: self._losses(p, batch), primals, tangent)[1]

        try:
            return torch.func.vmap(along)(*directions)
        except RuntimeError:  # an operation without a batching rule: one pass per direction
            return torch.stack([along(*[d[q] for d in directions]) for q in range(directions[0].shape[0])])

    def scores(self, queries: Data, chunk_steps: int | None = None) -> Scores:
        """``τ(q, i) = −d f(q, θ_T)/d ε_i`` as :class:`~lightning_tda.scores.Scores` ``(Q, N)``: the first-order
        change of the query's measurement when example ``i`` is removed; positive = helped."""
        values = -self.derivatives(queries, chunk_steps)
        config = {"optimizer": self.spec.name, "steps": len(self.batches), "chunk_steps": chunk_steps}
        return Scores(values.float().cpu(), torch.arange(self.n_train), torch.arange(len(values)), "unrolled", config)


def unrolled_scores(
    trace: Trace,
    model: nn.Module,
    task: Task,
    queries: Data,
    train: Data,
    batches: Sequence[Tensor] | DataLoader,
    *,
    chunk_steps: int | None = None,
    tolerance: float = 1e-3,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Scores:
    """Exact unrolled scores ``(Q, N)`` of a traced run (see the module docstring), after checking the replay.

    Args:
        trace, model, task, train, batches, device, progress: see :class:`UnrolledTraining`.
        queries: the query set.
        chunk_steps: optimizer steps per recomputed graph chunk (default: the whole run at once).
        tolerance: largest relative error of the replay's step losses and final parameters against the
            trace (float32 training against a float64 replay drifts by ~1e-6 per hundred steps).

    Raises:
        ValueError: the replay does not reproduce the traced run (wrong batch order, seed, clipping...).
    """
    replay = UnrolledTraining(trace, model, task, train, batches, device=device, progress=progress)
    check = replay.check()
    if check.max_loss_error > tolerance or check.parameter_error > tolerance:
        raise ValueError(
            f"The float64 replay does not reproduce the traced run ({check}; tolerance {tolerance:g}). The batches "
            f"must be the traced fit's, in its order (build the DataLoader exactly as for the fit, with the same "
            f"seeded generator), and the run must be one the replay supports ({SUPPORTED_TEXT}; no dropout, "
            f"gradient clipping or accumulation)."
        )
    return replay.scores(queries, chunk_steps)


# ------------------------------------------------------------------------------ helpers


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def _to_float64(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_float64(b) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_float64(v) for k, v in batch.items()}
    return batch


def _slice_batch(batch: Any, start: int, end: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:end]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(b, start, end) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _slice_batch(v, start, end) for k, v in batch.items()}
    return batch


def _batched_grad(outputs: list[Tensor], inputs: list[Tensor], grad_outputs: list[Tensor]) -> list[Tensor]:
    """``Σ_o ⟨grad_output[q], o⟩`` differentiated w.r.t. ``inputs`` for every query ``q`` (leading dim)."""
    try:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:  # an operation without a batching rule: one backward pass per query
        n = grad_outputs[0].shape[0]
        per_query = [
            torch.autograd.grad(outputs, inputs, [g[q] for g in grad_outputs], retain_graph=True, allow_unused=True)
            for q in range(n)
        ]
        grads = tuple(
            None if per_query[0][j] is None else torch.stack([p[j] for p in per_query]) for j in range(len(inputs))
        )
    n = grad_outputs[0].shape[0]
    return [torch.zeros(n, *x.shape, dtype=x.dtype, device=x.device) if g is None else g for g, x in zip(grads, inputs)]


__all__ = ["OptimizerSpec", "ReplayCheck", "UnrolledTraining", "replay_batches", "unrolled_scores"]
