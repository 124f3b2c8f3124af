"""Kept so that configs written for lightning_tda 0.1 (``class_path: lightning_tda.demo_language.*``) still
load: the language demo now lives in :mod:`lightning_tda.demo.language`."""

from lightning_tda.demo.language import (  # noqa: F401
    CausalLanguageModel,
    SyntheticTextDataModule,
    TokenBlocks,
    WordTokenizer,
    causal_lm,
    synthetic_sentences,
)
