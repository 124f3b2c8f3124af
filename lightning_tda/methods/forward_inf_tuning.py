"""Choosing Forward-INF's step count K and step size α without labels, on planted duplicates.

The Forward-INF paper tunes K and α by using a few training examples as queries: each one's own copy in the
training set should rank first for it. :class:`PlantedDuplicateTuning` adds that search to
:class:`~lightning_tda.methods.forward_inf.ForwardINF` as :meth:`~PlantedDuplicateTuning.tune`; it runs the
method's own ascent and scoring, so what is tuned is exactly what attribution then uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_tda.batches import Data, as_loader, batches_with_ids, move_to

log = logging.getLogger(__name__)


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


class PlantedDuplicateTuning:
    """:meth:`tune` for :class:`~lightning_tda.methods.forward_inf.ForwardINF` (whose ascent and scoring it uses)."""

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
        saved = (self.steps, self.lr, self.backoff)
        self.backoff = False  # a candidate is judged as given: one that diverges is out, not backed off
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
            self.steps, self.lr, self.backoff = saved
        if not top1:
            raise FloatingPointError(
                f"tune: every candidate diverged (NaN/inf) for steps={candidates_k}, lrs={candidates_a}; "
                "try smaller lrs or normalize=True."
            )
        best = max(top1, key=lambda c: (top1[c], top5[c], -c[0], -c[1]))
        result = TuneResult(best[0], best[1], top1, top5, sorted(diverged), planted.tolist())
        log.info("Forward-INF tune on %d planted duplicates:\n%s", n_planted, result.table())
        if apply:
            self.steps, self.lr, self.lr_rule = result.steps, result.lr, "tune"
        return result

    def _planted_ranks(self, queries: DataLoader, planted: Tensor, train: Data, base: Tensor, ks: list[int]) -> Tensor:
        """Rank ``(len(ks), n_planted)`` of each planted query's own copy after each K in ``ks``."""
        n_train = len(base)
        ranks = torch.zeros(len(ks), len(planted), dtype=torch.long)
        for local, batch in batches_with_ids(queries, self.task):
            batch = move_to(batch, self.device)
            own = planted[local]
            snapshots = self._ascend(batch, own, keep=ks).snapshots
            stacked = {n: torch.cat([s[n] for s in snapshots]) for n in self.original}
            block = self._updated_losses(stacked, train, base).cpu().reshape(len(ks), len(own), n_train)
            if not torch.isfinite(block).all():
                raise FloatingPointError("Forward-INF tune: training losses became NaN/inf")
            own_scores = block[:, torch.arange(len(own)), own]
            ranks[:, local] = (block >= own_scores[..., None]).sum(dim=2)  # ties count against the copy
        return ranks
