"""Standard evaluations of training data attribution, runnable on your own model.

* :func:`lds_ground_truth` + :func:`lds`: linear datamodeling score with a cached ground truth.
* :func:`subset_removal`: remove each query's top-k helpful examples, re-train, count flips.
* :func:`mislabel_detection`: AUC and found-vs-inspected curve for planted label flips.
* :func:`leakage_detection`: top-k rate of planted test duplicates.
* :func:`unrolled_scores` / :class:`UnrolledTraining`: the exact unrolled derivative of a traced run
  (a float64 replay differentiated through every optimizer step), the reference for small models.
* ``plot_*`` PNGs and :func:`log_to_wandb`.
* :class:`Evaluation`: each method's measured LDS as ``lightning-tda evaluate`` keeps it in a trace
  (``Evaluation.load(trace_path)``), with :meth:`Evaluation.verdict`, the method to trust.

Re-training uses your own ``train_fn(subset_indices, seed) -> model``; :class:`LightningTrainFn`
builds one around a Lightning ``Trainer`` for any LightningModule. Example::

    from functools import partial
    from lightning_tda.evaluation import LightningTrainFn, lds, lds_ground_truth

    train_fn = LightningTrainFn(partial(MLPClassifier, lr=0.1), dm.train_set, max_epochs=8)  # the traced recipe
    truth = lds_ground_truth(train_fn, ClassificationTask(), queries, len(dm.train_set),
                             num_subsets=100, num_seeds=3, cache="ground_truth.h5", workers=2)
    print(lds(SOURCE(trace, model=MLPClassifier(), task=ClassificationTask()).attribute(queries, dm.train_set), truth))

A second ``lds_ground_truth`` call with the same subsets, seeds and queries reads the cache and
trains nothing, so every method is scored against the same re-trained models.
"""

from lightning_tda.evaluation.counterfactual import CounterfactualResult, subset_removal
from lightning_tda.evaluation.detection import (
    LeakageResult,
    MislabelResult,
    leakage_detection,
    mislabel_detection,
    suspicion_scores,
)
from lightning_tda.evaluation.lds import GroundTruth, LDSResult, bootstrap_mean, draw_subsets, lds, lds_ground_truth
from lightning_tda.evaluation.plots import log_to_wandb, plot_counterfactual, plot_lds, plot_leakage, plot_mislabel
from lightning_tda.evaluation.record import Evaluation, MethodLDS
from lightning_tda.evaluation.retrain import LightningTrainFn, Outcome, RetrainRunner, measure
from lightning_tda.evaluation.unrolled import ReplayCheck, UnrolledTraining, replay_batches, unrolled_scores

__all__ = [
    "CounterfactualResult",
    "Evaluation",
    "GroundTruth",
    "LDSResult",
    "LeakageResult",
    "LightningTrainFn",
    "MethodLDS",
    "MislabelResult",
    "Outcome",
    "ReplayCheck",
    "RetrainRunner",
    "UnrolledTraining",
    "bootstrap_mean",
    "draw_subsets",
    "lds",
    "lds_ground_truth",
    "leakage_detection",
    "log_to_wandb",
    "measure",
    "mislabel_detection",
    "plot_counterfactual",
    "plot_lds",
    "plot_leakage",
    "plot_mislabel",
    "subset_removal",
    "replay_batches",
    "suspicion_scores",
    "unrolled_scores",
]
