"""TracInCP (Pruthi et al. 2020): update-weighted gradient dot products over checkpoints.

``τ(z_q, z_m) = Σ_c Σ_l η_{c,l} ⟨∇θ_l f(z_q, θ_c), P_{c,l} ∇θ_l ℓ(z_m, θ_c)⟩`` over the trace's
checkpoints ``c`` (docs/algorithms.md §4), where ``η_{c,l}`` is the learning rate of layer ``l``'s
optimizer param group at the step that produced checkpoint ``c`` (from the trace's step log) and
``P_{c,l}`` the optimizer's preconditioner there: for Adam/AdamW the diagonal ``1/(√v̂_c + ε)`` of the
bias-corrected second moment the trace records at every checkpoint (elementwise, per parameter), so
the pairing follows the update the optimizer actually applied, ``η P g``; for SGD ``P = I`` (plain
TracInCP, also available for Adam runs with ``preconditioned=False``). A step on ``z_m`` lowers the
query measurement by about ``η ⟨∇f, P g⟩``, so positive = helpful. Adam's first-moment average
has weights summing to 1, so it adds no factor.

Unit: the predicted change of the query's measurement when ``z_m`` is removed. Over T optimizer
steps an example is in a batch of B with probability B/N and weighs 1/B there, so each step
contributes ``η_t/N ⟨∇f, P g⟩`` on average; each of the C checkpoints stands for T/C steps. The
scores are therefore ``τ · T/(C·N)``; the paper leaves this constant out, and it changes no ranking.
The decay of an example's effect over later steps and SGD's momentum are not modelled (as in the
paper; SOURCE models both). Against re-training on 16 settings its scale
came out 0.3–39x the measured effects (median 1.6x, BENCHMARKS.md), the largest over-predictions on
converged models; momentum's steady-state factor ``1/(1 − β)`` would multiply that by 10, which is
why it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tda.batches import Data
from lightning_tda.layers.gradients import total_dot
from lightning_tda.methods.base import AttributionMethod, MethodOptions
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.timeline import ScoreSums, Timeline
from lightning_tda.trace.checks import TraceError
from lightning_tda.trace.reader import Trace


class TracInCP(AttributionMethod):
    """TracInCP from the checkpoints and learning rates in the trace.

    Args:
        trace, model, task: see :class:`~lightning_tda.methods.base.AttributionMethod`.
        checkpoints: checkpoint indices to sum over (default: all of the trace's checkpoints).
        preconditioned: weight the training gradients by Adam's recorded preconditioner
            ``1/(√v̂ + ε)`` at each checkpoint. Default ``None``: when the trace holds it for every
            chosen checkpoint and layer (Adam/AdamW runs; LDS higher than plain TracInCP on all 9 AdamW
            settings of the modern suite, by 0.002 to 0.11, BENCHMARKS.md, "Methods that follow the
            optimizer"); ``True`` raises if it does not.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.
    """

    name = "tracin"
    unit = "predicted change of the query's measurement when the training example is removed: τ·T/(C·N)"

    def __init__(
        self,
        trace: Trace,
        model: torch.nn.Module,
        task: Task,
        *,
        checkpoints: Sequence[int] | None = None,
        preconditioned: bool | None = None,
        options: MethodOptions | None = None,
    ) -> None:
        super().__init__(
            trace,
            model,
            task,
            options=options,
        )
        available = [c.index for c in trace.checkpoints]
        if not available:
            raise TraceError(f"{trace.path} holds no checkpoints; TracInCP needs at least one.")
        chosen = list(available if checkpoints is None else checkpoints)
        missing = [c for c in chosen if c not in available]
        if missing or not chosen:
            raise ValueError(f"checkpoints={checkpoints!r}: the trace has checkpoints {available}; choose among them.")
        self.checkpoints = chosen
        self.learning_rates = self._learning_rates()
        self.preconditioned = self._check_preconditioned(preconditioned)

    def _check_preconditioned(self, preconditioned: bool | None) -> bool:
        """Whether to precondition: ``preconditioned``, or (``None``) whether the trace holds Adam's v̂ at
        every chosen checkpoint for every layer."""
        if preconditioned not in (None, True, False):
            raise ValueError(f"TracInCP(preconditioned={preconditioned!r}): use True, False or None (automatic).")
        if preconditioned is False:
            return False
        missing = [
            (c, layer.name)
            for c in self.checkpoints
            for layer in self.layers
            if self.trace.checkpoint_preconditioner(c, layer.name) is None
        ]
        if preconditioned and missing:
            checkpoint, layer = missing[0]
            raise TraceError(
                f"TracInCP(preconditioned=True): {self.trace.path} holds no Adam second moment for checkpoint "
                f"{checkpoint}, layer {layer!r} ({len(missing)} missing); the run used {self.trace.optimizer_class}. "
                f"Only Adam/AdamW runs recorded by this version have it: pass preconditioned=False."
            )
        return not missing

    def _update_weights(self, checkpoint: int) -> dict[str, float | Tensor]:
        """``{layer: η}`` or, preconditioned, ``{layer: η·P}`` with ``P = 1/(√v̂ + ε)`` an ``(out, a_dim)``
        float64 matrix on the method's device: what multiplies a training gradient in the update."""
        rates = self.learning_rates[checkpoint]
        if not self.preconditioned:
            return dict(rates)
        groups = {info.name: info.param_group for info in self.trace.layers}
        weights: dict[str, float | Tensor] = {}
        for layer in self.layers:
            second_moment = self.trace.checkpoint_preconditioner(checkpoint, layer.name)
            eps = float(self.trace.optimizer["param_groups"][groups[layer.name]].get("eps", 1e-8))
            weights[layer.name] = rates[layer.name] / (second_moment.to(self.device).sqrt() + eps)
        return weights

    def _learning_rates(self) -> dict[int, dict[str, float]]:
        """``{checkpoint: {layer: η}}``: each layer's param-group learning rate at the checkpoint's step."""
        steps = self.trace.steps()
        groups = {info.name: info.param_group for info in self.trace.layers}
        rates = {}
        for info in self.trace.checkpoints:
            if info.index not in self.checkpoints:
                continue
            rows = np.nonzero(steps.step == info.step)[0]
            if len(rows) == 0:
                raise TraceError(
                    f"Checkpoint {info.index} (step {info.step}) has no row in the step log of {self.trace.path}; "
                    f"the trace is incomplete."
                )
            lr = steps.lr[rows[-1]]
            rates[info.index] = {layer.name: float(lr[groups[layer.name]]) for layer in self.layers}
        return rates

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "checkpoints": self.checkpoints,
            "preconditioned": self.preconditioned,
            "update": "η·(1/(√v̂+ε))·g (Adam's preconditioner at each checkpoint)" if self.preconditioned else "η·g",
        }

    def _per_example_steps(self, n_train: int) -> float:
        """``T/(C·N)``: the optimizer steps each checkpoint stands for, per training example."""
        return len(self.trace.steps()) / (len(self.checkpoints) * self.training_set_size(n_train))

    def _score(self, queries: Data, train: Data, over_time: bool) -> ScoreSums:
        """The one scoring pass of :meth:`attribute` and :meth:`attribute_over_time` (per segment if ``over_time``):
        the checkpoints in the order of the segments they were taken in."""
        n_train = len(self.loader(train, "train").dataset)
        n_queries = len(self.loader(queries, "query").dataset)
        segment_of = {info.index: info.segment for info in self.trace.checkpoints}
        checkpoints = sorted(self.checkpoints, key=segment_of.__getitem__)
        segments = sorted({segment_of[c] for c in checkpoints}) if over_time else None
        sums = self.score_sums(n_queries, n_train, self._per_example_steps(n_train), segments)
        for checkpoint in checkpoints:
            sums.enter(segment_of[checkpoint])
            self.load_checkpoint(checkpoint)
            weights = self._update_weights(checkpoint)
            query_matrices = {
                name: (weights[name] * g).to(g.dtype)
                for name, g in self.query_matrices(queries, f"query gradients @ checkpoint {checkpoint}").items()
            }
            for ids, batch in self.train_batches(train, f"TracIn @ checkpoint {checkpoint}"):
                sums.add(ids.to(self.device), total_dot(self.gradient_rows(batch, "train"), query_matrices))
        return sums

    def attribute(self, queries: Data, train: Data) -> Scores:
        """TracInCP scores ``(n_queries, n_train)`` (float32); positive = the example helped the query."""
        values = self._score(queries, train, over_time=False).scores()
        return self.scores(values, *values.shape)

    def attribute_over_time(self, queries: Data, train: Data, *, keep: int | None = None) -> Timeline:
        """The scores of :meth:`attribute` split by the segment each checkpoint was taken in, one pass:
        ``values`` ``(S, Q, N)`` for the segments holding the chosen checkpoints."""
        return self.timeline(self._score(queries, train, over_time=True), keep)

    def self_influence(self, train: Data) -> Scores:
        """``Σ_c η_c ⟨g(z, θ_c), P_c g(z, θ_c)⟩ · T/(C·N)`` for every training example, shape ``(N,)``."""
        n_train = len(self.loader(train, "train").dataset)
        values = torch.zeros(n_train, dtype=torch.float64, device=self.device)
        for checkpoint in self.checkpoints:
            self.load_checkpoint(checkpoint)
            weights = self._update_weights(checkpoint)
            for ids, batch in self.train_batches(train, f"TracIn self-influence @ checkpoint {checkpoint}"):
                ids = ids.to(self.device)
                for name, g in self.gradient_rows(batch, "train").items():
                    if not isinstance(weights[name], Tensor):
                        values[ids] += weights[name] * g.squared_norms()
                        continue
                    for chunk, dense in g.chunks():
                        values[ids[chunk]] += g[chunk].self_dot(weights[name] * dense)
        values = self.sum_across_processes(values) * self._per_example_steps(n_train)
        return self.scores(values, None, n_train, kind="self")
