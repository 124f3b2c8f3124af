"""A ResNet image classifier with TDACallback, attributed with EK-FAC influence and SOURCE (Python API).

ResNet-18 at half width in torchvision's layout (2.8M parameters) trained 2 epochs on 2,000 synthetic
32x32 colour images (``SyntheticImageDataModule``: made offline from a seed), then 10 test images attributed with
EK-FAC influence functions and SOURCE, and an HTML report of each query's most helpful and harmful
training images. The 20 convolutions and the head are tracked, the BatchNorm layers are not.
``configs/resnet.yaml`` runs the same job (with every method) from the command line.

Run: ``python examples/train_resnet.py [--width 32] [--n 2500] [--size 32] [--out runs/resnet-example]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from torch.utils.data import Subset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import ResNet, SyntheticImageDataModule, headless_trainer
from lightning_tda.methods import SOURCE, EKFACInfluence
from lightning_tda.reporting import ImageRenderer, build_report, write_reports


def main(width: int = 32, n: int = 2500, size: int = 32, out: str = "runs/resnet-example", queries: int = 10) -> str:
    """Train, attribute and write ``<out>/report.html``; returns the report's one-line description."""
    L.seed_everything(0, verbose=False)
    path, task = str(Path(out) / "trace.h5"), ClassificationTask()
    data = SyntheticImageDataModule(batch_size=64, num_examples=n, size=size)
    model = ResNet(width=width, stem="imagenet")
    callback = TDACallback(path, task=task, if_exists="overwrite")
    headless_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback]).fit(model, data)

    query_set = Subset(data.test_set, range(queries))
    trace = Trace.open(path)
    results = []
    for method in (EKFACInfluence, SOURCE):
        fresh = ResNet(width=width, stem="imagenet")
        scores = method(trace, model=fresh, task=task).attribute(query_set, data.train_set)
        scores.save(path)  # (queries, n_train); positive = the training image helped the query
        results.append(scores)
    report = build_report(
        results,
        query_set,
        data.train_set,
        model=model,
        task=task,
        renderer=ImageRenderer(invert=False),
        trace_path=path,
    )
    return write_reports(report, html=str(Path(out) / "report.html"), wandb=False).describe()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n", type=int, default=2500)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", default="runs/resnet-example")
    print(main(**vars(parser.parse_args())))
