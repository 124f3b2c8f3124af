"""A small GPT-2 language model (optionally with LoRA adapters) recorded with TDACallback and attributed;
the report shows the queries and training blocks as decoded text.

The model is a Hugging Face GPT-2 built from a config (random weights, no download), trained on a synthetic
corpus packed into 16-token blocks (``lightning_tda.demo.language``). Its Conv1D projections and
``lm_head`` are tracked (the tied token embedding once, as ``lm_head``); with ``--lora`` only peft LoRA
adapters train and are tracked (``layers="lora"``), and DataInf attributes through them
(``modules="lora"``).

Run: ``python examples/language_model.py [--lora] [--epochs 4] [--train-blocks 256] [--out DIR]``; writes
``runs/language_model[_lora]/report.html`` (or ``DIR/report.html``).
Measured: 88 s of CPU time (95 s with ``--lora``); 5 min 15 s wall on 2 cores shared with other jobs (load
average 13). Needs ``transformers`` (the ``lm`` extra; ``lora`` adds peft).
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import Subset

from lightning_tda import LanguageModelingTask, TDACallback, Trace
from lightning_tda.demo import headless_trainer
from lightning_tda.demo.language import CausalLanguageModel, SyntheticTextDataModule
from lightning_tda.methods import SOURCE, DataInf
from lightning_tda.reporting import TextRenderer, build_report, write_reports


def main(lora: bool, epochs: int = 4, train_blocks: int = 256, out: str | None = None) -> None:
    L.seed_everything(0)
    out = out or ("runs/language_model_lora" if lora else "runs/language_model")
    path, task = f"{out}/trace.h5", LanguageModelingTask()  # mean next-token loss per block, as HF's .loss

    def model() -> CausalLanguageModel:
        return CausalLanguageModel(width=64, heads=4, lr=0.01 if lora else 0.003, lora_rank=8 if lora else 0)

    data = SyntheticTextDataModule(train_blocks=train_blocks, test_blocks=32)
    # one checkpoint per segment: SOURCE fits each segment's curvature and training gradients there once
    callback = TDACallback(
        path, task=task, layers="lora" if lora else None, checkpoints_per_segment=1, if_exists="overwrite"
    )
    headless_trainer(max_epochs=epochs, callbacks=[callback]).fit(model(), data)

    trace, queries = Trace.open(path), Subset(data.test_set, range(4))  # query ids 0..3 are test blocks 0..3
    scores = [
        SOURCE(trace, model=model(), task=task).attribute(queries, data.train_set),
        DataInf(trace, model=model(), task=task, modules="lora" if lora else None).attribute(queries, data.train_set),
    ]
    final = trace.load_checkpoint(model(), trace.final_checkpoint.index)
    report = build_report(
        scores, queries, data.train_set, model=final, task=task, k=3, renderer=TextRenderer(tokenizer=data.tokenizer)
    )
    for view in report.methods[0].queries[:2]:
        print(f"query: {view.query.rendered.text}\n  most helpful: {view.helpful[0].rendered.text}")
    print(write_reports(report, html=f"{out}/report.html", wandb=False).describe())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", action="store_true", help="train and attribute peft LoRA adapters only")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-blocks", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.lora, args.epochs, args.train_blocks, args.out)
