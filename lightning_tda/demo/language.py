"""A small causal language model and a synthetic corpus for the language-model examples, configs and tests.

Nothing is downloaded: the model is a Hugging Face GPT-2 (or Llama-style) architecture built from a
config with random weights, optionally wrapped with peft LoRA adapters, and the corpus is generated
from a small grammar with structure a model can learn: eight people, each with a favourite kind of
thing (fruit, tools, colours, animals), say what they like, buy, paint or find. A training block
that mentions ``carol`` and ``figs`` teaches the model that ``carol`` goes with fruit, so queries
about her should be attributed to such blocks.

The corpus is packed into fixed-length blocks (the usual pre-training layout, no padding), so a
``training_step`` returning the Hugging Face model's ``.loss`` (the token mean over the batch) is
exactly the batch mean of :class:`~lightning_tda.tasks.LanguageModelingTask`'s per-example mean loss.
Batches are Hugging Face-style dicts (``input_ids``, ``labels``; no ``attention_mask``, since nothing is
padded: transformers' attention-mask handling is data-dependent, which stops Forward-INF from
vectorising over parameter sets with ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_tda.demo.models import SupervisedModule

PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
THINGS = {
    "fruit": ("apples", "pears", "plums", "figs", "grapes"),
    "tools": ("hammers", "saws", "drills", "nails", "ropes"),
    "colours": ("red", "blue", "green", "yellow", "violet"),
    "animals": ("cats", "dogs", "owls", "foxes", "goats"),
}
VERBS = ("likes", "buys", "paints", "finds", "wants", "sells")
LINKS = ("and", "or", "but", "then", "so")
ADJECTIVES = ("old", "young", "happy", "quiet")
FUNCTION_WORDS = ("the", "never", "often", ".", "<unk>")
WORDS = PEOPLE + sum(THINGS.values(), ()) + VERBS + LINKS + ADJECTIVES + FUNCTION_WORDS
VOCAB_SIZE = len(WORDS)


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary (unknown words map to ``<unk>``).

    Has ``encode`` and ``decode`` like a Hugging Face tokenizer, so reports decode token ids with it
    (``TextRenderer(tokenizer=...)``).
    """

    def __init__(self, words: Sequence[str] = WORDS) -> None:
        self.words = list(words)
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.unknown = self.ids["<unk>"]

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unknown) for word in text.split()]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return " ".join(self.words[i] if 0 <= i < len(self.words) else "<unk>" for i in ids)


def synthetic_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of the grammar: person i likes things of kind ``i mod 4`` (90% of the time)."""
    rng = np.random.default_rng(seed)
    kinds = list(THINGS)
    sentences = []
    for _ in range(count):
        person = int(rng.integers(len(PEOPLE)))
        kind = kinds[person % len(kinds)] if rng.random() < 0.9 else kinds[int(rng.integers(len(kinds)))]
        things = [THINGS[kind][int(i)] for i in rng.choice(len(THINGS[kind]), size=2, replace=False)]
        words = [PEOPLE[person]]
        if rng.random() < 0.3:
            words = ["the", ADJECTIVES[int(rng.integers(len(ADJECTIVES)))], *words]
        if rng.random() < 0.2:
            words.append(("never", "often")[int(rng.integers(2))])
        words += [VERBS[int(rng.integers(len(VERBS)))], things[0]]
        if rng.random() < 0.5:
            words += [LINKS[int(rng.integers(len(LINKS)))], things[1]]
        sentences.append(" ".join([*words, "."]))
    return sentences


class TokenBlocks(Dataset):
    """Fixed-length token blocks as Hugging Face-style examples: ``{"input_ids", "labels"}`` (``labels =
    input_ids``; the model or task shifts them). ``blocks`` is ``(N, T)`` int64."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}


class SyntheticTextDataModule(L.LightningDataModule):
    """The synthetic corpus (:func:`synthetic_sentences`) packed into blocks of ``block_size`` tokens.

    Args:
        train_blocks: number of training blocks (examples).
        test_blocks: number of held-out blocks (the queries).
        block_size: tokens per block.
        batch_size: training batch size.
        seed: corpus and shuffling seed.

    ``tokenizer`` (a :class:`WordTokenizer`) decodes blocks to text; ``train_set`` / ``test_set`` are
    :class:`TokenBlocks` after ``setup``.
    """

    def __init__(
        self, train_blocks: int = 256, test_blocks: int = 32, block_size: int = 16, batch_size: int = 16, seed: int = 0
    ) -> None:
        super().__init__()
        self.train_blocks, self.test_blocks = train_blocks, test_blocks
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.tokenizer = WordTokenizer()
        self.train_set: TokenBlocks | None = None
        self.test_set: TokenBlocks | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        needed = (self.train_blocks + self.test_blocks) * self.block_size
        ids: list[int] = []
        for sentence in synthetic_sentences(needed // 4 + 16, self.seed):  # sentences have at least 4 words
            ids += self.tokenizer.encode(sentence)
            if len(ids) >= needed:
                break
        blocks = torch.tensor(ids[:needed]).reshape(-1, self.block_size)
        self.train_set = TokenBlocks(blocks[: self.train_blocks])
        self.test_set = TokenBlocks(blocks[self.train_blocks :])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=64)


def causal_lm(
    architecture: str = "gpt2",
    vocab_size: int = VOCAB_SIZE,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    context: int = 32,
) -> torch.nn.Module:
    """A randomly initialised Hugging Face causal LM built from a config (no download), without dropout.

    ``architecture="gpt2"``: ``GPT2LMHeadModel`` (``Conv1D`` projections, ``lm_head`` tied to the token
    embedding); ``"llama"``: ``LlamaForCausalLM`` (``nn.Linear`` projections, RMSNorm, untied embedding).
    """
    import transformers

    if architecture == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_positions=context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
    if architecture == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=context,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
        )
        return transformers.LlamaForCausalLM(config)
    raise ValueError(f"architecture={architecture!r}: use 'gpt2' or 'llama'.")


LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


class CausalLanguageModel(SupervisedModule):
    """A Lightning module around :func:`causal_lm`, trained on the Hugging Face model's own ``.loss``.

    ``forward(input_ids, attention_mask=None)`` returns the Hugging Face output object (``.logits``), as
    Hugging Face models do; :class:`~lightning_tda.tasks.LanguageModelingTask` reads its logits.

    Args:
        architecture, vocab_size, width, layers, heads, context: see :func:`causal_lm`.
        lr, optimizer, momentum, weight_decay, cosine: as for the other demo modules (default AdamW).
        lora_rank: ``0`` trains every parameter; ``r > 0`` wraps the model with peft LoRA adapters of
            rank ``r`` on the attention and MLP projections and trains only them (``layers="lora"`` in
            ``TDACallback``, ``modules="lora"`` in DataInf).
        lora_alpha: LoRA scaling numerator (default ``2 r``).
    """

    def __init__(
        self,
        architecture: str = "gpt2",
        vocab_size: int = VOCAB_SIZE,
        width: int = 32,
        layers: int = 2,
        heads: int = 2,
        context: int = 32,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = False,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, cosine)
        self.save_hyperparameters()
        model = causal_lm(architecture, vocab_size, width, layers, heads, context)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or 2 * lora_rank,
                target_modules=LORA_TARGETS[architecture],
                lora_dropout=0.0,
                fan_in_fan_out=architecture == "gpt2",
            )
            model = get_peft_model(model, config)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def _loss(self, batch: Any) -> Tensor:
        if not isinstance(batch, Mapping):  # (input_ids, labels) tuples
            batch = {"input_ids": batch[0], "labels": batch[1] if len(batch) > 1 else batch[0]}
        return self.model(**batch).loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))
