"""The trace store: one HDF5 file per run holding everything attribution needs.

* :mod:`~lightning_tda.trace.schema`: names, versions and limits of the on-disk layout
  (``docs/trace-schema.md`` describes it in full);
* :mod:`~lightning_tda.trace.writer`: :class:`TraceWriter` (the callback's writer) and durable short writes;
* :mod:`~lightning_tda.trace.reader`: :class:`Trace`, the read-only view methods use;
* :mod:`~lightning_tda.trace.records`: what each record must be, validated when a trace opens;
* :mod:`~lightning_tda.trace.checks`, :mod:`~lightning_tda.trace.probe`, :mod:`~lightning_tda.trace.lock`:
  checked reads of untrusted files, the forked probe that parses a foreign file first, one writer at a time;
* :mod:`~lightning_tda.trace.cache` and :mod:`~lightning_tda.trace.maintenance`: fitted-curvature caches,
  and ``inspect``/``clean``.

Nothing in this package imports Lightning.
"""

from lightning_tda.trace.checks import TraceError
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.records import CheckpointInfo, LayerInfo, SegmentInfo, StepLog
from lightning_tda.trace.schema import FORMAT, SCHEMA_VERSION, to_json
from lightning_tda.trace.writer import TraceWriteError, TraceWriter

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "CheckpointInfo",
    "LayerInfo",
    "SegmentInfo",
    "StepLog",
    "Trace",
    "TraceError",
    "TraceWriteError",
    "TraceWriter",
    "to_json",
]
