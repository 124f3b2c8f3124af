"""The training forward's own output, for what the recorder would otherwise run a second forward for.

Two things the callback does need the model's outputs on a training batch at the training step's parameters: the
true Fisher's sampled targets on statistics steps (:mod:`~lightning_tda.recording.true_fisher`) and the loss check
on the first steps of a fit (:mod:`~lightning_tda.recording.loss_check`). When ``training_step`` called the model
(the LightningModule, or a Hugging Face model inside it) on the batch's own inputs, and
:meth:`Task.outputs_of_call <lightning_tda.tasks.Task.outputs_of_call>` recognises that call as
:meth:`Task.forward`, its output *is* those outputs: same parameters, same dropout masks, same autocast. Keeping
it costs nothing; replaying the forward costs a third of a training step (measured: 0.27 s of a 6.5 s, 32-step
ResNet fit for the loss check's 4 replays). The hooks are on only while the caller wants the calls (statistics steps
and checked steps: a hooked module takes PyTorch's slower call path on every forward), and the calls are forgotten
after each micro-batch's backward. Nothing here imports Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.tasks import Task


class TrainingForward:
    """Outputs of the training forward of the current micro-batch, when the Task recognises the model call.

    Args:
        model: the LightningModule; while :meth:`watch` is on, forward hooks sit on it and on the outermost Hugging
            Face models inside it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._roots = model_roots(model)
        self._hooks: list[Any] = []
        self._calls: list[tuple[tuple, dict[str, Any], Any]] = []
        self._found: tuple[Tensor | None] | None = None

    def watch(self) -> None:
        """Keep the calls of the forwards from now on, until :meth:`release` (a no-op while watching)."""
        if not self._hooks:
            self._hooks = [root.register_forward_hook(self._keep, with_kwargs=True) for root in self._roots]

    def release(self) -> None:
        """Keep no more calls (the hooks come off); those kept stay until :meth:`forget`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if torch.is_grad_enabled():
            self._calls.append((args, kwargs, output))

    def outputs(self, task: Task, batch: Any) -> Tensor | None:
        """The outputs :meth:`Task.forward` would give for ``batch`` (with their graph), from the one kept call the
        Task recognises; ``None`` when no call, or more than one distinct call, is recognised."""
        if self._found is None:
            found = {}
            for args, kwargs, output in self._calls:
                outputs = task.outputs_of_call(batch, args, kwargs, output)
                if outputs is not None:
                    found[id(outputs)] = outputs  # nested calls of one forward give the same tensor
            self._found = (next(iter(found.values())) if len(found) == 1 else None,)
        return self._found[0]

    def forget(self) -> None:
        """Drop the micro-batch's calls (after its backward)."""
        self._calls = []
        self._found = None

    def detach(self) -> None:
        """:meth:`release` and :meth:`forget`."""
        self.release()
        self.forget()


def model_roots(model: nn.Module) -> list[nn.Module]:
    """The LightningModule and the outermost Hugging Face models inside it (modules with
    ``get_input_embeddings``): the calls a ``training_step`` makes to produce the task's outputs."""
    roots: list[str] = []
    modules = [model]
    for name, module in model.named_modules():
        if module is model or any(name.startswith(f"{root}.") for root in roots):
            continue
        if callable(getattr(module, "get_input_embeddings", None)):
            roots.append(name)
            modules.append(module)
    return modules
