"""The check of influence functions' assumption (a converged optimum): quiet on the normal digits run,
a warning in EK-FAC IF's scores and in the report on an over-fitted run and on one stopped early."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import DigitsDataModule, MLPClassifier
from lightning_tda.methods import EKFACInfluence, MethodOptions
from lightning_tda.methods.convergence import SETTLED, check_convergence
from lightning_tda.reporting import build_report
from lightning_tda.reporting.html import render_html

TASK = ClassificationTask()


def traced_run(path, data, epochs: int, **model_options) -> Trace:
    L.seed_everything(0, verbose=False)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = MLPClassifier(**model_options)
    quiet_trainer(max_epochs=epochs, callbacks=[TDACallback(str(path), task=TASK)]).fit(model, loader)
    return Trace.open(path)


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    return dm


def influence(trace: Trace, queries, train):
    method = EKFACInfluence(trace, MLPClassifier(), TASK, options=MethodOptions(progress=False))
    return method.attribute(queries, train)


def test_quiet_on_the_normal_run(digits_run, digits, recwarn):
    """8 epochs on 1,438 digits: IF's LDS is close to SOURCE's there (BENCHMARKS.md), so no warning."""
    scores = influence(Trace.open(digits_run["path"]), TensorDataset(*digits.test_set[:4]), digits.train_set)
    assert scores.config["warnings"] == []
    assert scores.config["convergence"]["passes"] == pytest.approx(8.0)
    assert scores.config["convergence"]["settled"] > SETTLED
    assert not [w for w in recwarn if "EK-FAC IF" in str(w.message)]


def test_warns_on_an_over_fitted_run(digits, tmp_path):
    """100 examples for 80 epochs: the training loss goes to ~0 and the curvature with it."""
    train = TensorDataset(*digits.train_set[:100])
    trace = traced_run(tmp_path / "overfit.h5", train, epochs=80)
    queries = TensorDataset(*digits.test_set[:4])
    with pytest.warns(UserWarning, match="EK-FAC IF: Training ran only .* e-folds .* prefer SOURCE or TracInCP"):
        scores = influence(trace, queries, train)
    assert len(scores.config["warnings"]) == 1 and scores.config["convergence"]["settled"] < SETTLED
    html = render_html(build_report(scores, queries, train, k=2))
    assert "influence functions are unreliable here; prefer SOURCE or TracInCP" in html


def test_warns_on_a_run_stopped_early(digits, tmp_path):
    """2 epochs: the loss is still falling fast at the end."""
    trace = traced_run(tmp_path / "early.h5", digits.train_set, epochs=2)
    check = check_convergence(trace, None, len(digits.train_set))
    assert check.passes == pytest.approx(2.0) and check.loss_drop > 0.05
    assert len(check.warnings) == 1 and check.warnings[0].startswith("Training stopped early (2 passes")


def test_under_adamw_only_a_run_stopped_early_warns_and_the_advice_is_source(digits, digits_run, tmp_path):
    """AdamW: no curvature warning however flat the curvature (it fired on all 9 AdamW settings of the modern suite,
    including the 4 where IF was best); stopped early, the advice names SOURCE, the one method that beat IF there."""
    flat = {"net.0": 1e-12, "net.2": 1e-12, "net.4": 1e-12}
    sgd = check_convergence(Trace.open(digits_run["path"]), flat, len(digits.train_set))
    assert len(sgd.warnings) == 1 and sgd.warnings[0].endswith("prefer SOURCE or TracInCP.")
    trace = traced_run(tmp_path / "adamw.h5", digits.train_set, epochs=2, optimizer="adamw", lr=1e-3)
    check = check_convergence(trace, flat, len(digits.train_set))
    assert check.settled < SETTLED and check.passes == pytest.approx(2.0)
    assert len(check.warnings) == 1 and check.warnings[0].startswith("Training stopped early (2 passes")
    assert check.warnings[0].endswith("influence functions are unreliable here; prefer SOURCE.")
