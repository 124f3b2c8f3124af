"""Evaluation harness: LDS on exactly solvable least squares, caching, counterfactuals, detection metrics."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_tda import ClassificationTask, RegressionTask, Scores
from lightning_tda.evaluation import (
    CounterfactualResult,
    LDSResult,
    LightningTrainFn,
    RetrainRunner,
    draw_subsets,
    lds,
    lds_ground_truth,
    leakage_detection,
    log_to_wandb,
    measure,
    mislabel_detection,
    plot_counterfactual,
    plot_lds,
    plot_leakage,
    plot_mislabel,
    subset_removal,
)


# --- an exactly solvable model: ordinary least squares ------------------------------------------
def ols_data(n: int = 1000, d: int = 4, q: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + q, d))
    y = x @ rng.normal(size=d) + 0.5 + rng.normal(scale=1.0, size=n + q)
    return (torch.tensor(x[:n]), torch.tensor(y[:n])), (torch.tensor(x[n:]), torch.tensor(y[n:]))


class OLSFit:
    """``train_fn``: least squares with intercept fitted exactly on the subset (seed unused)."""

    def __init__(self, train) -> None:
        self.x, self.y = train
        self.calls = 0

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        self.calls += 1
        x, y = self.x[indices], self.y[indices]
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        theta = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
        model = nn.Linear(x.shape[1], 1).double()
        with torch.no_grad():
            model.weight.copy_(theta[:-1][None])
            model.bias.copy_(theta[-1:])
        return model


def exact_influence(train, queries) -> torch.Tensor:
    """τ(q, m) = ∇ℓ_qᵀ H⁻¹ ∇ℓ_m for the full least-squares fit (positive = helpful)."""
    (x, y), (xq, yq) = train, queries
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    design_q = torch.cat([xq, torch.ones(len(xq), 1, dtype=x.dtype)], dim=1)
    theta = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    grads = 2 * design * (design @ theta - y)[:, None]
    grads_q = 2 * design_q * (design_q @ theta - yq)[:, None]
    hessian = 2 * design.T @ design / len(x)
    return grads_q @ torch.linalg.solve(hessian, grads.T) / len(x)


def test_lds_exact_influence_on_least_squares_is_one_and_shuffled_is_zero(tmp_path):
    train, queries = ols_data()
    fit = OLSFit(train)
    truth = lds_ground_truth(fit, RegressionTask(), queries, len(train[0]), num_subsets=60, cache=tmp_path / "gt.h5")
    assert truth.measurements.shape == (60, 1, 12) and fit.calls == 60

    scores = exact_influence(train, queries)
    exact = lds(scores, truth)
    assert exact.mean > 0.95 and exact.ci_low > 0.9, exact
    assert exact.ci_low <= exact.mean <= exact.ci_high

    flipped_sign = lds(-scores, truth)
    assert flipped_sign.mean < -0.95  # the sign convention matters: helpful = lowers the loss

    rng = np.random.default_rng(1)
    shuffled = scores[:, torch.from_numpy(rng.permutation(scores.shape[1]))]
    baseline = lds(shuffled, truth)
    assert abs(baseline.mean) < 0.15, baseline
    assert baseline.ci_low < 0.0 < baseline.ci_high or abs(baseline.mean) < 0.1


def test_ground_truth_is_cached_and_a_second_evaluation_does_not_retrain(tmp_path):
    train, queries = ols_data(n=80, q=5)
    cache = tmp_path / "gt.h5"
    fit = OLSFit(train)
    first = lds_ground_truth(fit, RegressionTask(), queries, 80, num_subsets=6, num_seeds=2, cache=cache)
    assert fit.calls == 12 and first.num_trained == 12

    second = lds_ground_truth(fit, RegressionTask(), queries, 80, num_subsets=6, num_seeds=2, cache=cache)
    assert fit.calls == 12 and second.num_trained == 0
    np.testing.assert_array_equal(first.measurements, second.measurements)

    # More subsets from the same draw: only the new ones train. Other queries or tag: a fresh ground truth.
    lds_ground_truth(fit, RegressionTask(), queries, 80, num_subsets=8, num_seeds=2, cache=cache)
    assert fit.calls == 16
    other = (queries[0][:3], queries[1][:3])
    lds_ground_truth(fit, RegressionTask(), other, 80, num_subsets=6, num_seeds=2, cache=cache)
    assert fit.calls == 28
    lds_ground_truth(fit, RegressionTask(), queries, 80, num_subsets=6, num_seeds=2, cache=cache, tag="other-recipe")
    assert fit.calls == 40


def test_a_train_fn_cache_key_separates_recipes(tmp_path):
    train, queries = ols_data(n=50, q=3)

    class KeyedFit(OLSFit):
        def __init__(self, train, recipe: str) -> None:
            super().__init__(train)
            self.recipe = recipe

        def cache_key(self) -> str:
            return self.recipe

    first, same, other = KeyedFit(train, "a"), KeyedFit(train, "a"), KeyedFit(train, "b")
    for fit in (first, same, other):
        lds_ground_truth(fit, RegressionTask(), queries, 50, num_subsets=3, cache=tmp_path / "gt.h5")
    assert (first.calls, same.calls, other.calls) == (3, 0, 3)


def test_lightning_train_fn_cache_key_follows_recipe_and_data():
    from lightning_tda.demo import MLPClassifier

    data = (torch.randn(20, 64), torch.randint(0, 10, (20,)))
    factory = functools.partial(MLPClassifier, lr=0.1)
    key = LightningTrainFn(factory, TensorDataset(*data)).cache_key()
    assert key == LightningTrainFn(functools.partial(MLPClassifier, lr=0.1), TensorDataset(*data)).cache_key()
    assert key != LightningTrainFn(functools.partial(MLPClassifier, lr=0.2), TensorDataset(*data)).cache_key()
    assert key != LightningTrainFn(factory, TensorDataset(*data), max_epochs=3).cache_key()
    assert key != LightningTrainFn(factory, TensorDataset(data[0] + 1, data[1])).cache_key()


def test_parallel_workers_give_the_same_ground_truth(tmp_path):
    train, queries = ols_data(n=60, q=4)
    serial = lds_ground_truth(OLSFit(train), RegressionTask(), queries, 60, num_subsets=4)
    parallel = lds_ground_truth(OLSFit(train), RegressionTask(), queries, 60, num_subsets=4, workers=2)
    np.testing.assert_allclose(serial.measurements, parallel.measurements)


def test_lds_skips_queries_whose_measurement_never_changes():
    from lightning_tda.evaluation import GroundTruth

    subsets = draw_subsets(6, 8, 0.5, seed=0)
    masks = np.zeros((8, 6))
    np.put_along_axis(masks, subsets, 1.0, axis=1)
    tau = np.array([[1.0, -2.0, 0.5, 3.0, 0.0, 1.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    measurements = np.stack([-(masks @ tau[0]), np.full(8, 2.0)], axis=1)[:, None, :]  # query 1 is constant
    result = lds(torch.tensor(tau), GroundTruth(subsets, np.array([0]), measurements, 6))
    assert result.per_query[0] == pytest.approx(1.0) and np.isnan(result.per_query[1])
    assert result.mean == pytest.approx(1.0)


def test_lds_rejects_mismatched_scores_and_bad_subsets():
    train, queries = ols_data(n=40, q=3)
    truth = lds_ground_truth(OLSFit(train), RegressionTask(), queries, 40, num_subsets=3)
    with pytest.raises(ValueError, match="do not match"):
        lds(torch.zeros(3, 39), truth)
    with pytest.raises(ValueError, match="self-influence"):
        lds(Scores(torch.zeros(40), torch.arange(40), None, "x", kind="self"), truth)
    with pytest.raises(ValueError, match="fraction"):
        draw_subsets(40, 10, fraction=1.0)
    with pytest.raises(ValueError, match="workers"):
        RetrainRunner(OLSFit(train), RegressionTask(), queries, workers=0)
    subsets = draw_subsets(40, 5, 0.5, seed=3)
    assert subsets.shape == (5, 20) and (np.diff(subsets, axis=1) > 0).all()
    np.testing.assert_array_equal(subsets, draw_subsets(40, 5, 0.5, seed=3))


# --- counterfactual on a 1-nearest-neighbour classifier (known answer) ------------------------------
class NearestNeighbour(nn.Module):
    """Logit of class c = -(distance to the nearest training example of class c)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("x", x)
        self.register_buffer("y", y)
        self.classes = classes
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(inputs, self.x)
        logits = torch.full((len(inputs), self.classes), -1e6)
        for c in range(self.classes):
            if (self.y == c).any():
                logits[:, c] = -distance[:, self.y == c].min(dim=1).values
        return logits


class NearestNeighbourFit:
    def __init__(self, train) -> None:
        self.x, self.y = train

    def __call__(self, indices: np.ndarray, seed: int) -> nn.Module:
        return NearestNeighbour(self.x[indices], self.y[indices], 2)


def test_subset_removal_flips_when_the_supporting_examples_are_removed(tmp_path):
    # Class-0 queries sit on a tight cluster of 3 class-0 examples inside a ring of class-1 examples.
    rng = np.random.default_rng(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    xs, ys = [], []
    for centre in centres:
        xs.append(centre + 0.01 * torch.tensor(rng.normal(size=(3, 2))))
        ys.append(torch.zeros(3, dtype=torch.long))
        angles = torch.linspace(0, 2 * np.pi, 9)[:-1]
        xs.append(centre + torch.stack([angles.cos(), angles.sin()], dim=1))
        ys.append(torch.ones(8, dtype=torch.long))
    train = (torch.cat(xs).float(), torch.cat(ys))
    queries = (centres.float(), torch.zeros(4, dtype=torch.long))
    helpful = -torch.cdist(queries[0], train[0]) * (train[1] == 0)  # same-class closeness
    helpful = helpful + (train[1] == 0).float() * 100

    fit = NearestNeighbourFit(train)
    result = subset_removal(
        helpful, fit, ClassificationTask(), queries, ks=(1, 3), max_queries=None, cache=tmp_path / "cf.h5"
    )
    np.testing.assert_array_equal(result.queries, np.arange(4))
    np.testing.assert_allclose(result.flip_fraction, [0.0, 1.0])  # all 3 supporters must go
    assert (result.random_flip_fraction <= 0.25).all()
    assert set(result.scalars()) == {
        "counterfactual/flip@1",
        "counterfactual/random_flip@1",
        "counterfactual/flip@3",
        "counterfactual/random_flip@3",
    }
    with pytest.raises(ValueError, match="ClassificationTask"):
        subset_removal(helpful, fit, RegressionTask(), queries, ks=(1,))
    with pytest.raises(ValueError, match="ks="):
        subset_removal(helpful, fit, ClassificationTask(), queries, ks=(len(train[0]),))


# --- detection metrics on hand-made scores -----------------------------------------------------
def test_mislabel_auc_and_curve_on_known_values():
    self_influence = Scores(torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2]), torch.arange(5), None, "x", kind="self")
    flipped = torch.tensor([True, False, False, True, False])
    result = mislabel_detection(self_influence, flipped)
    assert result.auc == pytest.approx(5 / 6)  # 0.9 beats all 3 clean, 0.7 beats 2 of 3
    np.testing.assert_allclose(result.fraction_found, [0, 0.5, 0.5, 1.0, 1.0, 1.0])
    assert result.found_at(0.4) == 0.5 and result.found_at(0.6) == 1.0
    # Only the order matters: raw self-influence values far outside [0, 1] give the same result.
    rescaled = mislabel_detection(torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2]) * 1e4 - 50, flipped)
    assert rescaled.auc == pytest.approx(5 / 6)

    # Validation influence: suspicion = -Σ_q τ(q, m); example 2 hurts the clean queries most.
    validation = torch.tensor([[1.0, 0.5, -2.0, 0.3], [0.5, 0.5, -1.0, 0.2]])
    perfect = mislabel_detection(validation, torch.tensor([False, False, True, False]))
    assert perfect.auc == 1.0 and perfect.found_at(0.25) == 1.0
    with pytest.raises(ValueError, match="some, but not all"):
        mislabel_detection(validation, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        mislabel_detection(validation, torch.zeros(3, dtype=torch.bool))


def test_leakage_top_k_rates_on_known_ranks():
    scores = torch.zeros(4, 12)
    scores[:, :] = torch.arange(12, dtype=torch.float32).flip(0)  # example 0 scores highest, 11 lowest
    duplicates = torch.tensor([0, 3, 7, 11])  # ranks 1, 4, 8, 12
    result = leakage_detection(scores, duplicates, ks=(1, 5, 10))
    np.testing.assert_array_equal(result.ranks, [1, 4, 8, 12])
    assert result.top_k == {1: 0.25, 5: 0.5, 10: 0.75}
    tied = leakage_detection(torch.ones(1, 5), [2], ks=(1,))
    assert tied.ranks[0] == 5 and tied.top_k[1] == 0.0  # ties count against the duplicate
    with pytest.raises(ValueError, match="duplicate"):
        leakage_detection(scores, duplicates[:2])

    # A loud example (large gradient, large self-influence) outranks the duplicate until normalized.
    raw = torch.tensor([[2.0, 1.0, 0.1], [3.0, 0.2, 1.0]])  # duplicates: example 1 for q0, example 2 for q1
    self_influence = torch.tensor([100.0, 1.0, 1.0])
    assert leakage_detection(raw, [1, 2], ks=(1,)).top_k[1] == 0.0
    normalized = leakage_detection(raw, [1, 2], ks=(1,), self_influence=self_influence)
    np.testing.assert_array_equal(normalized.ranks, [1, 1])
    with pytest.raises(ValueError, match="self_influence"):
        leakage_detection(raw, [1, 2], self_influence=torch.ones(2))


# --- the ready-made Lightning training function, plots and W&B ----------------------------------
def test_lightning_train_fn_trains_a_demo_module_reproducibly():
    from lightning_tda.demo import DigitsDataModule, MLPClassifier

    dm = DigitsDataModule(seed=0)
    dm.setup()
    train_fn = LightningTrainFn(functools.partial(MLPClassifier, lr=0.1), dm.train_set, max_epochs=2)
    subset = np.arange(0, 600)
    first = measure(train_fn(subset, 0), ClassificationTask(), dm.test_set)
    again = measure(train_fn(subset, 0), ClassificationTask(), dm.test_set)
    np.testing.assert_allclose(first.measurement, again.measurement, rtol=1e-5)  # same seed, same model
    assert first.correct.mean() > 0.5  # two epochs on 600 digits: well above the 10% of chance
    with pytest.raises(ValueError, match="max_epochs"):
        LightningTrainFn(MLPClassifier, dm.train_set, max_epochs=0)


def test_plots_and_wandb_logging(tmp_path):
    import wandb

    lds_results = {
        "a": LDSResult(np.array([0.5, 0.7]), 0.6, 0.5, 0.7, 0.95),
        "b": LDSResult(np.zeros(2), 0, -0.1, 0.1, 0.95),
    }
    mislabel = {"a": mislabel_detection(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([True, False, False]))}
    leakage = {"a": leakage_detection(torch.eye(3), [0, 1, 2])}
    counterfactual = {
        "a": CounterfactualResult(np.array([1, 5]), np.array([0.2, 0.6]), np.array([0.0, 0.1]), np.arange(3), 1)
    }
    images = {
        "lds": plot_lds(lds_results, tmp_path / "lds.png"),
        "mislabel": plot_mislabel(mislabel, tmp_path / "mislabel.png"),
        "leakage": plot_leakage(leakage, tmp_path / "leakage.png"),
        "counterfactual": plot_counterfactual(counterfactual, tmp_path / "cf.png"),
    }
    for path in images.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = wandb.init(project="lightning-tda-tests", mode="offline", dir=str(tmp_path))
    try:
        log_to_wandb(run, images, {**lds_results["a"].scalars(), **leakage["a"].scalars()})
        assert run.summary["lds/mean"] == pytest.approx(0.6)
        assert run.summary["leakage/top1"] == 1.0
        assert run.summary["lds"]["_type"] == "image-file"
        with pytest.raises(ValueError, match="nothing to log"):
            log_to_wandb(run)
    finally:
        run.finish()


def test_the_cache_fingerprint_sees_every_tensor_of_dict_batches():
    """Hugging Face-style examples are dicts: two different query sets must not share a cache key."""
    from lightning_tda.demo import TokenBlocks
    from lightning_tda.evaluation.retrain import fingerprint

    blocks = torch.arange(32).reshape(4, 8)
    same, other = TokenBlocks(blocks.clone()), TokenBlocks(blocks.flip(0))
    assert fingerprint(TokenBlocks(blocks)) == fingerprint(same) != fingerprint(other)
    # tuple datasets keep the keys they had (caches written before stay valid)
    pairs = TensorDataset(blocks, blocks + 1)
    expected = hashlib.sha1()
    for tensor in (blocks, blocks + 1):
        expected.update(tensor.numpy().tobytes())
    assert fingerprint(pairs) == expected.hexdigest()


def test_workers_are_spawned_once_this_process_has_initialised_cuda(monkeypatch):
    """A forked child cannot use the parent's CUDA context: after attributing on a GPU, re-training spawns."""
    from lightning_tda.evaluation.retrain import default_start_method

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert default_start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert default_start_method() == "spawn"
