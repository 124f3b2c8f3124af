"""Ready-made Lightning modules and data modules for the examples, configs, tests and benchmarks.

* :mod:`~lightning_tda.demo.data`: digits, UCI Concrete, in-memory arrays, synthetic images;
* :mod:`~lightning_tda.demo.models`: MLPs, a small CNN and a ResNet sharing one optimizer set-up;
* :mod:`~lightning_tda.demo.resnet`: the ResNet's layers in plain torch (no torchvision, no Lightning);
* :mod:`~lightning_tda.demo.language`: a small GPT-2 or Llama-style causal language model and a synthetic
  corpus packed into token blocks.

Nothing in the library imports this package; configs name its classes (``lightning_tda.demo.MLPClassifier``).
"""

from lightning_tda.demo.data import (
    ArrayDataModule,
    ConcreteDataModule,
    DigitsDataModule,
    SyntheticImageDataModule,
    load_concrete,
)
from lightning_tda.demo.language import (
    CausalLanguageModel,
    SyntheticTextDataModule,
    TokenBlocks,
    WordTokenizer,
    causal_lm,
    synthetic_sentences,
)
from lightning_tda.demo.models import MLPClassifier, MLPRegressor, ResNet, SmallCNN, SupervisedModule, mlp
from lightning_tda.evaluation.retrain import headless_trainer

__all__ = [
    "ArrayDataModule",
    "CausalLanguageModel",
    "ConcreteDataModule",
    "DigitsDataModule",
    "MLPClassifier",
    "MLPRegressor",
    "ResNet",
    "SmallCNN",
    "SupervisedModule",
    "SyntheticImageDataModule",
    "SyntheticTextDataModule",
    "TokenBlocks",
    "WordTokenizer",
    "causal_lm",
    "headless_trainer",
    "load_concrete",
    "mlp",
    "synthetic_sentences",
]
