"""Does the Task's loss match the loss ``training_step`` optimises? A check on the first optimizer steps.

Attribution differentiates ``task.train_loss(model, batch)`` (per-example losses whose batch mean is
taken as the training objective), while the trace's learning rates, optimizer state and
empirical-Fisher statistics come from the loss ``training_step`` returned. When the two differ
(a sum instead of a mean, a token mean against a per-example token sum, a constant factor, an extra
term, label smoothing) every score is silently off. :class:`TDACallback
<lightning_tda.recording.callback.TDACallback>` therefore compares them on the first optimizer steps:

* the reported loss is the one Lightning hands to ``on_train_batch_end`` (already divided by
  ``accumulate_grad_batches``, so the callback multiplies it back; unaffected by a GradScaler);
* the Task's losses come from the training forward's own outputs when ``training_step`` called the model
  in a way the Task recognises (:mod:`~lightning_tda.recording.training_forward`): no extra pass at all.
  Otherwise from :func:`replay_task_losses`: one extra forward without gradients at the same parameters
  (before the optimizer step), in the precision plugin's autocast context, in train mode with the RNG
  state the training forward started from (so dropout draws the same masks) and batch-norm buffers
  restored afterwards. No extra backward either way.

:class:`LossCheck` (update/compute, as in torchmetrics) then names what explains the reported losses:
the Task's batch mean (``match``), the batch sum (``example_sum``), the batch's token mean where the
Task sums each example's tokens (``token_mean``), the batch's token mean where the Task averages each
example's tokens and the examples have different lengths (``token_weighted``), a constant factor
(``scale``), or nothing (``mismatch``). Mismatches are reported with the numbers and the fix, not corrected: a corrected
scale would have to reach every method's learning-rate replay, curvature and Fisher targets.
Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.tasks import LanguageModelingTask, Task

VERDICTS = ("match", "example_sum", "token_mean", "token_weighted", "scale", "mismatch", "unchecked")
_MAX_SHOWN = 3  # batches quoted in a message


@dataclass
class LossCheckResult:
    """Outcome of the check, recorded in the trace (``meta/loss_check``) and shown by ``inspect``.

    Attributes:
        verdict: one of ``VERDICTS``.
        batches: micro-batches compared.
        reported: ``training_step``'s loss per batch (undivided by gradient accumulation).
        task_mean: the Task's batch-mean loss per batch.
        factor: reported / Task mean when it is constant (``scale``; batch size for ``example_sum``).
        max_relative_difference: largest ``|reported - explained| / |reported|`` of the verdict's explanation
            (for ``mismatch``: of the Task's mean).
        message: what was found, what attribution will and will not account for, and the fix.
        first_step: the first optimizer step of the trace the check covered (1-based).
    """

    verdict: str
    batches: int
    reported: list[float] = field(default_factory=list)
    task_mean: list[float] = field(default_factory=list)
    factor: float | None = None
    max_relative_difference: float | None = None
    message: str = ""
    first_step: int = 1

    @property
    def warns(self) -> bool:
        return self.verdict not in ("match",)

    def record(self) -> dict[str, Any]:
        return asdict(self)


class LossCheck:
    """Compare per-batch reported training losses with the Task's per-example losses.

    Call :meth:`update` once per micro-batch and :meth:`compute` at the end.

    Args:
        relative_tolerance: how closely an explanation must reproduce every reported loss, relative to
            its size (1e-4 for 32/64-bit training, looser for 16-bit).
        task: the Task (its class and options are quoted in messages).
    """

    def __init__(self, relative_tolerance: float = 1e-4, task: Task | None = None) -> None:
        self.relative_tolerance = relative_tolerance
        self.task = task
        self.task_name = type(task).__name__ if task is not None else "Task"
        self.reported: list[float] = []
        self.sums: list[float] = []
        self.sizes: list[int] = []
        self.positions: list[float | None] = []  # predicted tokens in the batch (sequences only)
        self.weighted: list[float | None] = []  # Σ_b tokens_b · loss_b
        self.problems: list[str] = []

    def update(self, task_losses: Tensor, reported: float, positions: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            task_losses: the Task's per-example losses, ``(B,)``.
            reported: the loss ``training_step`` returned for the batch (not divided by accumulation).
            positions: predicted positions (tokens) of each example ``(B,)`` for sequence targets, else None.
        """
        losses = task_losses.detach().double().reshape(-1)
        if not (math.isfinite(reported) and bool(losses.isfinite().all())) or len(losses) == 0:
            return  # a non-finite step says nothing about the reduction; the callback reports NaN steps itself
        self.reported.append(float(reported))
        self.sums.append(float(losses.sum()))
        self.sizes.append(len(losses))
        counts = None if positions is None else positions.detach().double().reshape(-1).to(losses.device)
        self.positions.append(None if counts is None else float(counts.sum()))
        self.weighted.append(None if counts is None else float((counts * losses).sum()))

    def skip(self, problem: str) -> None:
        """Record why a batch could not be compared (no loss returned, the Task failed on it)."""
        if problem not in self.problems:
            self.problems.append(problem)

    # --- explanations -----------------------------------------------------------------------------
    def _means(self) -> list[float]:
        return [s / n for s, n in zip(self.sums, self.sizes)]

    def _worst(self, predicted: Sequence[float]) -> float:
        """Largest relative difference between the reported losses and ``predicted``."""
        return max(abs(r - p) / max(abs(r), abs(p), 1e-30) for r, p in zip(self.reported, predicted))

    def _explanations(self) -> list[tuple[str, list[float], float | None]]:
        means = self._means()
        candidates: list[tuple[str, list[float], float | None]] = [
            ("match", means, 1.0),
            ("example_sum", list(self.sums), None),
        ]
        if all(p is not None and p > 0 for p in self.positions):
            candidates.append(("token_mean", [s / p for s, p in zip(self.sums, self.positions)], None))
            candidates.append(("token_weighted", [w / p for w, p in zip(self.weighted, self.positions)], None))
        norm = sum(m * m for m in means)
        if norm > 0:
            factor = sum(r * m for r, m in zip(self.reported, means)) / norm
            candidates.append(("scale", [factor * m for m in means], factor))
        return candidates

    def compute(self, first_step: int = 1) -> LossCheckResult:
        """The verdict over the batches seen so far."""
        means = self._means()
        base = {"batches": len(self.reported), "reported": list(self.reported), "task_mean": means}
        base["first_step"] = first_step
        if not self.reported:
            why = "; ".join(self.problems) or "no training batch was seen"
            return LossCheckResult("unchecked", message=_unchecked_message(why, self.task_name), **base)
        for verdict, predicted, factor in self._explanations():
            worst = self._worst(predicted)
            if worst <= self.relative_tolerance:
                if verdict == "example_sum" and len(set(self.sizes)) == 1:
                    factor = float(self.sizes[0])
                if verdict == "token_mean":
                    factor = sum(r / m for r, m in zip(self.reported, means)) / len(means)
                message = _MESSAGES[verdict](self, factor, worst)
                return LossCheckResult(verdict, factor=factor, max_relative_difference=worst, message=message, **base)
        worst = self._worst(means)
        return LossCheckResult("mismatch", max_relative_difference=worst, message=_mismatch_message(self), **base)

    # --- state (saved in Lightning checkpoints through the callback) ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "reported": list(self.reported),
            "sums": list(self.sums),
            "sizes": list(self.sizes),
            "positions": list(self.positions),
            "weighted": list(self.weighted),
            "problems": list(self.problems),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reported = [float(v) for v in state["reported"]]
        self.sums = [float(v) for v in state["sums"]]
        self.sizes = [int(v) for v in state["sizes"]]
        self.positions = [None if v is None else float(v) for v in state["positions"]]
        self.weighted = [None if v is None else float(v) for v in state["weighted"]]
        self.problems = [str(v) for v in state["problems"]]


# ------------------------------------------------------------------------------------- messages
def _pairs(check: LossCheck) -> str:
    shown = [f"reported {r:.6g} vs {check.task_name} mean {m:.6g}" for r, m in zip(check.reported, check._means())][
        :_MAX_SHOWN
    ]
    more = f" (and {len(check.reported) - _MAX_SHOWN} more)" if len(check.reported) > _MAX_SHOWN else ""
    return "; ".join(shown) + more


def _match_message(check: LossCheck, factor: float | None, worst: float) -> str:
    return (
        f"training_step's loss equals the batch mean of {check.task_name}.train_loss on {len(check.reported)} "
        f"batch(es) (largest relative difference {worst:.1e})."
    )


def _example_sum_message(check: LossCheck, factor: float | None, worst: float) -> str:
    return (
        f"training_step returns the SUM of the per-example losses over the batch, {check.task_name} and attribution "
        f"take their MEAN ({_pairs(check)}; ratio = batch size). The recorded learning rates therefore acted on "
        f"gradients batch-size times larger than the Task's: methods that replay training (SOURCE, TracInCP) take "
        f"steps that much too small and fisher='empirical' statistics are off by its square. Fix: reduce with the "
        f"mean in training_step (e.g. F.cross_entropy(..., reduction='mean'); multiply the learning rate by the "
        f"batch size to train the same way)."
    )


def _token_mean_message(check: LossCheck, factor: float | None, worst: float) -> str:
    if isinstance(check.task, LanguageModelingTask):
        fix = (
            "LanguageModelingTask(reduction='mean') (exact when every example has equally many predicted tokens, "
            "e.g. packed fixed-length blocks)"
        )
    else:
        fix = (
            "for next-token prediction LanguageModelingTask(reduction='mean'); otherwise a Task whose per-example "
            "loss is the mean over the example's positions"
        )
    return (
        f"training_step averages the loss over the batch's predicted tokens while {check.task_name} sums the "
        f"tokens of each example ({_pairs(check)}; ratio = examples / tokens, about {factor:.4g}). Per-example "
        f"losses, their gradients, the curvature, the Fisher targets and every score are then on a scale about "
        f"{1 / factor:.4g}x (tokens per example) off from what training did. Fix: {fix}."
    )


def _token_weighted_message(check: LossCheck, factor: float | None, worst: float) -> str:
    return (
        f"training_step averages the loss over all predicted tokens of the batch, so each example counts in "
        f"proportion to its number of tokens, while {check.task_name} weights every example equally, and the "
        f"examples have different numbers of tokens (padding) ({_pairs(check)}). Attribution then weights short "
        f"examples more, and long ones less, than training did. No Task option reproduces a per-batch token "
        f"weighting: pack the data into fixed-length blocks, or use {check.task_name}(reduction='sum') with a "
        f"training_step returning the sum over the batch's tokens divided by the number of examples (with a "
        f"learning rate about tokens-per-example times smaller to train the same way)."
    )


def _scale_message(check: LossCheck, factor: float | None, worst: float) -> str:
    single = len(check.reported) == 1
    caveat = " Only one batch was compared, so a varying mismatch cannot be ruled out." if single else ""
    return (
        f"training_step's loss is {factor:.6g} x the batch mean of {check.task_name}.train_loss on every checked "
        f"batch ({_pairs(check)}). Attribution differentiates the Task's loss, so methods that replay training "
        f"(SOURCE, TracInCP) take steps {factor:.4g}x too small (with SGD; Adam-family steps are nearly "
        f"scale-free), and fisher='empirical' statistics are {factor:.4g}^2 too large. Fix: return the Task's loss "
        f"from training_step (divide it by {factor:.4g}; multiply the learning rate by {factor:.4g} to train the "
        f"same way).{caveat}"
    )


def _mismatch_message(check: LossCheck) -> str:
    differences = [r - m for r, m in zip(check.reported, check._means())]
    spread = max(differences) - min(differences)
    offset = ""
    if len(differences) > 1 and spread <= 0.05 * max(abs(d) for d in differences):
        offset = (
            f" The difference is nearly constant ({sum(differences) / len(differences):.4g}): an example-independent "
            f"term such as a weight penalty, which no training example is credited for."
        )
    return (
        f"training_step's loss is not explained by {check.task_name}.train_loss: no reduction or constant factor "
        f"reproduces it ({_pairs(check)}).{offset} Attribution accounts for the Task's per-example loss on the batch "
        f"as given (its gradients and curvature, with the recorded learning rates); it does not account for the "
        f"rest of training_step's loss: an extra term (regularizer, auxiliary loss), label smoothing, a different "
        f"loss, or augmentation/mixup applied inside training_step. Their part of each update is missing from the "
        f"scores. Fix: make the Task's loss reproduce training_step's (override Task.loss or Task.train_loss), or "
        f"have training_step return the Task's loss."
    )


def _unchecked_message(why: str, task_name: str) -> str:
    return (
        f"the Task's loss could not be compared with training_step's ({why}). Attribution assumes training "
        f"minimised the batch mean of {task_name}.train_loss; make training_step return its loss (a tensor or a "
        f"dict with 'loss') so the assumption is checked."
    )


_MESSAGES: dict[str, Callable[[LossCheck, float | None, float], str]] = {
    "match": _match_message,
    "example_sum": _example_sum_message,
    "token_mean": _token_mean_message,
    "token_weighted": _token_weighted_message,
    "scale": _scale_message,
}


# ------------------------------------------------------------------------------------- replay
def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global CPU (and, on CUDA, the device's) RNG state, to replay a forward pass's random draws."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def replay_task_losses(
    model: nn.Module,
    task: Task,
    batch: Any,
    state: tuple[Tensor, Tensor | None],
    context: AbstractContextManager,
) -> Tensor:
    """Per-example Task losses ``(B,)`` of ``batch`` at the current parameters, evaluated as the training
    forward was: in the model's current mode, inside ``context`` (the precision plugin's autocast), with
    the RNG ``state`` taken before ``training_step`` (dropout draws the same masks). Gradients are off,
    the global RNG is left as it was, and buffers (batch-norm statistics) are restored."""
    device = next(model.parameters()).device
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), context:
            cpu, cuda = state
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            return task.train_loss(model, batch).detach()
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)


def predicted_positions(task: Task, batch: Any) -> Tensor | None:
    """Positions (tokens) each example of ``batch`` is trained on, ``(B,)``, when targets are sequences of
    class indices (positions equal to the Task's ``ignore_index`` excluded; a language model's first token
    is never predicted), else None."""
    targets = task.targets(batch)
    ignore = getattr(task, "ignore_index", None)
    if not isinstance(targets, Tensor) or targets.dim() < 2 or targets.is_floating_point() or ignore is None:
        return None
    valid = targets != ignore
    if isinstance(task, LanguageModelingTask):
        valid = valid[:, 1:]
    return valid.reshape(len(valid), -1).sum(dim=1)


class TrainingLossCheck:
    """The check as :class:`~lightning_tda.recording.callback.TDACallback` runs it: on the first ``steps`` optimizer
    steps of a fit, the Task's losses of each micro-batch from its training forward, or one replayed Task forward
    (see the module docstring).

    The callback calls :meth:`before_training_step` in ``on_train_batch_start``, :meth:`after_backward`
    in ``on_after_backward`` (parameters not yet updated) and :meth:`after_batch` in
    ``on_train_batch_end``; :meth:`finish` gives the result.

    Args:
        task: the callback's Task.
        steps: optimizer steps to check, counted from ``first_step``.
        relative_tolerance: see :class:`LossCheck`.
        first_step: the trace step (1-based) the fit's first optimizer step will have.
    """

    def __init__(self, task: Task, steps: int, relative_tolerance: float, first_step: int) -> None:
        self.task = task
        self.steps = steps
        self.first_step = first_step
        self.check = LossCheck(relative_tolerance, task)
        self.done = False
        self._rng: tuple[Tensor, Tensor | None] | None = None
        self._losses: Tensor | None = None

    @classmethod
    def for_fit(
        cls, task: Task, steps: int, precision: str, first_step: int, saved: dict[str, Any] | None
    ) -> TrainingLossCheck | None:
        """The check of a fit's first ``steps`` optimizer steps (``None`` when ``steps`` is 0), at a tolerance for
        the trainer's ``precision`` (half precision rounds losses to about 3 digits); a resumed fit continues the
        check it ``saved``."""
        if steps == 0:
            return None
        check = cls(task, steps, 1e-2 if "16" in precision else 1e-4, first_step=first_step)
        if saved is not None:
            check.load_state_dict(saved)
        return check

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1

    def covers(self, completed_steps: int) -> bool:
        """Whether the next optimizer step (after ``completed_steps``) is checked."""
        return not self.done and completed_steps < self.last_step

    def before_training_step(self, device: torch.device) -> None:
        self._rng = rng_state(device)
        self._losses = None

    def after_backward(
        self, model: nn.Module, batch: Any, context: AbstractContextManager, outputs: Tensor | None = None
    ) -> None:
        """The Task's losses of ``batch`` at the parameters of its training step: from the training forward's
        ``outputs`` when given (the call :meth:`Task.outputs_of_call` recognised) and the Task computes its
        losses from outputs (:meth:`Task.train_loss` not overridden), else by a replayed forward."""
        if self._rng is None:
            return
        try:
            if outputs is not None and type(self.task).train_loss is Task.train_loss:
                with torch.no_grad(), context:
                    self._losses = self.task.loss(outputs.detach(), self.task.targets(batch)).detach()
            else:
                self._losses = replay_task_losses(model, self.task, batch, self._rng, context)
        except Exception as err:  # any failure of the user's Task on a training batch is reported, not raised
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.check.skip(f"{type(self.task).__name__}.train_loss failed on a training batch: {problem}")
        self._rng = None

    def after_batch(self, reported: float, accumulate_grad_batches: int, batch: Any) -> None:
        """``reported``: the loss handed to ``on_train_batch_end`` (divided by gradient accumulation)."""
        losses, self._losses, self._rng = self._losses, None, None
        if losses is None:
            return
        if math.isnan(reported):
            self.check.skip("training_step returned no loss tensor")
            return
        self.check.update(losses, reported * accumulate_grad_batches, predicted_positions(self.task, batch))

    def finish(self) -> LossCheckResult:
        self.done = True
        return self.check.compute(self.first_step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_step": self.first_step, "done": self.done, "check": self.check.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.first_step = int(state["first_step"])
        self.done = bool(state["done"])
        self.check.load_state_dict(state["check"])
