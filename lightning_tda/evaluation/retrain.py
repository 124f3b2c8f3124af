"""Re-training on subsets of the training set, with an HDF5 cache and optional worker processes.

Every evaluation that needs counterfactual models (LDS, subset removal) goes through
:class:`RetrainRunner`: it trains ``train_fn(subset_indices, seed)`` for each requested
``(subset, seed)``, measures the queries on the trained model, and stores the per-query results in
an HDF5 file under a key made of the subset, the seed, the queries' contents and a user tag. A
later evaluation asking for the same ``(subset, seed, queries)`` reads the file instead of
training again, so the expensive ground truth is computed once and reused for every method; an
interrupted run resumes where it stopped.

The training function is the user's own: anything callable as ``train_fn(subset_indices, seed)``
returning the trained ``nn.Module``. :class:`LightningTrainFn` is a ready-made one that fits a
fresh LightningModule with a Lightning ``Trainer`` on ``Subset(train_set, subset_indices)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, default_collate

from lightning_tda.batches import Data, as_loader, move_to, tensors_of
from lightning_tda.tasks import ClassificationTask, Task
from lightning_tda.trace.schema import LIBVER

TrainFn = Callable[[np.ndarray, int], nn.Module]
QUERY_BATCH_SIZE = 256


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit info messages and data-loader hints while re-training many models."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*litlogger.*")
            warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class LightningTrainFn:
    """``train_fn(subset_indices, seed)`` that fits a fresh LightningModule on a subset with a ``Trainer``.

    Picklable when ``module_factory`` is (a class, or ``functools.partial`` of one), so it can run in
    worker processes. Use the same recipe (epochs, batch size, optimizer) as the run you attribute,
    otherwise the ground truth measures a different training procedure.

    Args:
        module_factory: returns a fresh, untrained LightningModule (e.g. ``partial(MLPClassifier, lr=0.1)``).
        train_set: the full map-style training set; subset indices refer to its positions.
        max_epochs: epochs per fit.
        batch_size: training batch size (batches are reshuffled each epoch with a seed-derived generator).
        trainer_kwargs: extra ``lightning.Trainer`` arguments.
        collate_fn: how the loader collates examples (``None``: PyTorch's default).
        shuffle: reshuffle the batches each epoch (with a generator seeded by the fit's seed).
        drop_last: drop each epoch's last incomplete batch.
    """

    def __init__(
        self,
        module_factory: Callable[[], nn.Module],
        train_set: Dataset,
        max_epochs: int = 8,
        batch_size: int = 64,
        trainer_kwargs: dict[str, Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if max_epochs < 1:
            raise ValueError(f"LightningTrainFn(max_epochs={max_epochs}): train for at least one epoch.")
        self.module_factory = module_factory
        self.train_set = train_set
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.drop_last = drop_last

    @classmethod
    def like(
        cls,
        loader: DataLoader,
        module_factory: Callable[[], nn.Module],
        max_epochs: int = 8,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> LightningTrainFn:
        """The recipe of an existing training ``loader`` (its dataset, batch size, collate function,
        whether it shuffles, ``drop_last``), re-trained on subsets of its dataset."""
        if loader.batch_size is None:
            raise ValueError(
                "LightningTrainFn.like: the training DataLoader has batch_size=None (a batch sampler or an "
                "iterable dataset); re-training on subsets needs a map-style dataset with a batch_size."
            )
        return cls(
            module_factory,
            loader.dataset,
            max_epochs=max_epochs,
            batch_size=loader.batch_size,
            trainer_kwargs=trainer_kwargs,
            collate_fn=None if loader.collate_fn is default_collate else loader.collate_fn,
            shuffle=isinstance(loader.sampler, RandomSampler),
            drop_last=loader.drop_last,
        )

    def cache_key(self) -> str:
        """Names the recipe and the training data in cache keys, so changing either re-trains.

        Built from ``repr`` of the module factory and trainer arguments (keep them free of object
        addresses, e.g. pass classes or ``functools.partial``), the loader options (a collate function by
        its qualified name) and a hash of the training set.
        """
        recipe = repr((self.module_factory, self.max_epochs, self.batch_size, sorted(self.trainer_kwargs.items())))
        if self.collate_fn is not None or not self.shuffle or self.drop_last:  # keys of the defaults stay as they were
            recipe += repr((_qualified_name(self.collate_fn), self.shuffle, self.drop_last))
        return hashlib.sha1((recipe + fingerprint(self.train_set)).encode()).hexdigest()

    def fit(self, subset_indices: Sequence[int] | np.ndarray, seed: int, callbacks: Sequence[Any] = ()) -> nn.Module:
        """Train a fresh module on ``train_set[subset_indices]``; ``callbacks`` e.g. a ``TDACallback``."""
        import lightning as L

        with quiet_lightning():
            L.seed_everything(int(seed), verbose=False)
            model = self.module_factory()
            loader = self.loader(subset_indices, seed)
            options = dict(max_epochs=self.max_epochs, num_sanity_val_steps=0, limit_val_batches=0)
            options.update(self.trainer_kwargs)
            trainer = headless_trainer(callbacks=list(callbacks), **options)
            trainer.fit(model, train_dataloaders=loader)
        return model.eval()

    def loader(self, subset_indices: Sequence[int] | np.ndarray, seed: int) -> DataLoader:
        """The training DataLoader of :meth:`fit` (shuffled by a generator seeded with ``seed``); a fresh
        one replays the fit's batch order (:func:`~lightning_tda.evaluation.replay_batches`)."""
        indices = np.asarray(subset_indices, dtype=np.int64)
        return DataLoader(
            Subset(self.train_set, indices.tolist()),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=torch.Generator().manual_seed(int(seed)),
            collate_fn=self.collate_fn,
            drop_last=self.drop_last,
        )

    def __call__(self, subset_indices: np.ndarray, seed: int) -> nn.Module:
        return self.fit(subset_indices, seed)


@dataclass
class Outcome:
    """What one re-trained model does on the queries.

    Attributes:
        measurement: ``(Q,)`` float64 ``task.measurement`` (lower is better).
        correct: ``(Q,)`` float64, 1.0 where the predicted class (arg-max) is the target, 0.0 where not;
            NaN unless the task is a :class:`~lightning_tda.tasks.ClassificationTask` with ``(B, C)`` outputs.
    """

    measurement: np.ndarray
    correct: np.ndarray


def measure(model: nn.Module, task: Task, queries: Data) -> Outcome:
    """Measure ``queries`` on ``model`` (eval mode, no gradients)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    measurements, correct = [], []
    with torch.no_grad():
        for batch in as_loader(queries, QUERY_BATCH_SIZE, "query"):
            batch = move_to(batch, device)
            outputs = task.forward(model, batch)
            targets = task.targets(batch)
            measurements.append(task.measurement_from_outputs(outputs, targets).double().cpu())
            if isinstance(task, ClassificationTask) and outputs.ndim == 2:
                correct.append((outputs.argmax(dim=1) == targets).double().cpu())
            else:
                correct.append(torch.full((len(targets),), float("nan"), dtype=torch.float64))
    return Outcome(torch.cat(measurements).numpy(), torch.cat(correct).numpy())


def _qualified_name(function: Any) -> str:
    """``module.qualname`` of a function or class (stable across processes, unlike its ``repr``)."""
    if function is None:
        return "None"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', None) or type(function).__module__}.{name}"


def fingerprint(queries: Data) -> str:
    """A hash of every tensor of the query set (inputs and targets, also in dict batches such as Hugging Face's),
    for cache keys."""
    digest = hashlib.sha1()
    for batch in as_loader(queries, QUERY_BATCH_SIZE, "query"):
        for tensor in tensors_of(batch):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _key(indices: np.ndarray, seed: int, query_fingerprint: str, tag: str) -> str:
    digest = hashlib.sha1(f"{tag}|{int(seed)}|{query_fingerprint}|".encode())
    digest.update(np.sort(np.asarray(indices, dtype=np.int64)).tobytes())
    return digest.hexdigest()


# --- worker processes ---------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(train_fn: TrainFn, task: Task, queries: Data, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(train_fn=train_fn, task=task, queries=queries)


def _train_and_measure(indices: np.ndarray, seed: int) -> Outcome:
    model = _WORKER["train_fn"](indices, seed)
    return measure(model, _WORKER["task"], _WORKER["queries"])


def default_start_method() -> str:
    """``"fork"`` where the platform has it and CUDA is not initialised in this process (a forked child cannot
    use an initialised CUDA context: attributing on a GPU before re-training would break every worker), else
    ``"spawn"``."""
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


@dataclass
class RetrainRunner:
    """Train-and-measure with a disk cache; see the module docstring.

    Args:
        train_fn: ``train_fn(subset_indices, seed) -> trained model``.
        task: gives the query measurement (and, for classification, whether each query is correct).
        queries: the query set (map-style dataset or tuple of tensors).
        cache: HDF5 file for the results (created if missing); ``None`` keeps nothing on disk.
        tag: names the training recipe in the cache key. A ``train_fn`` with a ``cache_key()`` method
            (like :class:`LightningTrainFn`) adds its own; for any other, use a different tag (or
            file) when ``train_fn`` changes, since the cache cannot see inside it.
        workers: processes to re-train in parallel (``1`` = in this process).
        threads_per_worker: torch threads in each worker.
        start_method: how workers start: ``"fork"`` (fast, nothing is pickled) or ``"spawn"`` (then
            ``train_fn``, ``task`` and the queries must be picklable and the calling script needs an
            ``if __name__ == "__main__"`` guard). Default (:func:`default_start_method`): fork where available,
            spawn once this process has initialised CUDA, which a forked child cannot use.
    """

    train_fn: TrainFn
    task: Task
    queries: Data
    cache: str | os.PathLike | None = None
    tag: str = ""
    workers: int = 1
    threads_per_worker: int = 1
    start_method: str | None = None
    num_trained: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: use 1 (train in this process) or more.")
        self.query_fingerprint = fingerprint(self.queries)
        recipe = getattr(self.train_fn, "cache_key", None)
        self.recipe_key = f"{self.tag}|{recipe()}" if callable(recipe) else self.tag

    def _read(self, keys: list[str]) -> dict[str, Outcome]:
        """The cached outcomes among ``keys``. The cache is someone else's file: each outcome must be two
        float ``(Q,)`` vectors, and a file HDF5 cannot read is an error naming the fix."""
        if self.cache is None or not Path(self.cache).exists():
            return {}
        found = {}
        expected = (len(as_loader(self.queries, QUERY_BATCH_SIZE, "query").dataset),)
        try:
            with h5py.File(self.cache, "r") as f:
                group = f.get("retrains")
                if not isinstance(group, h5py.Group):
                    return {}
                for key in keys:
                    entry = group.get(key)
                    if entry is None:
                        continue
                    arrays = {name: entry.get(name) for name in ("measurement", "correct")}
                    if not all(
                        isinstance(a, h5py.Dataset) and a.shape == expected and a.dtype.kind == "f"
                        for a in arrays.values()
                    ):
                        raise ValueError(f"entry retrains/{key} does not hold two float vectors of shape {expected}")
                    found[key] = Outcome(*(np.asarray(arrays[n], dtype=np.float64) for n in ("measurement", "correct")))
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ValueError(
                f"The re-training cache {self.cache} cannot be read ({str(err)[:200]}); delete it to re-train "
                f"from scratch, or pass another cache path."
            ) from err
        return found

    def _write(self, key: str, indices: np.ndarray, seed: int, outcome: Outcome) -> None:
        """Store one outcome, the file open only for this write: a run killed between two fits leaves a
        complete cache, and the next run resumes from it."""
        if self.cache is None:
            return
        with h5py.File(self.cache, "a", libver=LIBVER) as f:
            group = f.require_group("retrains")
            if key in group:
                del group[key]
            entry = group.create_group(key)
            entry.create_dataset("measurement", data=outcome.measurement)
            entry.create_dataset("correct", data=outcome.correct)
            entry.attrs.update(seed=int(seed), subset_size=len(indices), tag=self.tag)

    def run(
        self, jobs: Sequence[tuple[np.ndarray, int]], progress: Callable[[int, int], None] | None = None
    ) -> list[Outcome]:
        """Outcomes of ``jobs`` (``(subset_indices, seed)`` pairs), in order; trains only what the cache lacks."""
        keys = [_key(indices, seed, self.query_fingerprint, self.recipe_key) for indices, seed in jobs]
        results = self._read(keys)
        missing = {key: job for key, job in zip(keys, jobs) if key not in results}
        if not missing:
            return [results[key] for key in keys]
        if self.cache is not None:
            Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
        for done, (key, outcome) in enumerate(self._train(missing), start=1):
            indices, seed = missing[key]
            self._write(key, indices, seed, outcome)
            results[key] = outcome
            self.num_trained += 1
            if progress is not None:
                progress(done, len(missing))
        return [results[key] for key in keys]

    def _train(self, missing: dict[str, tuple[np.ndarray, int]]) -> Iterator[tuple[str, Outcome]]:
        if not missing:  # everything cached: no pool (a pool of zero workers is an error)
            return
        if self.workers == 1 or len(missing) == 1:
            for key, (indices, seed) in missing.items():
                yield key, measure(self.train_fn(np.asarray(indices), int(seed)), self.task, self.queries)
            return
        context = multiprocessing.get_context(self.start_method or default_start_method())
        with ProcessPoolExecutor(
            max_workers=min(self.workers, len(missing)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(self.train_fn, self.task, self.queries, self.threads_per_worker),
        ) as pool:
            futures = {
                pool.submit(_train_and_measure, np.asarray(indices), int(seed)): key
                for key, (indices, seed) in missing.items()
            }
            for future in as_completed(futures):
                yield futures[future], future.result()


def headless_trainer(**overrides: Any) -> Any:
    """A one-process CPU ``Trainer`` without logger, checkpoints, progress bar or model summary.

    What tests, benchmarks and re-training loops want; ``overrides`` are any other ``Trainer`` arguments.
    """
    import lightning as L

    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **overrides})
