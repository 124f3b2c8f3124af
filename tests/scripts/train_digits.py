"""Train a small digits MLP with TDACallback in its own process (for crash and DDP tests).

Usage: python train_digits.py TRACE_PATH [--devices N] [--batch-size B] [--kill-at-step K]
                                           [--pause-at-step K --pause-file F] [--file-size-limit BYTES]
                                           [--print-sizes] [--disk-full-after-rows N] [--budget B]

``--kill-at-step`` sends SIGKILL to this process after that optimizer step, the way an
out-of-memory killer or a pre-empted node ends a run: no Python cleanup runs.
``--pause-at-step`` creates ``F.paused`` after that step and waits until ``F`` exists (the trace is
then open for writing). ``--file-size-limit`` caps the size of any file this process writes
(``RLIMIT_FSIZE``; a write beyond it fails with EFBIG, the way a full disk fails with ENOSPC).
``--print-sizes`` prints ``size STEP BYTES`` of the trace after every step.
``--disk-full-after-rows`` makes every trace write fail with ENOSPC (a full disk) once the trace holds that many
step-log rows (only global rank 0 writes).
``--budget`` takes statistics steps by the overhead budget B (``every_n_steps="auto"``) instead of on every step, and
prints on each rank how many optional statistics steps it confirmed and how many statistics steps it took.
"""

import argparse
import errno
import os
import resource
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_tda.trace.writer  # noqa: E402
from lightning_tda import ClassificationTask, TDACallback  # noqa: E402
from lightning_tda.demo import MLPClassifier  # noqa: E402
from lightning_tda.layers.covariances import KFACStatistics  # noqa: E402
from lightning_tda.recording.cadence import BudgetCadence  # noqa: E402


def dataset(n: int = 256) -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return TensorDataset(torch.tensor(digits.data[:n], dtype=torch.float32) / 16.0, torch.tensor(digits.target[:n]))


class PauseAt(L.Callback):
    def __init__(self, step: int, file: Path) -> None:
        self.step, self.file = step, file

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(f"{self.file}.paused").touch()
            while not self.file.exists():
                time.sleep(0.05)


class PrintSizes(L.Callback):
    def __init__(self, trace: str) -> None:
        self.trace = trace

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"size {trainer.global_step} {os.path.getsize(self.trace)}", flush=True)


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fill_disk_after(rows: int) -> None:
    """Trace writes fail with ENOSPC once the file holds ``rows`` step-log rows."""
    reserve = lightning_tda.trace.writer.reserve_space

    def reserve_or_fail(file, extra: int = 0) -> None:
        if "steps/step" in file and file["steps/step"].shape[0] >= rows:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserve(file, extra)

    lightning_tda.trace.writer.reserve_space = reserve_or_fail


def count_calls(owner: type, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (in this process) in the returned one-element list."""
    calls, method = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(owner, name, counted)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--pause-at-step", type=int, default=None)
    parser.add_argument("--pause-file", type=Path, default=None)
    parser.add_argument("--file-size-limit", type=int, default=None)
    parser.add_argument("--print-sizes", action="store_true")
    parser.add_argument("--disk-full-after-rows", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None)
    args = parser.parse_args()
    confirmed, taken = count_calls(BudgetCadence, "confirm"), count_calls(KFACStatistics, "commit")
    if args.disk_full_after_rows is not None:
        fill_disk_after(args.disk_full_after_rows)
    if args.file_size_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, resource.RLIM_INFINITY))
    L.seed_everything(0, verbose=False)
    cadence = {"every_n_steps": 1} if args.budget is None else {"overhead_budget": args.budget, "strict_budget": False}
    tda = TDACallback(args.trace, task=ClassificationTask(), fisher="empirical", **cadence)
    callbacks = [tda]
    if args.print_sizes:
        callbacks.append(PrintSizes(args.trace))
    if args.pause_at_step is not None:
        callbacks.append(PauseAt(args.pause_at_step, args.pause_file))
    if args.kill_at_step is not None:
        callbacks.append(KillAt(args.kill_at_step))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        use_distributed_sampler=False,
    )
    model = MLPClassifier(sizes=[64, 32, 10], lr=0.1)
    # Rank r reads examples r, r + N, r + 2N, ... in order, so each step's global batch is the block of
    # consecutive examples that one process with N times the batch size reads (Lightning's own sampler shuffles).
    sampler = DistributedSampler(dataset(), args.devices, int(os.environ.get("LOCAL_RANK", 0)), shuffle=False)
    trainer.fit(model, DataLoader(dataset(), batch_size=args.batch_size, sampler=sampler))
    print(f"trained {trainer.global_step} steps", flush=True)
    if args.budget is not None:
        print(f"rank {trainer.global_rank}: confirmed {confirmed[0]}, took {taken[0]} statistics steps", flush=True)


if __name__ == "__main__":
    main()
