"""Recording while a Lightning model trains: :class:`TDACallback` and its parts.

* :mod:`~lightning_tda.recording.callback`: the callback's hooks;
* :mod:`~lightning_tda.recording.options`: its options as one dataclass, validated in one place;
* :mod:`~lightning_tda.recording.cadence`: which optimizer steps take K-FAC statistics (fixed, or within an
  overhead budget);
* :mod:`~lightning_tda.recording.segments`: segment policies (equal parts, explicit steps, epochs,
  curvature drift);
* :mod:`~lightning_tda.recording.loss_check`: the check that the Task's loss is the loss training optimises;
* :mod:`~lightning_tda.recording.optimizer`: the optimizer record and Adam's second-moment statistics;
* :mod:`~lightning_tda.recording.checkpoints`: what a checkpoint stores, and a small model's checkpoints held in
  memory until their segment closes.

Everything is written through :mod:`lightning_tda.trace`; only this package imports Lightning's callback API.
"""

from lightning_tda.recording.callback import TDACallback
from lightning_tda.recording.segments import CurvatureDrift, EpochBoundaries, SegmentPolicy

__all__ = ["CurvatureDrift", "EpochBoundaries", "SegmentPolicy", "TDACallback"]
