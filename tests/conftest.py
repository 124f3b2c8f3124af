"""Shared fixtures: a digits MLP trained with TDACallback, an offline W&B sandbox, and known scores for reports."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest

_WANDB_ROOT = tempfile.mkdtemp(prefix="lightning_tda_wandb_")
for key, sub in (
    ("WANDB_DIR", "dir"),
    ("WANDB_CACHE_DIR", "cache"),
    ("WANDB_DATA_DIR", "data"),
    ("WANDB_CONFIG_DIR", "config"),
):
    os.environ.setdefault(key, os.path.join(_WANDB_ROOT, sub))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def pytest_configure(config):
    """One torch thread: the tests' tensors are tiny, and threads only add contention on 2 cores."""
    import torch

    torch.set_num_threads(1)


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (tests only)."""
    from lightning_tda.demo import headless_trainer

    return headless_trainer(**{"num_sanity_val_steps": 0, "limit_val_batches": 0, **kwargs})


def similarity_scores(train, test, query_ids):
    """Scores with a known structure for the report tests: the cosine similarity of query and training digits,
    positive for the same label and negative for another, ``(len(query_ids), len(train))`` float32."""
    import torch.nn.functional as F

    x_train, y_train = train.tensors
    x_query, y_query = test.tensors[0][query_ids], test.tensors[1][query_ids]
    same_label = (y_query[:, None] == y_train[None, :]).float() * 2 - 1
    return (F.normalize(x_query, dim=1) @ F.normalize(x_train, dim=1).T) * same_label


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A 64-128-128-10 MLP trained 8 epochs on digits with the callback (3 segments, true Fisher).

    Returns a dict with the trace path, the data module (``train_set``/``test_set``) and a factory
    for fresh model instances.
    """
    import lightning as L

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("digits") / "trace.h5"
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = MLPClassifier(lr=0.1, momentum=0.9)
    # 4 statistics steps per segment whatever the machine's speed (within the budget, the number depends on it)
    callback = TDACallback(str(path), task=ClassificationTask(), strict_budget=False)
    trainer = quiet_trainer(max_epochs=8, callbacks=[callback])
    trainer.fit(model, dm)
    return {"path": path, "datamodule": dm, "model_factory": MLPClassifier, "final_model": model}
