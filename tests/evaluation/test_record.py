"""What `lightning-tda evaluate` keeps and decides: the method to trust, the evaluation saved in a trace and
read back as untrusted input, the replay check of the step losses, the re-training cache read as untrusted
input, a loader's recipe copied for re-training, and the LDS shown beside exactly the scores it measured."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, Scores
from lightning_tda.evaluation import LightningTrainFn, RetrainRunner
from lightning_tda.evaluation.record import Evaluation, MethodLDS, scores_digest
from lightning_tda.evaluation.reproducibility import NotReproducibleError, StepLossRecorder, check_replay
from lightning_tda.reporting import TextRenderer, build_report, render_html
from lightning_tda.trace.checks import TraceError


def _measured(method: str, mean: float, low: float, high: float, queries: int = 3) -> MethodLDS:
    per_query = np.full(queries, np.nan) if math.isnan(mean) else np.linspace(low, high, queries)
    return MethodLDS(method, mean, low, high, per_query, "digest-" + method)


def _evaluation(*methods: MethodLDS) -> Evaluation:
    return Evaluation(list(methods), 20, 1, 0.5, "test", [0, 1, 2], 0.95, "ground_truth.h5")


# --- which method to trust ------------------------------------------------------------------------
def test_the_method_to_trust_is_clearly_above_the_others_and_above_zero():
    trusted, sentence = _evaluation(_measured("source", 0.6, 0.5, 0.7), _measured("tracin", 0.3, 0.1, 0.5)).verdict()
    assert trusted == "source"
    assert sentence.startswith("Trust source on this model: its LDS 0.600 has a 95% interval [0.500, 0.700]")
    assert "tracin 0.300 [0.100, 0.500]" in sentence


@pytest.mark.parametrize(
    "methods, reason",
    [
        # the best interval reaches below the runner-up's estimate
        ((("source", 0.6, 0.35, 0.7), ("tracin", 0.4, 0.2, 0.5)), "source's LDS interval reaches down to 0.350"),
        # alone but not above zero: it predicts nothing
        ((("source", 0.1, -0.05, 0.2),), "not above 0.000"),
        # a sign flip: every method anti-correlated with the ground truth
        ((("source", -0.6, -0.7, -0.5), ("tracin", -0.7, -0.8, -0.6)), "not above 0.000"),
        ((("source", math.nan, math.nan, math.nan),), "no method has a defined LDS"),
    ],
)
def test_no_clear_winner_names_the_numbers(methods, reason):
    trusted, sentence = _evaluation(*(_measured(*m) for m in methods)).verdict()
    assert trusted is None and sentence.startswith("No clear winner") and reason in sentence, sentence
    for name, *_ in methods:
        assert name in sentence


# --- the evaluation in a trace --------------------------------------------------------------------
def _scores() -> Scores:
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.0
    return Scores(values, torch.arange(4), torch.tensor([0, 1, 2]), "source", {"unit": "loss change"})


def test_the_evaluation_is_saved_beside_the_scores_and_read_back(tmp_path):
    path = tmp_path / "trace.h5"
    scores = _scores()
    scores.save(path)
    assert Evaluation.load(path) is None
    measured = MethodLDS("source", 0.5, 0.25, 0.75, np.array([0.25, np.nan, 0.75]), scores_digest(scores))
    evaluation = _evaluation(measured, _measured("tracin", math.nan, math.nan, math.nan))
    evaluation.save(path)
    evaluation.save(path)  # evaluating again replaces the entry
    loaded = Evaluation.load(path)
    assert loaded.to_dict() == evaluation.to_dict()
    np.testing.assert_array_equal(loaded.method("source").per_query, [0.25, np.nan, 0.75])
    assert not loaded.method("tracin").defined
    assert Scores.available(path) == ["source"]  # the evaluation is no scores
    with pytest.raises(KeyError, match="are an evaluation; read them with Evaluation.load"):
        Scores.load(path, "evaluation")


def _tampered(path, change) -> None:
    with h5py.File(path, "a") as f:
        data = json.loads(f["results/evaluation/summary"][()].decode())
        change(data)
        del f["results/evaluation/summary"]
        f["results/evaluation"].create_dataset("summary", data=np.bytes_(json.dumps(data)))


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.update(format=2), "format: is 2, expected an integer between 1 and 1"),
        (lambda d: d["methods"][0].update(mean=0.9), "methods[0]: has a mean outside its confidence interval"),
        (lambda d: d["methods"][0].update(per_query=[0.1]), "methods[0].per_query: is not a list of 3 numbers"),
        (lambda d: d["methods"][0].update(ci_low="low"), "methods[0].ci_low: is str 'low', expected a number"),
        (lambda d: d["methods"][0].update(mean=None), "methods[0]: has per-query LDS values but no mean"),
        (lambda d: d.update(query_ids=[0, -1, 2]), "query_ids: is -1, expected an integer at least 0"),
        (lambda d: d.update(fraction=1.5), "has a fraction or confidence outside (0, 1)"),
        (lambda d: d.pop("num_subsets"), "has no 'num_subsets'"),
    ],
)
def test_a_tampered_evaluation_is_refused_naming_the_field(change, problem, tmp_path):
    path = tmp_path / "trace.h5"
    _evaluation(_measured("source", 0.5, 0.25, 0.75)).save(path)
    _tampered(path, change)
    with pytest.raises(TraceError, match="results/evaluation/summary") as raised:
        Evaluation.load(path)
    assert problem in str(raised.value)


# --- the replay check -----------------------------------------------------------------------------
def test_a_replay_with_the_recorded_losses_passes_and_any_other_is_refused():
    recorded = np.array([2.3, 2.1, np.nan, 1.7, 1.5])
    assert check_replay(recorded, [2.3, 2.1 * (1 + 1e-6), np.nan, 1.7], seed=7, where="The config c.yaml") == 4
    with pytest.raises(NotReproducibleError) as raised:
        check_replay(recorded, [2.3, 2.1, np.nan, 1.7 * 1.001, 1.5], seed=7, where="The config c.yaml")
    message = str(raised.value)
    assert message.startswith("The config c.yaml: training is not reproducible")
    assert "seed_everything=7 gave a loss of 1.7017 at step 4 where the trace recorded 1.7." in message
    with pytest.raises(NotReproducibleError, match="took no optimizer step"):
        check_replay(recorded, [], seed=7, where="The config c.yaml")
    assert check_replay(recorded, recorded, seed=7, where="The config c.yaml", planned_steps=5) == 5
    with pytest.raises(NotReproducibleError, match="this recipe trains 10 optimizer steps but the trace recorded 5"):
        check_replay(recorded, recorded, seed=7, where="The config c.yaml", planned_steps=10)


def test_the_step_loss_recorder_sums_micro_batches_and_stops_after_its_steps():
    from conftest import quiet_trainer

    from lightning_tda.demo import MLPClassifier

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = MLPClassifier(sizes=[4, 6, 2], lr=0.1)
    recorder = StepLossRecorder(max_steps=3)
    quiet_trainer(max_epochs=5, accumulate_grad_batches=2, callbacks=[recorder]).fit(model, loader)
    torch.manual_seed(0)
    reference = MLPClassifier(sizes=[4, 6, 2], lr=0.1)
    optimizer = reference.configure_optimizers()
    expected = []
    for step in range(3):  # what TDACallback logs per optimizer step: the sum of its micro-batch losses
        total = 0.0
        for xb, yb in [(x[i : i + 8], y[i : i + 8]) for i in (16 * step, 16 * step + 8)]:
            loss = nn.functional.cross_entropy(reference(xb), yb) / 2
            loss.backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(total)
    np.testing.assert_allclose(recorder.losses, expected, rtol=1e-5)
    assert recorder.planned_steps == 5 * 64 // 16  # 5 epochs of 4 optimizer steps, though it stopped after 3


# --- the re-training cache and recipe -------------------------------------------------------------
class _Constant:
    """``train_fn`` returning a linear model whose output depends on the seed only."""

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.copy_(torch.tensor([float(seed), 0.0]))
        return model


def test_a_damaged_retraining_cache_is_refused_with_the_fix(tmp_path):
    queries = (torch.randn(3, 2), torch.tensor([0, 1, 0]))
    cache = tmp_path / "ground_truth.h5"
    runner = RetrainRunner(_Constant(), ClassificationTask(), queries, cache=cache)
    jobs = [(np.array([0, 1]), 0), (np.array([1, 2]), 1)]
    first = runner.run(jobs)
    again = RetrainRunner(_Constant(), ClassificationTask(), queries, cache=cache, workers=2)  # nothing to start
    np.testing.assert_array_equal(again.run(jobs)[1].measurement, first[1].measurement)
    assert again.num_trained == 0
    with h5py.File(cache, "a") as f:
        key = next(iter(f["retrains"]))
        del f["retrains"][key]["measurement"]
        f["retrains"][key].create_dataset("measurement", data=np.zeros(5))
    with pytest.raises(ValueError, match="does not hold two float vectors of shape \\(3,\\).*delete it to re-train"):
        RetrainRunner(_Constant(), ClassificationTask(), queries, cache=cache).run(jobs)
    cache.write_bytes(b"not an HDF5 file")
    with pytest.raises(ValueError, match="cannot be read"):
        RetrainRunner(_Constant(), ClassificationTask(), queries, cache=cache).run(jobs)


def _pairs(batch: list) -> tuple:
    return torch.stack([x for x, _ in batch]) * 2, torch.stack([y for _, y in batch])


def test_a_train_fn_like_a_loader_copies_its_recipe_and_keys_it_stably():
    data = TensorDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10) % 2)
    loader = DataLoader(data, batch_size=4, shuffle=False, drop_last=True, collate_fn=_pairs)
    train_fn = LightningTrainFn.like(loader, nn.Linear, max_epochs=2)
    subset = train_fn.loader(np.array([1, 3, 5, 7, 9]), seed=0)
    batches = list(subset)
    assert len(batches) == 1 and batches[0][0].tolist() == (data.tensors[0][[1, 3, 5, 7]] * 2).tolist()
    key = train_fn.cache_key()
    assert key == LightningTrainFn.like(loader, nn.Linear, max_epochs=2).cache_key()  # no object address in it
    shuffled = DataLoader(data, batch_size=4, shuffle=True, drop_last=True, collate_fn=_pairs)
    assert LightningTrainFn.like(shuffled, nn.Linear, max_epochs=2).cache_key() != key
    plain = LightningTrainFn(nn.Linear, data, max_epochs=2, batch_size=4)
    assert LightningTrainFn.like(DataLoader(data, batch_size=4, shuffle=True), nn.Linear, 2).cache_key() == (
        plain.cache_key()
    )  # the default recipe keeps the keys caches were written with


# --- the report shows the LDS beside the scores it measured ---------------------------------------
def test_the_report_shows_the_lds_only_beside_the_scores_it_measured():
    train = TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    queries = TensorDataset(torch.randn(3, 2), torch.tensor([1, 0, 1]))
    scores = _scores()
    changed = Scores(scores.values + 1, scores.train_ids, scores.query_ids, "tracin")
    evaluation = _evaluation(
        MethodLDS("source", 0.6, 0.5, 0.7, np.array([0.5, 0.6, 0.7]), scores_digest(scores)),
        MethodLDS("tracin", 0.2, 0.1, 0.3, np.array([0.1, 0.2, 0.3]), scores_digest(scores)),  # not `changed`
    )
    content = build_report([scores, changed], queries, train, k=1, renderer=TextRenderer(), evaluation=evaluation)
    source, tracin = content.methods
    assert source.lds is evaluation.methods[0] and tracin.lds is None and "changed since" in tracin.lds_note
    assert content.scalars()["tda/source/lds"] == 0.6 and "tda/tracin/lds" not in content.scalars()
    assert content.notes()["tda/evaluation/verdict"] == evaluation.verdict()[1]
    html = render_html(content)
    assert '<p class="lds" data-method="source">Measured LDS on this model: 0.600 [0.500, 0.700].</p>' in html
    assert 'data-method="tracin">Measured LDS' not in html
    assert "Trust source on this model" in html
