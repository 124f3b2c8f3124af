"""The trace's on-disk layout: names, versions and limits shared by its writer and its reader.

Schema (version 2; see ``docs/trace-schema.md`` for the full description)::

    /                    attrs: format, schema_version, library_version, created, run_id
    /meta                attrs: model_class, task_class, fisher, every_n_steps ("auto" or n),
                                overhead_budget, min_statistics_steps, world_size, dataset_size
                                (-1 = unknown), checkpoint_dtype, factor_dtype, max_factor_ratio
                                (-1 = every factor), sequence_mode
    /meta/optimizer      JSON string: optimizer class and per-group hyper-parameters
    /meta/config         JSON string: the callback's configuration
    /meta/loss_check     JSON string: list of the callback's Task-vs-training_step loss checks, one per fit
    /meta/recording_cost JSON string: list of the callback's measured cost (seconds per kind), one per fit
    /layers/names        tracked layer names, in order; /layers/<name> attrs: kind, in/out features,
                         has_bias, param_group (optimizer group of its weight), A_recorded,
                         S_recorded (whether its K-FAC factors are in the segments)
    /steps/<column>      one row per optimizer step: step, global_step, epoch, segment, batch_size,
                         loss, statistics (1 if K-FAC statistics were taken), lr (n, param groups)
    /segments/<i>        attrs: index, start_step, end_step, num_steps, stats_steps, skipped_steps,
                                mean_lr, reason; kfac/<layer>/{A_sum, A_count, S_sum, S_count}
                                (float32 or float64 sums; an unrecorded factor's sum is absent);
                                preconditioner/<layer>/v_mean (Adam second moments), attr count
    /checkpoints/initial full model state at the start of recording (step 0 of the trace)
    /checkpoints/<i>     trainable parameters and buffers; attrs: index, step, segment, epoch
    /second_moments/<i>/<layer>  Adam's bias-corrected v̂ after checkpoint i's step (float32, the layer's
                         gradient-matrix layout; Adam-family optimizers only, optional)
    /results/<name>      attribution scores (written by :class:`lightning_tda.scores.Scores`)
    /results/evaluation  each method's measured LDS (``lightning-tda evaluate``, :mod:`lightning_tda.evaluation.record`)
    /cache/<slot>        fitted factors cached by attribution methods with cache="trace" (see storage.py)

Steps are counted by the recorder itself: ``step`` = number of optimizer steps completed when
the row was written (the first row has step 1); checkpoint ``step`` = parameters after that many
steps. Version 1 traces (float64 sums, every factor, no recorded-factor attributes) still read.
The file is written with ``libver=("earliest", "v110")`` and flushed after every segment
close and checkpoint, so a killed process leaves a file that opens and holds everything flushed.
One process writes a trace at a time (:mod:`lightning_tda.trace.lock`); a write that fails (a full
disk) is detected before it touches the file, which keeps every write completed before it.

A trace is untrusted input: :class:`Trace` reads it only through
:class:`~lightning_tda.trace.checks.TraceReader`, validates the metadata, layer records, segments,
checkpoint records and step-log shapes when it opens, and each tensor's shape, type and values before
using it, against the layer records (and the model when one is given). Anything else is a
:class:`TraceError` naming the part of the file. This module does not import Lightning.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from torch import Tensor

FORMAT = "lightning_tda.trace"
SCHEMA_VERSION = 2
LIBVER = ("earliest", "v110")
STEP_COLUMNS = ("step", "global_step", "epoch", "segment", "batch_size", "loss", "statistics")
INT_COLUMNS = {"step", "global_step", "epoch", "segment", "batch_size", "statistics"}
# what the callback's own time is spent on (meta/recording_cost): fixed costs of a fit first, then per-step ones
COST_KINDS = ("trace_creation", "initial_checkpoint", "loss_check", "statistics", "checkpoints", "io", "bookkeeping")

MAX_LAYERS = 100_000
MAX_PARAM_GROUPS = 10_000
MAX_FEATURES = 2**31 - 1
ARCHITECTURE = "Pass an instance of the architecture the trace was recorded with (its meta attribute model_class)."


def library_version() -> str:
    from lightning_tda import __version__

    return __version__


def checkpoint_name(index: int) -> str:
    return f"{index:06d}"


def segment_name(index: int) -> str:
    return f"{index:04d}"


def _json_default(value: Any) -> Any:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True)
