"""All attribution methods side by side on the same trained models: LDS, subset removal, mislabel and leakage.

Every experiment trains one model with :class:`~lightning_tda.TDACallback` (3 segments, true
Fisher), runs every method on a fresh copy of that trace (so each method's time includes fitting
its own curvature) and scores the results with :mod:`lightning_tda.evaluation`:

* **LDS** (α = 0.5) on UCI Concrete (MLP regressor) and digits (MLP classifier), each converged and
  non-converged (few epochs, noisy targets/labels: where SOURCE is expected to beat influence
  functions). The ground truth re-trains ``--seeds`` models on each of ``--subsets`` random halves
  with the same recipe (:class:`~lightning_tda.evaluation.LightningTrainFn`), cached in
  ``<workdir>/ground_truth.h5`` so a re-run re-trains nothing.
* **Subset removal** (digits): remove each correctly classified query's top-k examples, re-train,
  count flips, next to random removal.
* **Mislabel detection** (digits, 20 % flipped labels): self-influence of every method.
* **Leakage detection** (digits with copies of test points planted in the training set).
* **Two-stage** (digits, stage 2 on transposed images): attribution to the first stage, SOURCE
  restricted to the first stage's segment vs influence functions on the final model.

* **Modern training recipes** (``--suite modern``, issue 20): AdamW + warm-up + cosine on a residual MLP
  (ANES96, penguins: converged and early; iris trained to zero loss), the digits CNN, and a byte-level
  GPT-2 on documentation strings (from scratch, fully fine-tuned and LoRA fine-tuned after a cached
  pre-training); data, models and schedule in ``benchmarks/modern.py``; LDS of every method at its defaults,
  written to the ``modern`` section.

A method that cannot be imported is reported as "not available"; a method that fails is reported
with its error. The ``random`` row is the chance reference. ``--quick`` shrinks everything (a few
minutes; what the smoke test runs).

Run: ``.venv/bin/python benchmarks/run.py`` (full), ``.venv/bin/python benchmarks/run.py --quick``, or
``.venv/bin/python benchmarks/run.py --suite modern --workers 2 --workdir runs/modern`` (≈ 14 min on 2 cores;
needs the ``benchmarks`` extra: palmerpenguins, statsmodels, peft, transformers).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.modern import (  # noqa: E402
    NUMPY_MODULES,
    STDLIB_MODULES,
    Anes96DataModule,
    ByteLM,
    DocstringBytesDataModule,
    IrisDataModule,
    PenguinsMassDataModule,
    ResidualMLP,
    WarmupCosineCNN,
    save_state,
    state_fingerprint,
)
from benchmarks.report import BENCHMARKS_MD, markdown_table, write_section  # noqa: E402
from lightning_tda import ClassificationTask, LanguageModelingTask, RegressionTask, Scores, Task  # noqa: E402
from lightning_tda.demo import (  # noqa: E402
    ArrayDataModule,
    ConcreteDataModule,
    DigitsDataModule,
    MLPClassifier,
    MLPRegressor,
    SmallCNN,
    headless_trainer,
)
from lightning_tda.evaluation import (  # noqa: E402
    GroundTruth,
    LightningTrainFn,
    bootstrap_mean,
    lds,
    lds_ground_truth,
    leakage_detection,
    measure,
    mislabel_detection,
    plot_counterfactual,
    plot_lds,
    plot_leakage,
    plot_mislabel,
    subset_removal,
)
from lightning_tda.evaluation.retrain import fingerprint, quiet_lightning  # noqa: E402
from lightning_tda.methods import MethodOptions  # noqa: E402
from lightning_tda.trace import Trace  # noqa: E402
from lightning_tda.trace.cache import sidecar_path  # noqa: E402

# Display name -> (class in lightning_tda.methods, keyword arguments). Defaults unless noted.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "SOURCE": ("SOURCE", {}),
    "SOURCE, paper (θ_T query)": ("SOURCE", {"query_gradients": "final"}),
    "EK-FAC IF": ("EKFACInfluence", {}),
    "TracInCP": ("TracInCP", {}),
    "DataInf": ("DataInf", {}),
    "Forward-INF": ("ForwardINF", {}),
}
RANDOM = "random"


# --- settings -----------------------------------------------------------------------------------
class _Arrays(ArrayDataModule):
    """A data module over in-memory arrays from :data:`DATA` (standardized features)."""

    def __init__(self, arrays: Callable[[], tuple[np.ndarray, np.ndarray]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._arrays = arrays

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._arrays()


def _standardized(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def synthetic_classification() -> tuple[np.ndarray, np.ndarray]:
    """1,000 points, 20 features (8 informative), 3 classes, 5% of labels random (sklearn's ``flip_y``)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=1000, n_features=20, n_informative=8, n_redundant=4, n_classes=3, flip_y=0.05, random_state=0
    )
    return _standardized(x), y.astype(np.int64)


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Wisconsin breast cancer set: 569 points, 30 features, 2 classes."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _standardized(data.data), data.target.astype(np.int64)


def synthetic_regression() -> tuple[np.ndarray, np.ndarray]:
    """600 points, 10 features (5 informative), Gaussian noise of 0.3 target standard deviations."""
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=600, n_features=10, n_informative=5, noise=0.0, random_state=0)
    y = (y - y.mean()) / y.std()
    y = y + 0.3 * np.random.default_rng(0).standard_normal(len(y))
    return _standardized(x), y.astype(np.float32)


def diabetes() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes progression set: 442 points, 10 features, target standardized."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    y = (data.target - data.target.mean()) / data.target.std()
    return _standardized(data.data), y.astype(np.float32)


def wine() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's wine set: 178 points, 13 features, 3 classes."""
    from sklearn.datasets import load_wine

    data = load_wine()
    return _standardized(data.data), data.target.astype(np.int64)


@dataclass(frozen=True)
class DataSpec:
    """How to load a data set: its data module, input size and number of classes (0 = regression)."""

    module: Callable[..., ArrayDataModule]
    inputs: int
    classes: int


DATA: dict[str, DataSpec] = {
    "digits": DataSpec(DigitsDataModule, 64, 10),
    "concrete": DataSpec(ConcreteDataModule, 8, 0),
    "classification": DataSpec(functools.partial(_Arrays, synthetic_classification), 20, 3),
    "cancer": DataSpec(functools.partial(_Arrays, breast_cancer), 30, 2),
    "regression": DataSpec(functools.partial(_Arrays, synthetic_regression), 10, 0),
    "diabetes": DataSpec(functools.partial(_Arrays, diabetes), 10, 0),
    "wine": DataSpec(functools.partial(_Arrays, wine), 13, 3),
}


@dataclass
class Setting:
    """A data set, model and training recipe.

    ``model`` is ``"mlp"`` (digits 64-128-128-10, Concrete 8-64-64-1, the others inputs-64-64-outputs)
    or ``"cnn"`` (:class:`~lightning_tda.demo.SmallCNN` on 8×8 digit images).
    """

    name: str
    title: str
    data: str  # a key of DATA
    epochs: int
    lr: float
    flip_fraction: float = 0.0
    target_noise: float = 0.0
    batch_size: int = 64
    model: str = "mlp"

    @property
    def task(self) -> Task:
        return ClassificationTask() if DATA[self.data].classes else RegressionTask()

    @property
    def module_factory(self) -> Callable[[], Any]:
        spec = DATA[self.data]
        if self.model == "cnn":
            return functools.partial(SmallCNN, lr=self.lr)
        if self.data in ("digits", "concrete"):  # the demo modules' default sizes (and cache keys)
            return functools.partial(MLPClassifier if spec.classes else MLPRegressor, lr=self.lr)
        cls = MLPClassifier if spec.classes else MLPRegressor
        return functools.partial(cls, sizes=[spec.inputs, 64, 64, spec.classes or 1], lr=self.lr)

    @property
    def callback_options(self) -> dict[str, Any]:
        """Extra ``TDACallback`` arguments for the attributed run (none: every layer, the defaults)."""
        return {}

    def prepare(self, workdir: Path) -> None:
        """Anything the setting needs before training (nothing here; see :class:`ModernSetting`)."""

    def train_fn(self, train: Any) -> LightningTrainFn:
        """The training recipe on ``train`` (the attributed run and every ground-truth re-training)."""
        return LightningTrainFn(self.module_factory, train, max_epochs=self.epochs, batch_size=self.batch_size)

    def recipe(self) -> str:
        model = "" if self.model == "mlp" else f" model={self.model}"
        return (
            f"{self.data} epochs={self.epochs} lr={self.lr} batch={self.batch_size} sgd-momentum-0.9 "
            f"flips={self.flip_fraction} noise={self.target_noise}{model}"
        )

    def datasets(self, max_train: int | None) -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
        """``(train, test, flipped mask)``; ``max_train`` keeps the first examples (``--quick``)."""
        extra = {"images": True} if self.model == "cnn" else {}
        dm = DATA[self.data].module(batch_size=self.batch_size, seed=0, flip_fraction=self.flip_fraction, **extra)
        dm.setup()
        x, y = dm.train_set.tensors
        flipped = dm.flipped
        if max_train is not None:
            x, y, flipped = x[:max_train], y[:max_train], flipped[:max_train]
        if self.target_noise > 0:
            y = y + self.target_noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        return TensorDataset(x, y), dm.test_set, flipped


CONCRETE = Setting("concrete", "Concrete MLP, converged (30 epochs)", "concrete", 30, 0.05)
CONCRETE_EARLY = Setting(
    "concrete-early",
    "Concrete MLP, non-converged (3 epochs, noisy targets σ=0.5)",
    "concrete",
    3,
    0.05,
    target_noise=0.5,
)
DIGITS = Setting("digits", "Digits MLP, converged (8 epochs)", "digits", 8, 0.1)
DIGITS_EARLY = Setting(
    "digits-early", "Digits MLP, non-converged (2 epochs, 10% flipped labels)", "digits", 2, 0.1, 0.1
)
DIGITS_MISLABELED = Setting("digits-mislabeled", "Digits MLP, 20% flipped labels (8 epochs)", "digits", 8, 0.1, 0.2)
# Settings nobody tuned a default on (the defaults suite): data sets and a model beyond the two above.
WIDER = [
    Setting("classification", "Synthetic 3-class MLP, converged (30 epochs)", "classification", 30, 0.05),
    Setting(
        "classification-early",
        "Synthetic 3-class MLP, non-converged (2 epochs, 10% flipped labels)",
        "classification",
        2,
        0.05,
        0.1,
    ),
    Setting("cancer", "Breast-cancer MLP, converged (30 epochs)", "cancer", 30, 0.05),
    Setting("cancer-early", "Breast-cancer MLP, non-converged (2 epochs)", "cancer", 2, 0.05),
    Setting("regression", "Synthetic regression MLP, converged (40 epochs)", "regression", 40, 0.02),
    Setting(
        "regression-early",
        "Synthetic regression MLP, non-converged (3 epochs, noisy targets σ=0.5)",
        "regression",
        3,
        0.02,
        target_noise=0.5,
    ),
    Setting("cnn", "Digits CNN, converged (10 epochs)", "digits", 10, 0.05, model="cnn"),
    Setting(
        "cnn-early", "Digits CNN, non-converged (2 epochs, 10% flipped labels)", "digits", 2, 0.05, 0.1, model="cnn"
    ),
]
# Held out: settings added after the defaults and the assumption check's thresholds were chosen, to test them.
HELD_OUT = [
    Setting("digits-long", "Digits MLP, over-trained (30 epochs)", "digits", 30, 0.1),
    Setting("diabetes", "Diabetes MLP, converged (30 epochs)", "diabetes", 30, 0.02),
    Setting("diabetes-early", "Diabetes MLP, non-converged (2 epochs)", "diabetes", 2, 0.02),
    Setting("wine", "Wine MLP, converged (30 epochs)", "wine", 30, 0.05),
]


# The modern suite (issue 20): AdamW + warm-up + cosine on a residual MLP, CNN and byte-level GPT-2, with
# pre-training / fine-tuning and LoRA. The data, models and schedule live in benchmarks/modern.py.
@dataclass
class Pretraining:
    """A first training stage, trained once (seed 0, on all of its data) and saved under ``<workdir>/pretrained``.

    A :class:`ModernSetting` with a pre-training starts every fit (the attributed run and each ground-truth
    re-training) from these weights, so the ground truth re-trains only the second stage on subsets.
    """

    name: str
    data: Callable[[], Any]  # a data module factory (``setup()`` gives ``train_set``)
    model: Callable[[], Any]  # a module factory with ``backbone_state()``
    epochs: int
    batch_size: int

    def weights(self, workdir: Path) -> Path:
        """The saved weights, training them first if ``<workdir>/pretrained/<name>.pt`` is missing."""
        path = workdir / "pretrained" / f"{self.name}.pt"
        if not path.exists():
            dm = self.data()
            dm.setup()
            log(f"pre-training {self.name} on {len(dm.train_set)} examples, {self.epochs} epochs")
            fn = LightningTrainFn(self.model, dm.train_set, max_epochs=self.epochs, batch_size=self.batch_size)
            model = fn.fit(np.arange(len(dm.train_set)), 0)
            save_state(model.backbone_state(), path)
        return path


@dataclass
class ModernSetting:
    """A setting that knows how to build its data, model, task and training recipe (the modern suite).

    ``data()`` returns a data module whose ``setup()`` gives ``train_set`` / ``test_set``; ``model`` is the
    module factory, called with ``init=<weights>`` when there is a ``pretraining``; ``callback`` holds extra
    ``TDACallback`` arguments (e.g. ``layers="lora"``); ``describe`` names the recipe in the cache tag.
    """

    name: str
    title: str
    data: Callable[[], Any]
    model: Callable[..., Any]
    task: Task
    epochs: int
    batch_size: int
    describe: str
    callback: dict[str, Any] = field(default_factory=dict)
    pretraining: Pretraining | None = None
    init: Path | None = None  # set by prepare() when there is a pre-training

    @property
    def callback_options(self) -> dict[str, Any]:
        return dict(self.callback)

    @property
    def module_factory(self) -> Callable[[], Any]:
        if self.pretraining is None:
            return self.model
        if self.init is None:
            raise RuntimeError(f"{self.name}: call prepare(workdir) first (it pre-trains or finds the weights).")
        return functools.partial(self.model, init=str(self.init))

    def prepare(self, workdir: Path) -> None:
        if self.pretraining is not None:
            self.init = self.pretraining.weights(workdir)

    def train_fn(self, train: Any) -> LightningTrainFn:
        return LightningTrainFn(self.module_factory, train, max_epochs=self.epochs, batch_size=self.batch_size)

    def recipe(self) -> str:
        pretrained = ""
        if self.init is not None:
            pretrained = f" from={self.pretraining.name}:{state_fingerprint(torch.load(self.init, weights_only=True))}"
        return f"modern {self.describe} epochs={self.epochs} batch={self.batch_size}{pretrained}"

    def datasets(self, max_train: int | None) -> tuple[Any, Any, torch.Tensor]:
        """``(train, test, flipped mask)`` (nothing flipped); ``max_train`` keeps the first examples."""
        dm = self.data()
        dm.setup()
        train = dm.train_set
        if max_train is not None and len(train) > max_train:
            train = TensorDataset(*(t[:max_train] for t in train.tensors))
        return train, dm.test_set, torch.zeros(len(train), dtype=torch.bool)


AnySetting = Setting | ModernSetting

ADAMW = "AdamW wd=0.01 warmup=0.1 cosine"
_lm_stdlib = functools.partial(DocstringBytesDataModule, STDLIB_MODULES, block_size=32, test_blocks=64)
_lm_numpy = functools.partial(DocstringBytesDataModule, NUMPY_MODULES, train_blocks=256, block_size=32, test_blocks=64)
STDLIB_LM = Pretraining(
    "bytelm-stdlib",
    functools.partial(_lm_stdlib, train_blocks=None),
    functools.partial(ByteLM, context=32, lr=1e-2),
    8,
    32,
)
MODERN = [
    ModernSetting(
        "modern-anes96",
        "ANES96 party ID (7 classes), residual MLP, AdamW + warm-up + cosine, converged (30 epochs)",
        Anes96DataModule,
        functools.partial(ResidualMLP, 9, 7, lr=3e-3),
        ClassificationTask(),
        30,
        32,
        f"anes96 resmlp-64x2 lr=3e-3 {ADAMW}",
    ),
    ModernSetting(
        "modern-anes96-early",
        "ANES96 party ID (7 classes), residual MLP, AdamW + warm-up + cosine, early (2 epochs)",
        Anes96DataModule,
        functools.partial(ResidualMLP, 9, 7, lr=3e-3),
        ClassificationTask(),
        2,
        32,
        f"anes96 resmlp-64x2 lr=3e-3 {ADAMW}",
    ),
    ModernSetting(
        "modern-penguins",
        "Penguins body mass (regression), residual MLP, AdamW + warm-up + cosine, converged (30 epochs)",
        PenguinsMassDataModule,
        functools.partial(ResidualMLP, 10, 0, lr=3e-3),
        RegressionTask(),
        30,
        32,
        f"penguins-mass resmlp-64x2 lr=3e-3 {ADAMW}",
    ),
    ModernSetting(
        "modern-penguins-early",
        "Penguins body mass (regression), residual MLP, AdamW + warm-up + cosine, early (2 epochs)",
        PenguinsMassDataModule,
        functools.partial(ResidualMLP, 10, 0, lr=3e-3),
        RegressionTask(),
        2,
        32,
        f"penguins-mass resmlp-64x2 lr=3e-3 {ADAMW}",
    ),
    ModernSetting(
        "modern-iris-interpolation",
        "Iris (3 classes), residual MLP, AdamW + warm-up + cosine, trained to zero loss (200 epochs)",
        IrisDataModule,
        functools.partial(ResidualMLP, 4, 3, lr=1e-2),
        ClassificationTask(),
        200,
        32,
        f"iris resmlp-64x2 lr=1e-2 {ADAMW}",
    ),
    ModernSetting(
        "modern-cnn",
        "Digits CNN, AdamW + warm-up + cosine (10 epochs)",
        functools.partial(DigitsDataModule, images=True),
        functools.partial(WarmupCosineCNN, lr=1e-2),
        ClassificationTask(),
        10,
        64,
        f"digits-images smallcnn lr=1e-2 {ADAMW}",
    ),
    ModernSetting(
        "modern-lm",
        "Byte-level GPT-2 from scratch on stdlib docstrings, AdamW + warm-up + cosine (10 epochs)",
        functools.partial(_lm_stdlib, train_blocks=512),
        functools.partial(ByteLM, context=32, lr=1e-2),
        LanguageModelingTask(),
        10,
        16,
        f"stdlib-docstrings bytes32 gpt2-64x2 lr=1e-2 {ADAMW}",
    ),
    ModernSetting(
        "modern-lm-finetune",
        "Byte-level GPT-2 pre-trained on stdlib docstrings, fully fine-tuned on numpy docstrings (5 epochs)",
        _lm_numpy,
        functools.partial(ByteLM, context=32, lr=3e-3),
        LanguageModelingTask(),
        5,
        16,
        f"numpy-docstrings bytes32 gpt2-64x2 finetune lr=3e-3 {ADAMW}",
        pretraining=STDLIB_LM,
    ),
    ModernSetting(
        "modern-lm-lora",
        "Byte-level GPT-2 pre-trained on stdlib docstrings, LoRA (rank 8) fine-tuned on numpy docstrings (5 epochs)",
        _lm_numpy,
        functools.partial(ByteLM, context=32, lr=1e-2, lora_rank=8),
        LanguageModelingTask(),
        5,
        16,
        f"numpy-docstrings bytes32 gpt2-64x2 lora-r8 lr=1e-2 {ADAMW}",
        callback={"layers": "lora"},
        pretraining=STDLIB_LM,
    ),
]


@dataclass
class Config:
    quick: bool
    subsets: int
    seeds: int
    queries: int
    max_train: int | None
    leaked: int
    counterfactual_queries: int
    ks: tuple[int, ...]
    workers: int
    workdir: Path
    methods: list[str]
    experiments: list[str]
    ground_truth_only: bool = False
    suite: str = "evaluation"
    notes: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# --- running the methods ------------------------------------------------------------------------
@dataclass
class MethodRun:
    scores: Scores | None = None
    seconds: float = float("nan")
    status: str = "ok"  # "ok", "not available", "failed: ..."
    signal: str = ""
    warnings: list[str] = field(default_factory=list)  # what the method warned (first lines, once each)


def import_method(class_name: str) -> Any:
    import lightning_tda.methods as methods

    return getattr(methods, class_name)


def run_method(*args: Any, **kwargs: Any) -> MethodRun:
    """:func:`run_one_method`, recording the warnings the library raised (third-party warnings are dropped)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_one_method(*args, **kwargs)
    messages = [str(w.message).splitlines()[0] for w in caught if "site-packages" not in w.filename]
    run.warnings = list(dict.fromkeys(messages))
    for message in run.warnings:
        log(f"  warning: {message}")
    return run


def run_one_method(
    display: str,
    cfg: Config,
    trace_path: Path,
    setting: AnySetting,
    queries: Any,
    train: Any,
    mode: str = "attribute",
    extra: dict[str, Any] | None = None,
    prepare: Callable[[Any, Any], Any] | None = None,
) -> MethodRun:
    """Run one method on a private copy of the trace; ``mode`` is "attribute" or "self"."""
    if display == RANDOM:
        generator = torch.Generator().manual_seed(0)
        n = len(train)
        if mode == "self":
            return MethodRun(
                Scores(torch.randn(n, generator=generator), torch.arange(n), None, RANDOM, kind="self"), 0.0
            )
        values = torch.randn(len(queries), n, generator=generator)
        return MethodRun(Scores(values, torch.arange(n), torch.arange(len(queries)), RANDOM), 0.0)
    class_name, kwargs = METHODS[display]
    try:
        cls = import_method(class_name)
    except Exception as err:  # not landed (AttributeError/ImportError) or broken on import
        return MethodRun(status=f"not available ({type(err).__name__})")

    slug = "".join(ch if ch.isalnum() else "-" for ch in display)  # two rows of one class get their own copies
    copy = cfg.workdir / "traces" / f"{trace_path.stem}-{slug}-{mode}.h5"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trace_path, copy)
    start = time.perf_counter()
    try:
        method = cls(
            Trace.open(copy),
            model=setting.module_factory(),
            task=setting.task,
            options=MethodOptions(progress=False),
            **kwargs,
            **(extra or {}),
        )
        if prepare is not None:  # a label-free set-up (e.g. Forward-INF's tune), timed with the method
            prepare(method, train)
        if mode == "self":
            scores, signal = self_or_validation_influence(method, queries, train)
        else:
            scores, signal = method.attribute(queries, train), ""
    except Exception as err:  # report, do not hide: the table shows the failure
        traceback.print_exc()
        message = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        return MethodRun(status=f"failed: {type(err).__name__}: {message}")
    finally:
        copy.unlink(missing_ok=True)
        sidecar_path(copy).unlink(missing_ok=True)  # no fitted curvature left for the next run to reuse
    seconds = time.perf_counter() - start
    if not torch.isfinite(scores.values).all():
        return MethodRun(seconds=seconds, status="failed: non-finite scores")
    return MethodRun(scores, seconds, "ok", signal)


def self_or_validation_influence(method: Any, queries: Any, train: Any) -> tuple[Scores, str]:
    """Self-influence where the method offers it, else influence on the clean validation queries."""
    if hasattr(method, "self_influence"):
        try:
            return method.self_influence(train), "self-influence"
        except (NotImplementedError, ValueError) as err:
            log(f"  no self-influence ({str(err).splitlines()[0][:100]}); using validation influence")
    return method.attribute(queries, train), "validation influence"


CALLBACK_OVERRIDES: dict[str, Any] = {}  # --callback KEY=VALUE: TDACallback options of every attributed run


def train_traced(setting: AnySetting, train: Any, path: Path, seed: int = 0) -> Any:
    """Fit the attributed model on all of ``train`` with the callback recording a 3-segment trace; the model."""
    from lightning_tda import TDACallback

    path.parent.mkdir(parents=True, exist_ok=True)
    options = {**setting.callback_options, **CALLBACK_OVERRIDES}
    callback = TDACallback(str(path), task=setting.task, segments=3, if_exists="overwrite", **options)
    return setting.train_fn(train).fit(np.arange(len(train)), seed, callbacks=[callback])


def method_names(cfg: Config) -> list[str]:
    return [*cfg.methods, RANDOM]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def progress_every(step: int, label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            log(f"{label}: trained {done}/{total}")

    return report


# --- experiments --------------------------------------------------------------------------------
def ground_truth(setting: AnySetting, train: Any, queries: Any, cfg: Config) -> GroundTruth:
    """The LDS ground truth of ``setting`` (α = 0.5, ``cfg.subsets`` × ``cfg.seeds``), read from the cache if there."""
    return lds_ground_truth(
        setting.train_fn(train),
        setting.task,
        queries,
        len(train),
        num_subsets=cfg.subsets,
        num_seeds=cfg.seeds,
        fraction=0.5,
        cache=cfg.workdir / "ground_truth.h5",
        tag=setting.recipe(),
        workers=cfg.workers,
        progress=progress_every(25, setting.name),
    )


def training_stats(model: Any, task: Task, train: Any, test: Any, seconds: float) -> dict[str, float]:
    """Mean per-example loss (the task's measurement) on the training and test sets, accuracy if classification."""
    stats = {"seconds": seconds}
    for split, data in (("train", train), ("test", test)):
        outcome = measure(model, task, data)
        stats[f"{split}_loss"] = float(outcome.measurement.mean())
        if not np.isnan(outcome.correct).all():
            stats[f"{split}_accuracy"] = float(np.nanmean(outcome.correct))
    return stats


def lds_experiment(setting: AnySetting, cfg: Config, results: dict[str, Any]) -> dict[str, MethodRun]:
    setting.prepare(cfg.workdir)
    train, test, _ = setting.datasets(cfg.max_train)
    queries = TensorDataset(*test[: cfg.queries])
    trace = cfg.workdir / f"{setting.name}.h5"
    runs = {}
    training: dict[str, float] = {}
    if not cfg.ground_truth_only:
        log(f"{setting.name}: training the attributed model ({len(train)} examples)")
        start = time.perf_counter()
        model = train_traced(setting, train, trace)
        training = training_stats(model, setting.task, train, test, time.perf_counter() - start)
        log(f"{setting.name}: attributed model {json.dumps({k: round(v, 4) for k, v in training.items()})}")
        for name in method_names(cfg):
            runs[name] = run_method(name, cfg, trace, setting, queries, train)
            log(f"{setting.name}: {name} {runs[name].status} {runs[name].seconds:.1f}s")
    log(f"{setting.name}: ground truth, {cfg.subsets} subsets x {cfg.seeds} seeds")
    start = time.perf_counter()
    truth = ground_truth(setting, train, queries, cfg)
    gt_seconds = time.perf_counter() - start
    scores = {name: lds(run.scores, truth) for name, run in runs.items() if run.scores is not None}
    results["lds"][setting.name] = {
        "title": setting.title,
        "ground_truth": {"trained": truth.num_trained, "seconds": gt_seconds, "n_train": len(train)},
        "training": training,
        "methods": lds_entries(runs, scores),
    }
    if scores:
        cfg.plots.append(
            plot_lds(scores, cfg.workdir / "plots" / f"lds-{setting.name}.png", title=f"LDS: {setting.title}")
        )
    return runs


def counterfactual_experiment(setting: AnySetting, runs: dict[str, MethodRun], cfg: Config, results: dict) -> None:
    train, test, _ = setting.datasets(cfg.max_train)
    queries = TensorDataset(*test[: cfg.queries])
    train_fn = setting.train_fn(train)
    out = {}
    for name, run in runs.items():
        if run.scores is None or name == RANDOM:
            continue
        log(f"counterfactual: {name}")
        result = subset_removal(
            run.scores,
            train_fn,
            setting.task,
            queries,
            ks=cfg.ks,
            max_queries=cfg.counterfactual_queries,
            cache=cfg.workdir / "ground_truth.h5",
            tag=setting.recipe(),
            workers=cfg.workers,
        )
        out[name] = result
    results["counterfactual"] = {
        "title": setting.title,
        "ks": list(cfg.ks),
        "queries": cfg.counterfactual_queries,
        "methods": {n: r.flip_fraction.tolist() for n, r in out.items()},
        "random": next(iter(out.values())).random_flip_fraction.tolist() if out else None,
    }
    if out:
        cfg.plots.append(
            plot_counterfactual(
                out, cfg.workdir / "plots" / "counterfactual.png", title=f"Subset removal: {setting.title}"
            )
        )


def mislabel_experiment(cfg: Config, results: dict) -> None:
    setting = DIGITS_MISLABELED
    train, test, flipped = setting.datasets(cfg.max_train)
    queries = TensorDataset(*test[: cfg.queries])
    trace = cfg.workdir / f"{setting.name}.h5"
    log(f"mislabel: training on {len(train)} examples, {int(flipped.sum())} flipped")
    train_traced(setting, train, trace)
    out, table = {}, {}
    for name in method_names(cfg):
        run = run_method(name, cfg, trace, setting, queries, train, mode="self")
        log(f"mislabel: {name} {run.status} {run.seconds:.1f}s")
        entry: dict[str, Any] = {"status": run.status, "seconds": run.seconds, "signal": run.signal or name}
        if run.scores is not None:
            out[name] = mislabel_detection(run.scores, flipped)
            entry.update(auc=out[name].auc, found={f: out[name].found_at(f) for f in (0.1, 0.2, 0.3)})
        table[name] = entry
    results["mislabel"] = {
        "title": setting.title,
        "flipped": int(flipped.sum()),
        "n_train": len(train),
        "methods": table,
    }
    if out:
        cfg.plots.append(
            plot_mislabel(out, cfg.workdir / "plots" / "mislabel.png", title=f"Mislabel detection: {setting.title}")
        )


def leakage_experiment(cfg: Config, results: dict) -> None:
    setting = DIGITS
    train, test, _ = setting.datasets(cfg.max_train)
    leaked = TensorDataset(*test[: cfg.leaked])
    poisoned = TensorDataset(*(torch.cat([a, b]) for a, b in zip(train.tensors, leaked.tensors)))
    duplicates = torch.arange(len(train), len(train) + len(leaked))
    trace = cfg.workdir / "digits-leaked.h5"
    log(f"leakage: training with {len(leaked)} test points copied into {len(train)} training examples")
    train_traced(setting, poisoned, trace)
    out, table = {}, {}
    for name in method_names(cfg):
        run = run_method(name, cfg, trace, setting, leaked, poisoned)
        log(f"leakage: {name} {run.status} {run.seconds:.1f}s")
        entry: dict[str, Any] = {"status": run.status, "seconds": run.seconds}
        if run.scores is not None:
            out[name] = leakage_detection(run.scores, duplicates)
            entry.update(top_k=out[name].top_k, mrr=float(np.mean(1.0 / out[name].ranks)))
        table[name] = entry
    results["leakage"] = {"title": "Digits MLP with planted test duplicates", "leaked": len(leaked), "methods": table}
    if out:
        cfg.plots.append(plot_leakage(out, cfg.workdir / "plots" / "leakage.png"))


class TwoStageTrainFn:
    """Stage 1 on a subset of the stage-1 data, then stage 2 on all stage-2 data (transposed digits)."""

    def __init__(self, stage1: LightningTrainFn, stage2: TensorDataset, epochs2: int) -> None:
        self.stage1, self.stage2, self.epochs2 = stage1, stage2, epochs2

    def cache_key(self) -> str:
        return f"{self.stage1.cache_key()}|{fingerprint(self.stage2)}|{self.epochs2}"

    def fit(self, indices: np.ndarray, seed: int, callbacks: tuple = (), callbacks2: tuple = ()) -> Any:

        model = self.stage1.fit(indices, seed, callbacks)
        with quiet_lightning():
            trainer = headless_trainer(max_epochs=self.epochs2, callbacks=list(callbacks2))
            loader = torch.utils.data.DataLoader(
                self.stage2, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed + 1)
            )
            model.train()
            trainer.fit(model, train_dataloaders=loader)
        return model.eval()

    def __call__(self, indices: np.ndarray, seed: int) -> Any:
        return self.fit(indices, seed)


def two_stage_experiment(cfg: Config, results: dict) -> None:
    """Digits: stage 1 on upright digits, stage 2 on transposed ones; attribute upright queries to stage 1."""
    from lightning_tda import TDACallback

    setting = DIGITS
    train, test, _ = setting.datasets(cfg.max_train)
    half = len(train) // 2
    x, y = train.tensors
    stage1 = TensorDataset(x[:half], y[:half])
    transposed = x[half:].reshape(-1, 8, 8).transpose(1, 2).reshape(-1, 64)
    stage2 = TensorDataset(transposed, y[half:])
    pooled = TensorDataset(torch.cat([x[:half], transposed]), torch.cat([y[:half], y[half:]]))
    queries = TensorDataset(*test[: cfg.queries])
    epochs1, epochs2 = 6, 4
    fn = TwoStageTrainFn(LightningTrainFn(setting.module_factory, stage1, max_epochs=epochs1), stage2, epochs2)
    trace = cfg.workdir / "digits-two-stage.h5"
    if not cfg.ground_truth_only:
        log("two-stage: training stage 1 (upright) then stage 2 (transposed)")
        fn.fit(
            np.arange(half),
            0,
            callbacks=[TDACallback(str(trace), task=setting.task, segments=1, if_exists="overwrite")],
            callbacks2=[TDACallback(str(trace), task=setting.task, segments=2, if_exists="append")],
        )
    runs = {} if cfg.ground_truth_only else two_stage_runs(cfg, trace, setting, queries, pooled, half)
    log(f"two-stage: ground truth, {cfg.subsets} subsets of stage 1 x {cfg.seeds} seeds")
    truth = lds_ground_truth(
        fn,
        setting.task,
        queries,
        half,
        num_subsets=cfg.subsets,
        num_seeds=cfg.seeds,
        cache=cfg.workdir / "ground_truth.h5",
        tag=f"two-stage {setting.recipe()} stage1={epochs1} stage2={epochs2}",
        workers=cfg.workers,
        progress=progress_every(25, "two-stage"),
    )
    scores = {name: lds(run.scores, truth) for name, run in runs.items() if run.scores is not None}
    results["two_stage"] = {
        "title": f"Digits two-stage: {epochs1} epochs upright ({half}) then {epochs2} epochs transposed",
        "methods": lds_entries(runs, scores),
    }
    if scores:
        cfg.plots.append(
            plot_lds(scores, cfg.workdir / "plots" / "lds-two-stage.png", title="LDS: two-stage digits, stage-1 data")
        )


def two_stage_runs(cfg: Config, trace: Path, setting: Setting, queries: Any, pooled: Any, half: int) -> dict:
    """Every method on the pooled two-stage data, keeping the stage-1 columns of its scores."""
    variants = {
        "SOURCE (stage-1 segment)": ("SOURCE", {"segments": [0]}),
        "SOURCE (all segments)": ("SOURCE", {}),
        "EK-FAC IF (final model)": ("EK-FAC IF", {}),
        "TracInCP": ("TracInCP", {}),
        "DataInf": ("DataInf", {}),
        "Forward-INF": ("Forward-INF", {}),
    }
    runs = {}
    for label, (display, kwargs) in variants.items():
        if display not in cfg.methods:
            continue
        run = run_method(display, cfg, trace, setting, queries, pooled, extra=kwargs)
        if run.scores is not None:
            s = run.scores
            run.scores = Scores(s.values[:, :half], s.train_ids[:half], s.query_ids, s.method, s.config)
        runs[label] = run
        log(f"two-stage: {label} {run.status} {run.seconds:.1f}s")
    runs[RANDOM] = run_method(RANDOM, cfg, trace, setting, TensorDataset(*queries[:]), TensorDataset(*pooled[:half]))
    return runs


def lds_entries(runs: dict[str, MethodRun], scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """JSON-able status, time and LDS (with CI) of each method."""
    entries = {}
    for name, run in runs.items():
        entries[name] = {"status": run.status, "seconds": run.seconds, "warnings": run.warnings}
        if name in scores:
            result = scores[name]
            entries[name].update(lds=result.mean, ci=[result.ci_low, result.ci_high])
            entries[name]["per_query"] = result.per_query.tolist()
    return entries


# --- report -------------------------------------------------------------------------------------
def lds_rows(methods: dict[str, dict]) -> list[list[object]]:
    valid = {n: m["lds"] for n, m in methods.items() if "lds" in m}
    best = max(valid, key=valid.get) if valid else None
    rows = []
    for name, m in methods.items():
        if "lds" in m:
            cell = f"{m['lds']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
            cell = f"**{cell}**" if name == best else cell
            rows.append([name, cell, f"{m['seconds']:.1f}"])
        else:
            rows.append([name, m["status"], "-"])
    return rows


def verdict(methods: dict[str, dict], first: str, second: str) -> str:
    """One honest sentence: paired bootstrap over queries of the LDS difference ``first − second``."""
    a, b = methods.get(first, {}), methods.get(second, {})
    if "lds" not in a or "lds" not in b:
        return f"{first} vs {second}: not comparable (one of them did not run)."
    diff = np.asarray(a["per_query"], dtype=float) - np.asarray(b["per_query"], dtype=float)
    mean, low, high = bootstrap_mean(diff)
    if low > 0:
        outcome = f"{first} wins"
    elif high < 0:
        outcome = f"{first} LOSES"
    else:
        outcome = "no significant difference"
    return f"{first} − {second} = {mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired over queries): {outcome}."


def verdicts(methods: dict[str, dict], source: str, influence: str) -> str:
    """SOURCE against the influence function, and against the best other method when that is not the IF."""
    lines = [verdict(methods, source, influence)]
    others = {n: m["lds"] for n, m in methods.items() if "lds" in m and n not in (source, influence, RANDOM)}
    best = max(others, key=others.get) if others else None
    if best is not None and "lds" in methods.get(source, {}) and others[best] > methods[source]["lds"]:
        lines.append(verdict(methods, source, best))
    return " ".join(lines)


RECIPES = {
    "evaluation": "every model trained with SGD (momentum 0.9, batch 64)",
    "modern": (
        "every model trained with AdamW (weight decay 0.01), a linear warm-up over the first 10% of the optimizer "
        "steps then cosine decay to 0, stepped every optimizer step (benchmarks/modern.py); fine-tuning settings "
        "start every fit (attributed run and ground truth alike) from the same pre-trained weights and attribute "
        'the fine-tuning data; the LoRA setting records the adapters only (`TDACallback(layers="lora")`). '
        "Models: a pre-norm residual MLP (LayerNorm, GELU, width 64, 2 blocks), the SmallCNN, a GPT-2 (2 layers, "
        "width 64, 4 heads, byte vocabulary 256). Data, all shipped inside installed packages: ANES 1996 party "
        "identification (statsmodels, 7 classes), Palmer penguins body mass (palmerpenguins, regression), "
        "scikit-learn's iris and digits; text = the UTF-8 bytes of `inspect.getdoc` documentation of 26 "
        "standard-library modules (161 kB, unigram byte entropy 3.28 nats) or of numpy.linalg and numpy.fft "
        "(138 kB, 3.44 nats; both depend on the installed versions), cut into 32-byte blocks, queries = held-out "
        "blocks. The fine-tuning settings start from one GPT-2 pre-trained once (seed 0, 8 epochs over all 4,977 "
        "stdlib blocks) and saved in `<workdir>/pretrained/`"
    ),
}


def describe_training(stats: dict[str, float]) -> str:
    """``train loss 0.12 (accuracy 0.98), test loss 0.31 (0.95)`` of the attributed model."""
    if not stats:
        return ""
    parts = []
    for split in ("train", "test"):
        text = f"{split} loss {stats[f'{split}_loss']:.3f}"
        if f"{split}_accuracy" in stats:
            text += f" (accuracy {stats[f'{split}_accuracy']:.3f})"
        parts.append(text)
    return f"Attributed model: {', '.join(parts)}; trained and recorded in {stats['seconds']:.1f} s. "


def warning_list(methods: dict[str, dict]) -> str:
    """The warnings each method raised, as a Markdown list (empty when none did)."""
    lines = [f"- {name}: {message}" for name, m in methods.items() for message in m.get("warnings", [])]
    return "\n\nWarnings raised:\n\n" + "\n".join(lines) if lines else ""


def summary_table(results: dict[str, Any], methods: list[str]) -> str:
    """Setting × method LDS (mean and 95% CI) of every LDS experiment in ``results``."""
    rows = []
    for name, exp in results["lds"].items():
        row: list[object] = [name]
        for method in methods:
            m = exp["methods"].get(method, {})
            cell = f"{m['lds']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if "lds" in m else m.get("status", "-")
            row.append(cell + (" ⚠" if m.get("warnings") else ""))
        rows.append(row)
    return markdown_table(["setting", *methods], rows)


def training_table(results: dict[str, Any]) -> str:
    """Per setting: n_train, the attributed model's losses and accuracies, training and ground-truth times."""
    rows = []
    for name, exp in results["lds"].items():
        t, gt = exp.get("training") or {}, exp["ground_truth"]

        def value(key: str, t: dict = t) -> str:
            return f"{t[key]:.3f}" if key in t else "-"

        rows.append(
            [
                name,
                gt["n_train"],
                value("train_loss"),
                value("train_accuracy"),
                value("test_loss"),
                value("test_accuracy"),
                f"{t['seconds']:.1f}" if "seconds" in t else "-",
                f"{gt['seconds']:.0f} ({gt['trained']} fits)",
            ]
        )
    header = ["setting", "n_train", "train loss", "train acc", "test loss", "test acc", "fit (s)", "ground truth (s)"]
    return markdown_table(header, rows)


def report(results: dict[str, Any], cfg: Config) -> str:
    parts = [
        f"Setup: LDS at α = 0.5 with M = {cfg.subsets} subsets × R = {cfg.seeds} re-training seeds, "
        f"{cfg.queries} test queries, 95% bootstrap CI over queries; training sets "
        f"{'truncated to ' + str(cfg.max_train) + ' examples' if cfg.max_train else 'complete'}; "
        f"{RECIPES[cfg.suite]}; recorded with TDACallback (3 segments, true Fisher). "
        f"Methods run with their default hyper-parameters on one CPU thread; time = fit + attribution. "
        f"Best LDS in bold; `random` = random scores (chance).",
        *cfg.notes,
    ]
    if cfg.suite == "modern" and results["lds"]:
        legend = "⚠ = the method raised a warning (listed under the setting)."
        parts.append(f"### Summary: LDS [95% CI]\n\n{legend}\n\n" + summary_table(results, method_names(cfg)))
        parts.append(
            "### Training\n\nThe attributed model (seed 0, all training data); loss = the task's per-example "
            "measurement (cross-entropy, squared error, or mean next-byte cross-entropy in nats); ground-truth "
            "time is for the fits not read from the cache.\n\n" + training_table(results)
        )
    for exp in results["lds"].values():
        gt = exp["ground_truth"]
        parts.append(
            f"### LDS: {exp['title']}\n\n"
            + markdown_table(["method", "LDS [95% CI]", "time (s)"], lds_rows(exp["methods"]))
            + f"\n\nn_train = {gt['n_train']}; ground truth: {cfg.subsets * cfg.seeds} re-trained models, "
            f"{gt['trained']} of them trained in this run ({gt['seconds']:.0f} s), the rest read from the cache. "
            + describe_training(exp.get("training") or {})
            + verdicts(exp["methods"], "SOURCE", "EK-FAC IF")
            + warning_list(exp["methods"])
        )
    if "two_stage" in results:
        exp = results["two_stage"]
        parts.append(
            f"### LDS, two-stage: {exp['title']}\n\nQueries are upright test digits; scores and ground truth "
            "cover the stage-1 examples only (stage 2 is always trained in full).\n\n"
            + markdown_table(["method", "LDS [95% CI]", "time (s)"], lds_rows(exp["methods"]))
            + "\n\n"
            + verdicts(exp["methods"], "SOURCE (stage-1 segment)", "EK-FAC IF (final model)")
        )
    if "counterfactual" in results and results["counterfactual"]["random"] is not None:
        cf = results["counterfactual"]
        header = ["removal"] + [f"flipped @ k={k}" for k in cf["ks"]]
        rows = [[n, *(f"{v:.2f}" for v in flips)] for n, flips in cf["methods"].items()]
        rows.append(["random removal", *(f"{v:.2f}" for v in cf["random"])])
        parts.append(
            f"### Subset removal: {cf['title']}\n\nFirst {cf['queries']} correctly classified test queries; remove "
            "each one's top-k examples, re-train (seed 0), fraction misclassified.\n\n" + markdown_table(header, rows)
        )
    if "mislabel" in results:
        ml = results["mislabel"]
        rows = []
        for name, m in ml["methods"].items():
            if "auc" in m:
                rows.append(
                    [
                        name,
                        m["signal"],
                        f"{m['auc']:.3f}",
                        *(f"{m['found'][f]:.2f}" for f in (0.1, 0.2, 0.3)),
                        f"{m['seconds']:.1f}",
                    ]
                )
            else:
                rows.append([name, m["status"], "-", "-", "-", "-", "-"])
        header = ["method", "signal", "AUC", "found @10%", "found @20%", "found @30%", "time (s)"]
        parts.append(
            f"### Mislabel detection: {ml['title']}\n\n{ml['flipped']} of {ml['n_train']} labels flipped; rank by "
            "self-influence (validation influence where a method has none).\n\n" + markdown_table(header, rows)
        )
    if "leakage" in results:
        lk = results["leakage"]
        rows = []
        for name, m in lk["methods"].items():
            if "top_k" in m:
                rows.append(
                    [name, *(f"{m['top_k'][k]:.2f}" for k in (1, 5, 10)), f"{m['mrr']:.3f}", f"{m['seconds']:.1f}"]
                )
            else:
                rows.append([name, m["status"], "-", "-", "-", "-"])
        parts.append(
            f"### Leakage detection: {lk['title']}\n\n{lk['leaked']} test points copied into the training set; rate at "
            "which a query's own copy ranks within the top k of the raw scores (ties count against it). A well-fit "
            "copy has a small loss gradient, so examples with large gradients outrank it. Dividing scores by "
            "√self-influence (`leakage_detection(..., self_influence=...)`) ranks an exact copy first by "
            "Cauchy–Schwarz for any symmetric positive semi-definite score (EK-FAC IF, TracInCP), so that variant "
            "proves nothing here and is not reported.\n\n"
            + markdown_table(["method", "top-1", "top-5", "top-10", "MRR", "time (s)"], rows)
        )
    return "\n\n".join(parts)


# --- entry point --------------------------------------------------------------------------------
EVALUATION = (
    "concrete",
    "concrete-early",
    "digits",
    "digits-early",
    "counterfactual",
    "mislabel",
    "leakage",
    "two-stage",
)
SETTINGS: dict[str, AnySetting] = {
    s.name: s for s in (CONCRETE, CONCRETE_EARLY, DIGITS, DIGITS_EARLY, *WIDER, *HELD_OUT, *MODERN)
}
SUITES = {"evaluation": EVALUATION, "modern": tuple(s.name for s in MODERN)}
EXPERIMENTS = (*EVALUATION, *(name for name in SETTINGS if name not in EVALUATION))


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (a few minutes)")
    parser.add_argument("--subsets", type=int, default=None, help="LDS subsets M (default 50; quick 6)")
    parser.add_argument("--seeds", type=int, default=None, help="re-training seeds R per subset (default 2; quick 1)")
    parser.add_argument("--queries", type=int, default=None, help="test queries (default 50; quick 8)")
    parser.add_argument("--workers", type=int, default=2, help="processes re-training in parallel")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--experiments", nargs="+", default=None, choices=EXPERIMENTS)
    parser.add_argument(
        "--suite",
        choices=list(SUITES),
        default="evaluation",
        help="default experiments and BENCHMARKS.md section: the evaluation suite, or the modern training recipes",
    )
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "benchmark")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="Markdown file to write the section into")
    parser.add_argument(
        "--ground-truth-only",
        action="store_true",
        help="only re-train the LDS ground truths into the cache (they do not depend on the methods)",
    )
    parser.add_argument("--note", action="append", default=[], help="a sentence to add to the section's set-up")
    parser.add_argument(
        "--callback",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TDACallback option for every attributed run (VALUE as JSON, e.g. statistics_examples=16)",
    )
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help="also log plots and numbers to W&B")
    args = parser.parse_args(argv)
    for option in args.callback:
        key, _, value = option.partition("=")
        CALLBACK_OVERRIDES[key] = json.loads(value)
    if args.callback:
        args.note.append(f"TDACallback options: {', '.join(args.callback)}.")
    quick = args.quick
    if args.suite == "modern":
        default_experiments = list(SUITES["modern"])
    else:
        default_experiments = (
            ["concrete", "digits", "counterfactual", "mislabel", "leakage"] if quick else list(EVALUATION)
        )
    cfg = Config(
        quick=quick,
        subsets=args.subsets or (6 if quick else 50),
        seeds=args.seeds or (1 if quick else 2),
        queries=args.queries or (8 if quick else 50),
        max_train=300 if quick else None,
        leaked=6 if quick else 30,
        counterfactual_queries=2 if quick else 20,
        ks=(20, 60) if quick else (10, 50, 150, 300),
        workers=args.workers,
        workdir=args.workdir,
        methods=args.methods,
        experiments=args.experiments or default_experiments,
        ground_truth_only=args.ground_truth_only,
        suite=args.suite,
        notes=list(args.note),
    )
    return cfg, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, args = parse(argv)
    torch.set_num_threads(1)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"lds": {}}
    settings = SETTINGS
    digits_runs = None
    if cfg.ground_truth_only:
        for name in cfg.experiments:
            if name in settings:
                lds_experiment(settings[name], cfg, results)
        if "two-stage" in cfg.experiments:
            two_stage_experiment(cfg, results)
        log(f"ground truths cached in {cfg.workdir / 'ground_truth.h5'} ({(time.perf_counter() - start) / 60:.1f} min)")
        return results
    for name in cfg.experiments:
        if name in settings:
            runs = lds_experiment(settings[name], cfg, results)
            if name == "digits":
                digits_runs = runs
    if "counterfactual" in cfg.experiments:
        if digits_runs is None:
            cfg.notes.append("Subset removal reuses the digits LDS scores; without that experiment it was skipped.")
        else:
            counterfactual_experiment(DIGITS, digits_runs, cfg, results)
    if "mislabel" in cfg.experiments:
        mislabel_experiment(cfg, results)
    if "leakage" in cfg.experiments:
        leakage_experiment(cfg, results)
    if "two-stage" in cfg.experiments:
        two_stage_experiment(cfg, results)
    total = time.perf_counter() - start
    cfg.notes.append(f"Total wall time {total / 60:.1f} min with {cfg.workers} re-training workers.")
    body = report(results, cfg)
    given = list(argv if argv is not None else sys.argv[1:])
    kept = [a for i, a in enumerate(given) if a != "--note" and (i == 0 or given[i - 1] != "--note")]
    command = "python benchmarks/run.py " + shlex.join(kept)  # notes are in the body already
    section = cfg.suite + ("-quick" if cfg.quick else "")
    titles = {
        "evaluation": "Attribution quality: LDS, subset removal, mislabel and leakage detection",
        "modern": "Modern training recipes: every method at its defaults",
    }
    title = f"{titles[cfg.suite]} (quick smoke run)" if cfg.quick and cfg.suite == "modern" else titles[cfg.suite]
    if cfg.quick and cfg.suite == "evaluation":
        title = "Attribution quality (quick smoke run)"
    write_section(section, title, body, command=command.strip(), path=args.out)
    (cfg.workdir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if args.wandb:
        log_wandb(args.wandb, cfg, results)
    log(f"done in {total / 60:.1f} min; wrote section {section!r} of {args.out}")
    return results


def log_wandb(project: str, cfg: Config, results: dict[str, Any]) -> None:
    import wandb

    from lightning_tda.evaluation import log_to_wandb

    scalars = {
        f"lds/{exp}/{name}": m["lds"]
        for exp, e in results["lds"].items()
        for name, m in e["methods"].items()
        if "lds" in m
    }
    images = {f"plots/{p.stem}": p for p in cfg.plots}
    run = wandb.init(project=project, job_type="benchmark", config={"subsets": cfg.subsets, "seeds": cfg.seeds})
    try:
        log_to_wandb(run, images, scalars)
    finally:
        run.finish()


if __name__ == "__main__":
    main()
