"""lightning_tda: training data attribution for PyTorch Lightning.

Record what attribution needs while a model trains (:class:`TDACallback` writes an HDF5
:class:`Trace`), then ask which training examples made the model do something with SOURCE,
DataInf, Forward-INF and their baselines (:mod:`lightning_tda.methods`).

Sign convention everywhere: a positive score means the training example helped the query
(removing it would raise the query's loss).
"""

__version__ = "0.1.0"

from lightning_tda.scores import Scores
from lightning_tda.tasks import ClassificationTask, LanguageModelingTask, RegressionTask, Task
from lightning_tda.timeline import Timeline
from lightning_tda.trace.checks import TraceError
from lightning_tda.trace.reader import Trace

__all__ = [
    "ClassificationTask",
    "LanguageModelingTask",
    "RegressionTask",
    "Scores",
    "TDACallback",
    "Task",
    "Timeline",
    "Trace",
    "TraceError",
    "__version__",
]


def __getattr__(name: str):
    # The callback imports Lightning; keep `import lightning_tda` (and the trace reader) free of it.
    if name == "TDACallback":
        from lightning_tda.recording.callback import TDACallback

        return TDACallback
    raise AttributeError(f"module 'lightning_tda' has no attribute {name!r}")
