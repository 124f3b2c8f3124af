"""Is the traced training reproducible? A replay of its first steps must give the losses the trace recorded.

Re-training on subsets (the LDS ground truth) measures the recipe of the traced run only if that recipe
is a function of its seed. :class:`StepLossRecorder` records, on a replay with the same seed, the loss
of every optimizer step exactly as :class:`~lightning_tda.TDACallback` logs it (the sum of the
micro-batch losses ``training_step`` returned), and :func:`check_replay` compares it with the trace's
step log (``Trace.steps().loss``), raising :class:`NotReproducibleError` naming the likely causes and
the fix at the first step that differs beyond float tolerance, or when the recipe plans another number of
optimizer steps than the trace recorded (other trainer arguments, or a run stopped early).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

# A replay on the same machine repeats float32 arithmetic; this allows reductions that change order
# (a different thread count) and nothing a different data order, augmentation or dropout mask gives.
RELATIVE_TOLERANCE = 1e-4
ABSOLUTE_TOLERANCE = 1e-6

LIKELY_CAUSES = (
    "an unseeded data order or augmentation (a DataLoader generator, sampler or random transform drawing from "
    "a source seed_everything does not seed, e.g. torch.Generator() or np.random.default_rng() without a seed); "
    "dropout or another random layer drawing from such a generator instead of the global torch RNG; "
    "nondeterministic ops (set trainer.deterministic: true); DataLoader num_workers > 0 with workers that seed "
    "their own RNGs (give the DataLoader a worker_init_fn and generator derived from the seed); Trainer callbacks "
    "that change training (the replay runs without the config's callbacks and logger); or a trace recorded with "
    "another config or code version"
)


class NotReproducibleError(ValueError):
    """The replay's step losses differ from the trace's; the message names the step, the causes and the fix."""


class StepLossRecorder(L.Callback):
    """Records each optimizer step's training loss and stops the fit after ``max_steps`` of them.

    Stopping from a callback (not ``Trainer(max_steps=...)``) leaves ``trainer.estimated_stepping_batches``
    and so any schedule built from it as in the full run.

    Attributes:
        losses: one float per optimizer step, the sum of that step's micro-batch losses (NaN when
            ``training_step`` returned no loss).
        planned_steps: the optimizer steps the full fit would take (``trainer.estimated_stepping_batches``).
    """

    def __init__(self, max_steps: int) -> None:
        if max_steps < 1:
            raise ValueError(f"StepLossRecorder(max_steps={max_steps}): record at least one step.")
        self.max_steps = max_steps
        self.losses: list[float] = []
        self.planned_steps: float | None = None
        self._pending = 0.0
        self._stepped = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.planned_steps = trainer.estimated_stepping_batches

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._pending += float(loss.detach().double()) if isinstance(loss, torch.Tensor) else float("nan")
        if self._stepped:
            self.losses.append(self._pending)
            self._pending, self._stepped = 0.0, False
            if len(self.losses) >= self.max_steps:
                trainer.should_stop = True


def check_replay(
    recorded: np.ndarray,
    replayed: list[float] | np.ndarray,
    seed: int,
    where: str,
    planned_steps: float | None = None,
) -> int:
    """Compare the replay's step losses with the first ones ``recorded`` in the trace; returns the number
    of steps compared.

    Args:
        recorded: ``(n,)`` float64 losses of the trace's step log.
        replayed: float losses of the replay's first steps (at most ``n`` are compared).
        seed: the seed both runs used (named in the error).
        where: what was replayed (the config's path), named in the error.
        planned_steps: optimizer steps the replayed recipe would take in full; must be ``n``.

    Raises:
        NotReproducibleError: when the recipe plans another number of steps than the trace recorded, at
            the first step whose losses differ beyond float tolerance, or when the replay took no step.
    """
    if planned_steps is not None and planned_steps != len(recorded):
        raise NotReproducibleError(
            f"{where}: this recipe trains {planned_steps} optimizer steps but the trace recorded {len(recorded)}, so "
            f"re-trained models would not measure the traced run. The trace was recorded with other trainer "
            f"arguments (e.g. --trainer.max_epochs on the command line: pass the same ones to evaluate), or its "
            f"training stopped early (an EarlyStopping callback or an interruption: the replay and the re-training "
            f"run without the config's callbacks). Re-record the trace with `lightning-tda fit` and this config."
        )
    replayed = np.asarray(replayed, dtype=np.float64)
    count = min(len(recorded), len(replayed))
    if count == 0:
        raise NotReproducibleError(
            f"{where}: the replay with seed_everything={seed} took no optimizer step (the trace recorded "
            f"{len(recorded)}); check that the config trains."
        )
    expected, found = np.asarray(recorded[:count], dtype=np.float64), replayed[:count]
    same = np.isclose(found, expected, rtol=RELATIVE_TOLERANCE, atol=ABSOLUTE_TOLERANCE) | (
        np.isnan(found) & np.isnan(expected)
    )
    if not same.all():
        step = int(np.argmin(same))
        raise NotReproducibleError(
            f"{where}: training is not reproducible, so re-trained models would not measure this recipe. "
            f"Replaying it with seed_everything={seed} gave a loss of {found[step]:.8g} at step {step + 1} where "
            f"the trace recorded {expected[step]:.8g}. Likely causes: {LIKELY_CAUSES}. Fix the cause, then "
            f"re-record the trace with `lightning-tda fit` and evaluate again."
        )
    return count
