"""What each record of a trace must be: the layer, segment, checkpoint and step-log records read when a
trace opens, validated in one place, and the checks on tensors read later (state tensors, covariance sums).

A trace is untrusted input: everything here reads through :class:`~lightning_tda.trace.checks.TraceReader`
and answers anything unexpected with a :class:`~lightning_tda.trace.checks.TraceError` naming the part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from lightning_tda.layers.tracked import DIAGONAL_INPUT_KINDS
from lightning_tda.trace.checks import (
    TraceReader,
    expect_bool,
    expect_float,
    expect_floats,
    expect_int,
    expect_str,
)
from lightning_tda.trace.schema import (
    ARCHITECTURE,
    COST_KINDS,
    INT_COLUMNS,
    MAX_FEATURES,
    MAX_LAYERS,
    MAX_PARAM_GROUPS,
    STEP_COLUMNS,
    segment_name,
)


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer as recorded: gradient matrix shape is ``(out_features, in_features + has_bias)``;
    ``param_group`` is the optimizer param group holding its weight (its learning rate column);
    ``A_recorded``/``S_recorded`` say whether the segments hold its input and output K-FAC factors."""

    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    param_group: int = 0
    A_recorded: bool = True
    S_recorded: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features + int(self.has_bias))

    @property
    def input_factor_shape(self) -> tuple[int, ...]:
        """Shape of the recorded ``A_sum``: ``(a_dim,)`` (the diagonal) for embeddings, else ``(a_dim, a_dim)``."""
        a_dim = self.shape[1]
        return (a_dim,) if self.kind in DIAGONAL_INPUT_KINDS else (a_dim, a_dim)

    def factor_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The shapes each stored K-FAC sum of this layer may have (checked before it is read)."""
        return {
            "A_sum": (self.input_factor_shape,),
            "A_count": ((),),
            "S_sum": ((self.out_features,) * 2,),
            "S_count": ((),),
        }


@dataclass(frozen=True)
class SegmentInfo:
    """A closed segment covering optimizer steps ``start_step < step <= end_step``.

    ``mean_lr`` has one entry per optimizer param group; ``checkpoints`` lists the indices of the
    checkpoints taken inside the segment (the last one at ``end_step`` when recorded normally).
    """

    index: int
    start_step: int
    end_step: int
    num_steps: int
    stats_steps: int
    skipped_steps: int
    mean_lr: np.ndarray
    reason: str
    checkpoints: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """A stored model state: the parameters after ``step`` optimizer steps."""

    index: int
    step: int
    segment: int
    epoch: int


@dataclass(frozen=True)
class StepLog:
    """The per-optimizer-step log; every array has one entry per step (``lr``: ``(steps, groups)``)."""

    step: np.ndarray
    global_step: np.ndarray
    epoch: np.ndarray
    segment: np.ndarray
    batch_size: np.ndarray
    loss: np.ndarray
    statistics: np.ndarray
    lr: np.ndarray

    def __len__(self) -> int:
        return len(self.step)


def load_array(reader: TraceReader, where: str, shape: tuple[int, ...] | None) -> Tensor:
    """A stored state tensor (bfloat16 from its uint16 bit pattern), its shape checked before it is read."""
    bfloat16 = reader.attribute(where, "dtype") == "bfloat16"
    with reader.part(where):
        stored = reader.dataset(where).dtype
    if bfloat16 and stored != np.uint16:
        raise reader.error(where, f"is marked bfloat16 but stored as {stored}, expected its uint16 bit pattern")
    data = torch.from_numpy(reader.array(where, None if shape is None else [shape], kinds="u" if bfloat16 else "fiub"))
    if bfloat16:
        return data.view(torch.bfloat16).float()
    if data.dtype == torch.float16:
        return data.float()
    return data


def stored_bytes(item: h5py.Group | h5py.Dataset) -> int:
    """Bytes the datasets below ``item`` occupy in the file (HDF5 metadata not counted), each stored
    dataset once; only hard links are followed."""
    total, seen, stack = 0, set(), [item]
    while stack:
        node = stack.pop()
        address = h5py.h5o.get_info(node.id).addr
        if address in seen:
            continue
        seen.add(address)
        if isinstance(node, h5py.Dataset):
            total += node.id.get_storage_size()
            continue
        for name in node:
            if node.id.links.get_info(name.encode()).type == h5py.h5l.TYPE_HARD:
                child = node[name]
                if isinstance(child, (h5py.Group, h5py.Dataset)):
                    stack.append(child)
    return total


def loss_check_records(r: TraceReader) -> list[dict[str, Any]]:
    """The JSON list ``meta/loss_check`` (records that are not JSON objects are dropped)."""
    if not r.has("meta/loss_check"):
        return []
    return [record for record in r.json("meta/loss_check", list) if isinstance(record, dict)]


def recording_cost_records(r: TraceReader) -> list[dict[str, Any]]:
    """The JSON list ``meta/recording_cost``, each record checked: ``first_step`` ≤ ``last_step`` (steps of the
    trace the fit covered), ``training_seconds`` (the fit's wall time from the start of training to its end,
    recording included) and ``seconds`` (the callback's own time per kind of :data:`COST_KINDS`), all finite
    and non-negative. Empty for traces recorded before the cost was."""
    if not r.has("meta/recording_cost"):
        return []
    records = r.json("meta/recording_cost", list)
    checked = []
    for position, record in enumerate(records):
        where = f"meta/recording_cost record {position}"
        if not isinstance(record, dict) or not isinstance(record.get("seconds"), dict):
            raise r.error(where, "is not a JSON object with a 'seconds' object")
        first = expect_int(r, f"{where} first_step", record.get("first_step"), 0)
        last = expect_int(r, f"{where} last_step", record.get("last_step"), first)
        seconds = {
            kind: expect_float(r, f"{where} seconds[{kind!r}]", record["seconds"].get(kind, 0.0), 0.0)
            for kind in COST_KINDS
        }
        training = expect_float(r, f"{where} training_seconds", record.get("training_seconds"), 0.0)
        checked.append({"first_step": first, "last_step": last, "training_seconds": training, "seconds": seconds})
    return checked


def cost_percent(record: Mapping[str, Any]) -> float:
    """The callback's cost as a percentage of the time training takes without it (its total seconds over the
    fit's training seconds minus them)."""
    spent = sum(record["seconds"].values())
    without = record["training_seconds"] - spent
    return 100.0 * spent / without if without > 0 else float("inf")


def describe_cost(record: Mapping[str, Any]) -> str:
    """One line: the total, its percentage of training time and the seconds of each kind that took any."""
    seconds = record["seconds"]
    labels = {"io": "I/O"}
    kinds = ", ".join(
        f"{labels.get(kind, kind.replace('_', ' '))} {value:.2f} s" for kind, value in seconds.items() if value >= 0.005
    )
    spent = sum(seconds.values())
    return (
        f"{spent:.2f} s, {cost_percent(record):.1f}% on top of {record['training_seconds'] - spent:.1f} s of training "
        f"({kinds or 'nothing measurable'})"
    )


def read_meta(r: TraceReader) -> dict[str, Any]:
    meta = r.attributes("meta")

    def where(key: str) -> str:
        return f"meta attribute {key!r}"

    if "fisher" not in meta:
        raise r.error("meta", "has no 'fisher' attribute")
    expect_str(r, where("fisher"), meta["fisher"], ("true", "empirical"))
    for key in ("model_class", "task_class", "checkpoint_dtype", "sequence_mode", "precision"):
        if key in meta:
            expect_str(r, where(key), meta[key])
    for key, low in (("world_size", 1), ("dataset_size", -1), ("accumulate_grad_batches", 1)):
        if key in meta:
            expect_int(r, where(key), meta[key], low)
    if isinstance(meta.get("every_n_steps"), str):  # v2: "auto", spaced by an overhead budget
        expect_str(r, where("every_n_steps"), meta["every_n_steps"], ("auto",))
        expect_float(r, where("overhead_budget"), meta.get("overhead_budget"), 0.0)
        expect_int(r, where("min_statistics_steps"), meta.get("min_statistics_steps"), 1)
        if "strict_budget" in meta:
            expect_bool(r, where("strict_budget"), meta["strict_budget"])
    elif "every_n_steps" in meta:
        expect_int(r, where("every_n_steps"), meta["every_n_steps"], 1)
    if "factor_dtype" in meta:
        expect_str(r, where("factor_dtype"), meta["factor_dtype"], ("auto", "float32", "float64"))
    if "max_factor_ratio" in meta:
        expect_float(r, where("max_factor_ratio"), meta["max_factor_ratio"], -1.0)
    return meta


def step_log_shape(r: TraceReader) -> tuple[int, int]:
    """Rows and param groups of the step log, from its datasets' shapes and types (nothing read)."""
    lengths = set()
    for column in STEP_COLUMNS:
        shape = r.shape_of(f"steps/{column}", "iu" if column in INT_COLUMNS else "fiu")
        if len(shape) != 1:
            raise r.error(f"steps/{column}", f"has shape {shape}, expected one value per optimizer step")
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise r.error("steps", f"columns have different lengths {sorted(lengths)}, expected one row per step in each")
    (rows,) = lengths
    shape = r.shape_of("steps/lr", "fiu")
    if len(shape) != 2 or shape[0] != rows or not 1 <= shape[1] <= MAX_PARAM_GROUPS:
        raise r.error("steps/lr", f"has shape {shape}, expected ({rows}, param groups)")
    return rows, shape[1]


def read_optimizer(r: TraceReader, groups: int) -> dict[str, Any]:
    where = "meta/optimizer"
    record = r.json(where, dict)
    expect_str(r, f"{where} 'class'", record.get("class"))
    if "name" in record:
        expect_str(r, f"{where} 'name'", record["name"])
    param_groups = record.get("param_groups")
    if not isinstance(param_groups, list) or len(param_groups) != groups:
        count = len(param_groups) if isinstance(param_groups, list) else param_groups
        raise r.error(where, f"lists param groups {_short(count)}, expected {groups} (the columns of steps/lr)")
    for index, group in enumerate(param_groups):
        place = f"{where} param group {index}"
        if not isinstance(group, dict):
            raise r.error(place, f"is {_short(group)}, expected an object of hyper-parameters")
        for key in ("lr", "momentum", "dampening", "weight_decay", "eps"):
            if group.get(key) is not None:
                expect_float(r, f"{place} {key!r}", group[key], low=0.0)
        for key in ("momentum", "dampening"):
            if group.get(key) is not None and group[key] >= 1:
                raise r.error(f"{place} {key!r}", f"is {group[key]}, expected a value below 1")
        if group.get("betas") is not None:
            betas = expect_floats(r, f"{place} 'betas'", group["betas"], 2, low=0.0)
            if (betas >= 1).any():
                raise r.error(f"{place} 'betas'", f"is {group['betas']}, expected two values below 1")
        for key in ("maximize", "nesterov", "amsgrad"):
            if group.get(key) is not None:
                expect_bool(r, f"{place} {key!r}", group[key])
    return record


def read_layers(r: TraceReader, groups: int) -> list[LayerInfo]:
    names = r.strings("layers/names", MAX_LAYERS)
    layers = []
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise r.error("layers/names", f"holds the invalid layer name {name!r}")
        where = f"layers/{name}"
        attrs = r.attributes(where)
        layers.append(
            LayerInfo(
                name=name,
                kind=expect_str(r, f"{where} attribute 'kind'", attrs.get("kind")),
                in_features=expect_int(
                    r, f"{where} attribute 'in_features'", attrs.get("in_features"), 1, MAX_FEATURES
                ),
                out_features=expect_int(
                    r, f"{where} attribute 'out_features'", attrs.get("out_features"), 1, MAX_FEATURES
                ),
                has_bias=expect_bool(r, f"{where} attribute 'has_bias'", attrs.get("has_bias")),
                param_group=expect_int(
                    r, f"{where} attribute 'param_group'", attrs.get("param_group", 0), 0, groups - 1
                ),
                A_recorded=expect_bool(r, f"{where} attribute 'A_recorded'", attrs.get("A_recorded", True)),
                S_recorded=expect_bool(r, f"{where} attribute 'S_recorded'", attrs.get("S_recorded", True)),
            )
        )
    if len({layer.name for layer in layers}) != len(layers):
        raise r.error("layers/names", "names a layer twice")
    return layers


def read_segments(r: TraceReader, num_steps: int, groups: int) -> list[dict[str, Any]]:
    """The closed segments' fields, checked to tile steps ``0 < step <= end`` of the step log in order."""
    segments = []
    for name in r.members("segments"):
        where = f"segments/{name}"
        if not (name.isascii() and name.isdigit()):
            raise r.error(where, "is not named by a segment index")
        attrs = r.attributes(where)

        def field(key: str, low: int, high: int | None = None, where: str = where, attrs: dict = attrs) -> int:
            return expect_int(r, f"{where} attribute {key!r}", attrs.get(key), low, high)

        index, start = field("index", int(name), int(name)), field("start_step", 0)
        end = field("end_step", start + 1)
        num = field("num_steps", end - start, end - start)
        stats = field("stats_steps", 0, num)
        segments.append(
            {
                "index": index,
                "start_step": start,
                "end_step": end,
                "num_steps": num,
                "stats_steps": stats,
                "skipped_steps": field("skipped_steps", 0, stats),
                "mean_lr": expect_floats(r, f"{where} attribute 'mean_lr'", attrs.get("mean_lr"), groups, low=0.0),
                "reason": expect_str(r, f"{where} attribute 'reason'", attrs.get("reason")),
            }
        )
    segments.sort(key=lambda s: s["index"])
    previous_end = 0
    for position, segment in enumerate(segments):
        where = f"segments/{segment_name(segment['index'])}"
        if segment["index"] != position:
            raise r.error(where, f"has index {segment['index']}, expected {position} (segments are numbered 0, 1, ...)")
        if segment["start_step"] != previous_end:
            raise r.error(
                where,
                f"covers steps {segment['start_step'] + 1}-{segment['end_step']}, expected it to start right after "
                f"step {previous_end} (segments tile the steps in order, without overlap)",
            )
        previous_end = segment["end_step"]
    if previous_end > num_steps:
        raise r.error("segments", f"end at step {previous_end}, but the step log has {num_steps} rows")
    return segments


def read_checkpoints(r: TraceReader, segments: list[dict[str, Any]], num_steps: int) -> list[CheckpointInfo]:
    checkpoints = []
    for name in r.members("checkpoints"):
        if name == "initial":
            continue
        where = f"checkpoints/{name}"
        if not (name.isascii() and name.isdigit()):
            raise r.error(where, "is not named by a checkpoint index")
        attrs = r.attributes(where)
        info = CheckpointInfo(
            index=expect_int(r, f"{where} attribute 'index'", attrs.get("index"), int(name), int(name)),
            step=expect_int(r, f"{where} attribute 'step'", attrs.get("step"), 1, num_steps),
            segment=expect_int(r, f"{where} attribute 'segment'", attrs.get("segment"), 0, len(segments)),
            epoch=expect_int(r, f"{where} attribute 'epoch'", attrs.get("epoch"), 0),
        )
        if info.segment < len(segments):
            low, high = segments[info.segment]["start_step"], segments[info.segment]["end_step"]
        else:  # taken in the segment that was open when the file was last flushed
            low, high = (segments[-1]["end_step"] if segments else 0), num_steps
        if not low < info.step <= high:
            raise r.error(where, f"is at step {info.step}, outside its segment {info.segment} (steps {low + 1}-{high})")
        checkpoints.append(info)
    return sorted(checkpoints, key=lambda c: c.index)


def state_shapes(r: TraceReader, like: Mapping[str, Tensor] | None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the initial state (checked against ``like`` when given), nothing read."""
    shapes = {}
    for key in r.members("checkpoints/initial"):
        where = f"checkpoints/initial/{key}"
        shape = r.shape_of(where, "fiub")
        if like is not None:
            if key not in like:
                raise r.error(where, "does not fit the given model, which has no such tensor", hint=ARCHITECTURE)
            if tuple(like[key].shape) != shape:
                found = tuple(like[key].shape)
                raise r.error(where, f"has shape {shape}: it does not fit the given model's {found}", hint=ARCHITECTURE)
        shapes[key] = shape
    return shapes


def check_covariance(r: TraceReader, where: str, matrix: np.ndarray) -> None:
    """A covariance sum: symmetric (to rounding) with a diagonal that is non-negative (to rounding).

    Symmetry is tested as ``M v = Mᵀ v`` for two random vectors ``v`` (two matrix-vector products, where
    comparing ``M`` with ``Mᵀ`` entry by entry reads ``Mᵀ`` against the memory order and took 4x longer
    than reading the factors): an asymmetry ``δ`` in one entry moves a product by ``δ·v_j``, far above the
    rounding of symmetric sums (the tolerance is 1e-9 of the largest entry). Rounding also lets a variance
    that is zero in exact arithmetic come out slightly negative: a float32 factor of a stride-1 convolution
    is formed from shifted products with the border rows subtracted (measured: -3.7e-4 against a largest
    entry of 2.9e3 on a ResNet-18's layer-4 convolution, -1.3e-7 relative), so the diagonal may dip to
    ``-64·eps`` of the largest entry (eps of the stored dtype; 7.6e-6 in float32, 1.4e-14 in float64).
    """
    scale = max(float(matrix.max(initial=0.0)), -float(matrix.min(initial=0.0)))
    if matrix.ndim == 2:
        probes = np.random.default_rng().standard_normal((matrix.shape[0], 2))
        gap = float(np.abs(matrix @ probes - matrix.T @ probes).max(initial=0.0))
        if gap > 1e-9 * scale * float(np.abs(probes).sum(axis=0).max(initial=0.0)):
            raise r.error(where, "is not symmetric, expected a covariance sum")
        diagonal = np.diagonal(matrix)
    else:
        diagonal = matrix
    rounding = 64 * float(np.finfo(matrix.dtype).eps) * scale  # read with kinds='f': always a float dtype
    if (diagonal < -rounding).any():
        raise r.error(where, "has negative variances on its diagonal, expected a covariance sum")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
