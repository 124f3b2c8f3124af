"""Forward-INF (Ko et al., "The Mirrored Influence Hypothesis"): influence from forward passes.

Instead of a gradient for every training example, Forward-INF trains the final model a little on
the *query* and watches how every training example's loss moves (Algorithm 1 of the paper)::

    θ_0 = θ̂;  θ_j = θ_{j-1} + α ∇θ L(θ_{j-1}, D_tst)   for j = 1..K     (gradient ascent)
    score(z_i) = ℓ(z_i, θ_K) − ℓ(z_i, θ̂)                                (two forward passes)

A training example whose loss rises most under ascent on the query is the most aligned with it,
i.e. the most helpful: a positive score, the library's convention. To first order the score is
``K·α·⟨∇ℓ(z_i), ∇f(z_q)⟩``, a one-checkpoint TracIn (eq. 8 of the paper). With
``direction="descent"`` the parameters move down the query loss and the difference is negated,
so positive still means helpful.

Backward passes touch only the queries (K per query). The training set is read with forward
passes only: once under θ̂ (shared by all queries) and once per *query batch*, evaluating each
training batch under the ``query_batch_size`` updated parameter sets at once with
``torch.func.functional_call`` + ``vmap``.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Subset

from lightning_tda.batches import Data, as_loader, batches_with_ids, move_to, progress_bar
from lightning_tda.methods.base import AttributionMethod, MethodOptions
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.trace import Trace

log = logging.getLogger(__name__)

Params = dict[str, Tensor]


class _Functional:
    """Callable stand-in for the model that runs it with the given parameters (``functional_call``),
    so a :class:`Task` (which only calls ``model(...)``) works unchanged on stacked parameters."""

    def __init__(self, model: nn.Module, fixed: Params, moving: Params) -> None:
        self.model, self.fixed, self.moving = model, fixed, moving

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, {**self.fixed, **self.moving}, args, kwargs)


def _one_example(batch: Any) -> Any:
    """Give an un-batched example (as vmap hands it over) back its batch dimension of 1."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, batch)


@dataclass
class TuneResult:
    """What :meth:`ForwardINF.tune` found.

    Attributes:
        steps: chosen number of steps K.
        lr: chosen step size α.
        top1: ``{(K, α): fraction of planted duplicates ranked first for themselves}``.
        top5: the same for "ranked in the top 5".
        diverged: candidates whose steps turned the loss or parameters NaN/inf (not ranked).
        planted: training-set ids used as planted queries.
    """

    steps: int
    lr: float
    top1: dict[tuple[int, float], float] = field(default_factory=dict)
    top5: dict[tuple[int, float], float] = field(default_factory=dict)
    diverged: list[tuple[int, float]] = field(default_factory=list)
    planted: list[int] = field(default_factory=list)

    def table(self) -> str:
        """The per-candidate rates as aligned text (what is logged)."""
        lines = ["     K        alpha   top-1   top-5"]
        for (k, a), rate in sorted(self.top1.items()):
            mark = "  <- chosen" if (k, a) == (self.steps, self.lr) else ""
            lines.append(f"{k:6d} {a:12.4g} {rate:7.3f} {self.top5[(k, a)]:7.3f}{mark}")
        lines += [f"{k:6d} {a:12.4g}  diverged" for k, a in self.diverged]
        return "\n".join(lines)


class ForwardINF(AttributionMethod):
    """Forward-INF attribution: K steps on the query from the final checkpoint, then forward passes.

    Args:
        trace: the recorded trace; the model starts from its final checkpoint.
        model: an instance of the trained architecture (put in eval mode).
        task: per-example training losses (``task.train_loss``) and query measurements
            (``task.measurement``; the loss by default). The query objective is their mean.
        steps: K, the number of gradient steps on the query (> 0).
        lr: α, the step size (> 0). Default: the learning rate of the last recorded optimizer step
            (the largest over parameter groups), i.e. how fast the model was still learning when
            training stopped; if that is 0 (a schedule that decays to 0), the final segment's mean
            learning rate. :meth:`tune` picks K and α without labels.
        direction: ``"ascent"`` (the paper's default: larger, better separated loss changes) or
            ``"descent"``; both give positive = helpful.
        modules: which parameters move: fnmatch patterns on module or parameter names (e.g.
            ``["net.4"]`` or ``["*.bias"]``). Default: the parameters of ``options.layers`` if given,
            otherwise every trainable parameter. The rest stay at θ̂.
        normalize: step along the unit gradient (``θ ± α·g/‖g‖``, not in the paper) so every query
            moves the same distance α per step. A well-fit query has a tiny loss gradient and
            under the plain rule barely moves; normalized steps reach the nonlinear regime for all
            queries alike and do not run away (see BENCHMARKS.md for the effect on leakage detection).
        vectorize: evaluate the parameter sets of a query batch together with ``torch.func.vmap``.
            Models vmap cannot run (``.item()`` in ``forward``, in-place buffer updates) fall back
            to a loop over the parameter sets automatically, with a warning; ``False`` forces it.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.

    Memory: a query batch holds ``query_batch_size`` copies of the moving parameters plus the same
    again for their gradients while stepping, and a training batch runs ``query_batch_size``
    forward passes at once, so activations take ``query_batch_size × batch_size`` rows. Lower
    ``query_batch_size`` (or move fewer ``modules``) to bound it; results do not depend on it.

    Cost: ``K`` forward+backward passes per query, plus ``ceil(Q / query_batch_size) + 1``
    forward reads of the training set. Positive score = the training example helped the query.
    """

    name = "forward-inf"

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        steps: int = 5,
        lr: float | None = None,
        direction: str = "ascent",
        modules: Sequence[str] | None = None,
        normalize: bool = False,
        vectorize: bool = True,
        options: MethodOptions | None = None,
    ) -> None:
        super().__init__(
            trace,
            model,
            task,
            options=options,
        )
        if direction not in ("ascent", "descent"):
            raise ValueError(f"ForwardINF(direction={direction!r}): use 'ascent' or 'descent'.")
        self.direction = direction
        self.sign = 1.0 if direction == "ascent" else -1.0
        self.modules = list(modules) if modules is not None else None
        self.normalize = normalize
        self.vectorize = vectorize
        self.checkpoint = trace.final_checkpoint.index
        self.load_checkpoint(self.checkpoint)
        self.steps = self._check_steps(steps)
        self.lr = self._check_lr(self._default_lr() if lr is None else lr)
        self.moving_names = self._select_moving()
        named = dict(self.model.named_parameters())
        self.original: Params = {n: named[n].detach() for n in self.moving_names}
        self.fixed: Params = {n: p.detach() for n, p in named.items() if n not in self.original}
        self.fixed.update({n: b.detach() for n, b in self.model.named_buffers()})

    # --- set-up ---------------------------------------------------------------------------------
    @staticmethod
    def _check_steps(steps: int) -> int:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"ForwardINF(steps={steps!r}): K must be a positive integer (e.g. steps=5).")
        return int(steps)

    @staticmethod
    def _check_lr(lr: float) -> float:
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"ForwardINF(lr={lr!r}): the step size α must be a finite number > 0 (e.g. lr=1e-2).")
        return float(lr)

    def _default_lr(self) -> float:
        """The last recorded learning rate; the final segment's mean if the schedule ended at 0."""
        lrs = self.trace.steps().lr
        last = float(np.max(lrs[-1])) if len(lrs) else 0.0
        if last > 0:
            return last
        mean = float(np.max(self.trace.segments[-1].mean_lr)) if self.trace.segments else 0.0
        if mean > 0:
            return mean
        raise ValueError(
            f"The trace {self.trace.path} records no positive learning rate to default α to; pass lr= explicitly."
        )

    def _select_moving(self) -> list[str]:
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.modules is not None:
            patterns = self.modules

            def chosen(name: str) -> bool:
                owner = name.rpartition(".")[0]
                return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(owner, p) for p in patterns)

            names = [n for n in trainable if chosen(n)]
            if not names:
                raise ValueError(
                    f"ForwardINF(modules={patterns}) matches no trainable parameter; module names are "
                    f"{sorted({n.rpartition('.')[0] for n in trainable})}."
                )
            return names
        if self.options.layers is not None:
            owned = {name for layer in self.layers for name in layer.parameter_names()}
            return [n for n in trainable if n in owned]
        if not trainable:
            raise ValueError("The model has no trainable parameters to move; Forward-INF needs some.")
        return trainable

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "steps": self.steps,
            "lr": self.lr,
            "direction": self.direction,
            "modules": self.modules,
            "normalize": self.normalize,
            "moving_parameters": len(self.moving_names),
            "checkpoint": self.checkpoint,
            "query_batch_size": self.query_batch_size,
        }

    # --- functional pieces ----------------------------------------------------------------------
    def _query_sum(self, moving: Params, batch: Any) -> tuple[Tensor, Tensor]:
        """Summed query measurement (to differentiate) and the per-example values (to check)."""
        values = self.task.measurement(_Functional(self.model, self.fixed, moving), batch)
        return values.sum(), values.detach()

    def _train_losses(self, moving: Params, batch: Any) -> Tensor:
        return self.task.train_loss(_Functional(self.model, self.fixed, moving), batch)

    def _map(self, fn: Callable[..., Any], in_dims: tuple[int | None, ...], *args: Any) -> Any:
        """``vmap(fn, in_dims)(*args)``, or the same result from a loop over the mapped dimension."""
        if self.vectorize:
            try:
                return vmap(fn, in_dims=in_dims)(*args)
            except (RuntimeError, ValueError, NotImplementedError) as err:
                warnings.warn(
                    f"Forward-INF: torch.func.vmap cannot run this model ({str(err).splitlines()[0]}); evaluating "
                    f"the parameter sets one at a time instead (same result, slower). Pass vectorize=False to "
                    f"skip the attempt.",
                    stacklevel=3,
                )
                self.vectorize = False
        mapped = [a for a, d in zip(args, in_dims) if d == 0]
        size = next(leaf.shape[0] for a in mapped for leaf in _leaves(a))
        outputs = [
            fn(*[tree_map(lambda t, i=i: t[i], a) if d == 0 else a for a, d in zip(args, in_dims)]) for i in range(size)
        ]
        return tree_map(lambda *xs: torch.stack(xs), outputs[0], *outputs[1:])

    def _step(self, params: Params, batch: Any, query_ids: Tensor) -> Params:
        """One step of every query's own parameter set on its own example."""

        def objective(p: Params, example: Any) -> Tensor:
            return self._query_sum(p, _one_example(example))[0]

        grads, values = self._map(grad_and_value(objective), (0, 0), params, batch)
        self._check_finite(values, query_ids, "query loss")
        return self._update(params, grads, query_ids)

    def _update(self, params: Params, grads: Params, query_ids: Tensor | None) -> Params:
        """``θ ± α·g`` (or ``± α·g/‖g‖`` with ``normalize``) for stacked ``(P, ...)`` parameter sets."""
        step = self.sign * self.lr
        if self.normalize:
            norms = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
            scale = step / norms.clamp_min(torch.finfo(norms.dtype).tiny)
            updated = {n: params[n] + scale.reshape(-1, *[1] * (grads[n].dim() - 1)) * grads[n] for n in params}
        else:
            updated = {n: params[n] + step * grads[n] for n in params}
        self._check_finite(_row_finite(updated), query_ids, "updated parameters")
        return updated

    def _check_finite(self, values: Tensor, query_ids: Tensor | None, what: str) -> None:
        """Raise naming the queries (``None``: the joint query set) whose ``values`` rows are not finite."""
        bad = ~torch.isfinite(values) if values.dtype != torch.bool else ~values
        if bad.any():
            if query_ids is None:
                who = "the joint query set"
            else:
                ids = query_ids[bad.reshape(values.shape[0], -1).any(dim=1).cpu()].tolist()
                who = f"query id(s) {ids[:10]}{' ...' if len(ids) > 10 else ''}"
            raise FloatingPointError(
                f"Forward-INF: the {what} became NaN/inf while stepping on {who} "
                f"(K={self.steps}, α={self.lr:g}, {self.direction}). "
                f"Use a smaller lr or fewer steps (ForwardINF.tune picks them), or check those queries."
            )

    def _ascend(self, batch: Any, query_ids: Tensor, keep: Sequence[int] = ()) -> tuple[Params, list[Params]]:
        """K steps from θ̂ for each query of the batch separately.

        Returns the stacked ``(P, ...)`` parameters after K steps and snapshots after each step
        count listed in ``keep``.
        """
        size = len(query_ids)
        params = {n: p.expand(size, *p.shape).clone() for n, p in self.original.items()}
        snapshots = []
        for step in range(1, self.steps + 1):
            params = self._step(params, batch, query_ids)
            if step in keep:
                snapshots.append(params)
        return params, snapshots

    def _joint_gradient(self, params: Params, queries: Data) -> Params:
        """∇ of the mean measurement over the whole query set, streamed over query batches."""
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for ids, batch in self.batches(queries, "query", "Forward-INF joint query gradient"):
            grads, values = torch.func.grad(lambda p, b=batch: self._query_sum(p, b), has_aux=True)(params)
            self._check_finite(values, ids, "query loss")
            for n in total:
                total[n] += grads[n]
            count += len(ids)
        return {n: g / count for n, g in total.items()}

    # --- training-set passes --------------------------------------------------------------------
    def _base_losses(self, train: Data) -> Tensor:
        """``ℓ(z_i, θ̂)`` for every training example, ``(N,)``: one forward read shared by all queries."""
        n_train = len(self.loader(train, "train").dataset)
        losses = torch.zeros(n_train, device=self.device)
        with torch.no_grad():
            for ids, batch in self.train_batches(train, "Forward-INF losses at θ̂"):
                losses[ids.to(self.device)] = self._train_losses(self.original, batch).to(losses.dtype)
        return self.sum_across_processes(losses)

    def _updated_losses(
        self, stacked: Params, train: Data, base: Tensor, query_ids: Tensor | None, out: Tensor
    ) -> None:
        """Write ``ℓ(z_i, θ_q) − ℓ(z_i, θ̂)`` (sign-adjusted) into ``out (P, N)`` for this process's share."""
        with torch.no_grad():
            for ids, batch in self.train_batches(train, "Forward-INF forward passes"):
                losses = self._map(self._train_losses, (0, None), stacked, batch)  # (P, B)
                self._check_finite(losses, query_ids, "training losses under the updated parameters")
                ids = ids.to(self.device)
                out[:, ids] = self.sign * (losses.to(out.dtype) - base[ids])

    # --- public API -----------------------------------------------------------------------------
    def attribute(self, queries: Data, train: Data, joint: bool = False) -> Scores:
        """Forward-INF scores.

        Args:
            queries: query examples (dataset, tensors or non-shuffling DataLoader).
            train: training examples, scored with forward passes only.
            joint: treat the whole query set as one D_tst (one parameter set stepped on the mean
                query loss) and return a single row.

        Returns:
            :class:`Scores` ``(Q, N)`` float32, or ``(1, N)`` with ``joint=True``; positive = helpful.
        """
        n_queries = len(self.loader(queries, "query").dataset)
        n_train = len(self.loader(train, "train").dataset)
        base = self._base_losses(train)
        if joint:
            params = _stack1(self.original)
            for _ in range(self.steps):
                grads = self._joint_gradient({n: p[0] for n, p in params.items()}, queries)
                params = self._update(params, _stack1(grads), None)
            values = torch.zeros(1, n_train, device=self.device)
            self._updated_losses(params, train, base, None, values)
            result = self.scores(self.sum_across_processes(values), 1, n_train)
            result.config["joint"] = True
            result.config["n_joint_queries"] = n_queries
            return result
        values = torch.zeros(n_queries, n_train, device=self.device)
        for query_ids, batch in self.batches(queries, "query", "Forward-INF queries"):
            stacked, _ = self._ascend(batch, query_ids)
            block = torch.zeros(len(query_ids), n_train, device=self.device)
            self._updated_losses(stacked, train, base, query_ids, block)
            values[query_ids.to(self.device)] = block
        return self.scores(self.sum_across_processes(values), n_queries, n_train)

    def self_influence(self, train: Data) -> Scores:
        """Each training example as its own query: ``ℓ(z, θ_K(z)) − ℓ(z, θ̂)`` with θ_K(z) stepped on z.

        Large values flag examples the rest of the data does not support (e.g. mislabeled ones).
        Returns :class:`Scores` of kind ``"self"``, shape ``(N,)``.
        """
        loader = as_loader(train, self.query_batch_size, "train")
        n_train = len(loader.dataset)
        values = torch.zeros(n_train, device=self.device)
        world = self.fabric.world_size if self.fabric is not None else 1
        rank = self.fabric.global_rank if self.fabric is not None else 0
        batches = progress_bar(batches_with_ids(loader, self.task), self.progress, "Forward-INF self", len(loader))
        for position, (ids, batch) in enumerate(batches):
            if position % world != rank:
                continue
            batch = move_to(batch, self.device)
            stacked, _ = self._ascend(batch, ids)
            with torch.no_grad():
                after = self._map(lambda p, ex: self._train_losses(p, _one_example(ex))[0], (0, 0), stacked, batch)
                before = self._train_losses(self.original, batch)
            self._check_finite(after, ids, "training losses under the updated parameters")
            values[ids.to(self.device)] = self.sign * (after - before).to(values.dtype)
        return self.scores(self.sum_across_processes(values), None, n_train, kind="self")

    def tune(
        self,
        train: Data,
        steps: Sequence[int] = (1, 2, 5, 10),
        lrs: Sequence[float] | None = None,
        n_planted: int = 32,
        seed: int = 0,
        apply: bool = True,
    ) -> TuneResult:
        """Pick K and α without labels: use ``n_planted`` training examples as queries (planted
        duplicates) and choose the candidate that ranks each one's own copy first most often.

        Ties go to the higher top-5 rate, then fewer steps, then the smaller α; a candidate whose
        steps turn NaN/inf is skipped (listed in ``diverged``). Every K shares one
        trajectory per α (K_max steps), so the cost is ``len(lrs) · n_planted · K_max`` backward
        passes and ``len(lrs) · ceil(n_planted · len(steps) / query_batch_size)`` training-set reads.

        Args:
            train: the training set (also the pool the planted queries are drawn from).
            steps: candidate K values.
            lrs: candidate α values; default the current α times 0.1, 0.3, 1, 3, 10.
            n_planted: number of training examples used as queries.
            seed: seed of the draw.
            apply: set ``self.steps`` / ``self.lr`` to the chosen values.

        Returns:
            :class:`TuneResult` with the choice and the top-1/top-5 rate of every candidate (also logged).
        """
        candidates_k = sorted({self._check_steps(k) for k in steps})
        candidates_a = sorted({self._check_lr(a) for a in (lrs or [self.lr * f for f in (0.1, 0.3, 1.0, 3.0, 10.0)])})
        loader = as_loader(train, self.batch_size, "train")
        dataset, n_train = loader.dataset, len(loader.dataset)
        if not 1 <= n_planted <= n_train:
            raise ValueError(f"tune(n_planted={n_planted}): choose between 1 and the training set size {n_train}.")
        generator = torch.Generator().manual_seed(seed)
        planted = torch.randperm(n_train, generator=generator)[:n_planted].sort().values
        per_batch = max(1, self.query_batch_size // len(candidates_k))
        queries = DataLoader(Subset(dataset, planted.tolist()), batch_size=per_batch, collate_fn=loader.collate_fn)
        base = self._base_losses(train)
        saved = (self.steps, self.lr)
        top1: dict[tuple[int, float], float] = {}
        top5: dict[tuple[int, float], float] = {}
        diverged: list[tuple[int, float]] = []
        try:
            for alpha in candidates_a:
                self.lr = alpha
                ks = list(candidates_k)
                while ks:  # a trajectory that turns NaN disqualifies its longest K; retry the shorter ones
                    self.steps = ks[-1]
                    try:
                        ranks = self._planted_ranks(queries, planted, train, base, ks)
                        break
                    except FloatingPointError:
                        diverged.append((ks.pop(), alpha))
                for i, k in enumerate(ks):
                    top1[(k, alpha)] = float((ranks[i] == 1).float().mean())
                    top5[(k, alpha)] = float((ranks[i] <= 5).float().mean())
        finally:
            self.steps, self.lr = saved
        if not top1:
            raise FloatingPointError(
                f"tune: every candidate diverged (NaN/inf) for steps={candidates_k}, lrs={candidates_a}; "
                "try smaller lrs or normalize=True."
            )
        best = max(top1, key=lambda c: (top1[c], top5[c], -c[0], -c[1]))
        result = TuneResult(best[0], best[1], top1, top5, sorted(diverged), planted.tolist())
        log.info("Forward-INF tune on %d planted duplicates:\n%s", n_planted, result.table())
        if apply:
            self.steps, self.lr = result.steps, result.lr
        return result

    def _planted_ranks(self, queries: DataLoader, planted: Tensor, train: Data, base: Tensor, ks: list[int]) -> Tensor:
        """Rank ``(len(ks), n_planted)`` of each planted query's own copy after each K in ``ks``."""
        n_train = len(base)
        ranks = torch.zeros(len(ks), len(planted), dtype=torch.long)
        for local, batch in batches_with_ids(queries, self.task):
            batch = move_to(batch, self.device)
            own = planted[local]
            _, snapshots = self._ascend(batch, own, keep=ks)
            stacked = {n: torch.cat([s[n] for s in snapshots]) for n in self.original}
            block = torch.zeros(len(ks) * len(own), n_train, device=self.device)
            self._updated_losses(stacked, train, base, own.repeat(len(ks)), block)
            block = self.sum_across_processes(block).cpu().reshape(len(ks), len(own), n_train)
            own_scores = block[:, torch.arange(len(own)), own]
            ranks[:, local] = (block >= own_scores[..., None]).sum(dim=2)  # ties count against the copy
        return ranks


def _leaves(tree: Any) -> Iterator[Tensor]:
    from torch.utils._pytree import tree_leaves

    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor))


def _stack1(tree: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0), tree)


def _row_finite(params: Params) -> Tensor:
    """``(P,)`` whether every parameter of each stacked set is finite."""
    return torch.stack([torch.isfinite(p.reshape(p.shape[0], -1)).all(dim=1) for p in params.values()]).all(dim=0)
