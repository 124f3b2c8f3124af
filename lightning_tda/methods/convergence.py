"""Does the trace look like training reached the optimum that influence functions assume?

An influence function (EK-FAC IF here) answers "how would the *optimum* move without this example":
``(1/N) H⁻¹ g`` at the final parameters. Training data attribution is only as good as that picture
of training. Two cases where it fails are visible in the trace without re-training anything:

* **Stopped early.** Few passes over the data (``passes``: examples seen / N) while the logged
  training loss was still falling at the end (``loss_drop``: how much the mean logged loss of the
  last quarter of steps fell below the third quarter's, relative to the first 10 %'s mean; quarters
  because the logged losses are noisy mini-batch means).
* **Curvature the run never settled into.** SOURCE's response of a training run of learning-rate
  mass Λ along a curvature direction σ is ``(1 − e^(−Λσ))/σ``, and the influence function's is
  ``1/σ``; they agree only where ``Λσ ≫ 1``. ``settled`` is the median over layers of ``Λ·σ̄``
  (σ̄ = the layer's mean curvature eigenvalue at the final parameters): the number of e-folds
  training ran along an average curvature direction. Below ``SETTLED`` the influence function
  inverts curvature training had no time to act on, typically a model that drove its training loss
  to near zero, where the Gauss-Newton curvature all but vanishes (over-fitted small data sets).

The thresholds were set on 12 settings (6 data sets and models, each converged and not) so that
the check fires where EK-FAC IF's LDS fell below 0.7x the better of SOURCE and TracInCP and stays
quiet where it did not (12 of 12), then tried on 4 settings added afterwards (3 of 4: a false alarm on
digits trained 30 epochs, where IF did well). See BENCHMARKS.md, "Defaults across settings". It is a
warning, not a verdict: the fix it proposes is to compare with a method that models training.

Adam and AdamW (the modern suite of BENCHMARKS.md, "Methods that follow the optimizer": 9 AdamW
settings with warm-up and cosine decay): the curvature check is not made. There ``Λ·σ̄`` fell below
``SETTLED`` on all 9, including the 6 where EK-FAC IF had the best LDS at the defaults of the time
(section "Modern training recipes"), because Adam's steps are ``η/(√v̂ + ε)``, not ``η``; with the
preconditioner in ``Λ`` it still fell below on two runs where IF was best. The stopped-early check
fired on the two runs stopped after 2 epochs; there SOURCE beat IF on one and tied on the other
(0.74 vs 0.66, 0.25 vs 0.26; its θ_T pairing 0.33) while TracInCP fell below IF on both (0.64, 0.18),
so under Adam its advice names SOURCE only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lightning_tda.methods.base import learning_rate_mass, optimizer_name
from lightning_tda.trace.reader import Trace

FEW_PASSES = 5.0  # passes over the data below which a still-falling loss means "stopped early"
STILL_FALLING = 0.01  # loss drop from the third to the last quarter of steps, as a fraction of the initial loss
SETTLED = 0.1  # Λ·σ̄ below which training never settled along the curvature IF inverts
ADVICE = "influence functions are unreliable here; prefer SOURCE or TracInCP"
ADAPTIVE_ADVICE = "influence functions are unreliable here; prefer SOURCE"
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW")


@dataclass
class ConvergenceCheck:
    """The statistics and, when they say so, the warnings (see the module docstring).

    Attributes:
        passes: optimizer steps' examples over the training set size N.
        loss_drop: fall of the mean logged loss from the third to the last quarter of steps, relative
            to the first 10 %'s mean (NaN with fewer than 10 logged steps).
        settled: median over layers of ``Λ · σ̄_l`` (NaN without curvature).
        warnings: one sentence per failed assumption, each ending with the advice.
    """

    passes: float
    loss_drop: float
    settled: float
    warnings: list[str] = field(default_factory=list)

    @property
    def stopped_early(self) -> bool:
        """Fewer than ``FEW_PASSES`` passes while the loss was still falling (NaN, too few steps to tell, counts)."""
        return self.passes < FEW_PASSES and not self.loss_drop <= STILL_FALLING

    def as_config(self) -> dict[str, float]:
        return {"passes": self.passes, "loss_drop": self.loss_drop, "settled": self.settled}


def check_convergence(trace: Trace, mean_eigenvalues: Mapping[str, float] | None, n_train: int) -> ConvergenceCheck:
    """Read the trace's step log (and the final curvature's mean eigenvalue per layer, if given).

    Args:
        trace: the recorded trace.
        mean_eigenvalues: ``{layer: σ̄}`` of the curvature at the final parameters (e.g. EK-FAC's).
        n_train: N, used when the trace does not record its dataset size.

    Under Adam/AdamW only the stopped-early check can warn, and it advises SOURCE (module docstring).
    """
    steps = trace.steps()
    size = trace.dataset_size or n_train
    passes = float(np.sum(steps.batch_size)) / size if size else math.nan
    losses = np.asarray(steps.loss, dtype=np.float64)
    loss_drop = math.nan
    if len(losses) >= 10 and losses[: len(losses) // 10].mean() > 0:
        quarter = len(losses) // 4
        fall = losses[-2 * quarter : -quarter].mean() - losses[-quarter:].mean()
        loss_drop = float(fall / losses[: len(losses) // 10].mean())
    mass = learning_rate_mass(trace)
    settled = math.nan
    if mean_eigenvalues:
        settled = float(np.median([mass * value for value in mean_eigenvalues.values()]))
    check = ConvergenceCheck(passes, loss_drop, settled)
    adaptive = optimizer_name(trace) in ADAPTIVE_OPTIMIZERS
    advice = ADAPTIVE_ADVICE if adaptive else ADVICE
    if check.stopped_early:
        falling = (
            f"the training loss still fell by {loss_drop:.0%} of its initial value from the third to the last "
            f"quarter of steps"
            if math.isfinite(loss_drop)
            else f"only {len(losses)} optimizer steps were logged"
        )
        check.warnings.append(
            f"Training stopped early ({passes:.2g} passes over the data, and {falling}), so the final model "
            f"is not the converged optimum an influence function assumes: {advice}."
        )
    if settled < SETTLED and not adaptive:
        check.warnings.append(
            f"Training ran only {settled:.2g} e-folds along an average direction of the final curvature "
            f"(learning-rate mass × mean curvature eigenvalue, median over layers; below {SETTLED:g} the curvature "
            f"is nearly degenerate, typically a training loss driven to near zero), so inverting that curvature "
            f"describes an optimum training never settled into: {ADVICE}."
        )
    return check
