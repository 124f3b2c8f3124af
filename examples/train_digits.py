"""Train with TDACallback, ask SOURCE which training digits made each prediction, report to W&B and HTML."""

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import Subset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import DigitsDataModule, MLPClassifier
from lightning_tda.methods import SOURCE
from lightning_tda.reporting import ImageRenderer, build_report, write_reports

L.seed_everything(0)
path, task = "runs/example/trace.h5", ClassificationTask()
data, model = DigitsDataModule(batch_size=64), MLPClassifier()
logger = WandbLogger(project="lightning-tda", save_dir="runs/example", offline=True)
trainer = L.Trainer(max_epochs=8, logger=logger, callbacks=[TDACallback(path, task=task, if_exists="overwrite")])
trainer.fit(model, data)  # records steps, learning rates, checkpoints and K-FAC covariances into the trace

queries = Subset(data.test_set, range(8))  # query ids 0..7 are test-set ids 0..7
scores = SOURCE(Trace.open(path), model=MLPClassifier(), task=task).attribute(queries, data.train_set)
scores.save(path)  # (8, n_train); positive = the training example helped the query
report = build_report(
    scores, queries, data.train_set, model=model, task=task, renderer=ImageRenderer(shape=[8, 8]), trace_path=path
)
print(write_reports(report, loggers=trainer.loggers, html="runs/example/report.html").describe())
logger.experiment.finish()
