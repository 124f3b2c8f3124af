"""Every method reports in one unit, the predicted change of the query's measurement when the training
example is removed: on the digits and Concrete runs the largest scores are in a range a single example
can plausibly move a loss (before: Forward-INF up to 1e10, DataInf up to 1e5, EK-FAC IF and SOURCE N x)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import TensorDataset

from lightning_tda import ClassificationTask, RegressionTask, TDACallback, Trace
from lightning_tda.demo import ConcreteDataModule, MLPRegressor
from lightning_tda.methods import SOURCE, DataInf, EKFACInfluence, ForwardINF, MethodOptions, TracInCP

METHODS = [SOURCE, EKFACInfluence, TracInCP, DataInf, ForwardINF]
UNIT = "predicted change of the query's measurement when the training example is removed"


@pytest.fixture(scope="module")
def concrete(tmp_path_factory):
    """The Concrete MLP (8-64-64-1) trained 15 epochs with the callback."""
    L.seed_everything(0, verbose=False)
    dm = ConcreteDataModule(batch_size=64, seed=0)
    path = tmp_path_factory.mktemp("concrete") / "trace.h5"
    quiet_trainer(max_epochs=15, callbacks=[TDACallback(str(path), task=RegressionTask())]).fit(MLPRegressor(), dm)
    return {"trace": Trace.open(path), "dm": dm, "model": MLPRegressor, "task": RegressionTask()}


@pytest.fixture(scope="module")
def digits(digits_run):
    return {
        "trace": Trace.open(digits_run["path"]),
        "dm": digits_run["datamodule"],
        "model": digits_run["model_factory"],
        "task": ClassificationTask(),
    }


@pytest.mark.parametrize("run", ["digits", "concrete"])
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_top_scores_are_plausible_changes_of_the_query_loss(run, cls, request):
    case = request.getfixturevalue(run)
    train = TensorDataset(*case["dm"].train_set[:150])  # N stays the 1,438 / 824 trained on (the trace's record)
    queries = TensorDataset(*case["dm"].test_set[:6])
    method = cls(case["trace"], case["model"](), case["task"], options=MethodOptions(progress=False))
    scores = method.attribute(queries, train)
    assert scores.config["unit"].startswith(UNIT)
    top = scores.values.abs().amax(dim=1)
    # One of ~1,000 examples moves a query's loss (cross-entropy in nats, squared error of a standardized
    # target) by well under 1 typically, never by 10; and the scores do not vanish either.
    assert 1e-6 < float(top.median()) < 1, top
    assert float(top.max()) < 10, top
    assert torch.isfinite(scores.values).all()
