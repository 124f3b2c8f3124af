"""Fitting curvature from a trace: EK-FAC, K-FAC or exact Gauss-Newton per layer, at a checkpoint or for a
segment, with its fitted result cached.

``covariances="stream"`` takes a segment's ``(A, S)`` from the covariances the callback recorded;
``"recompute"`` re-estimates them at the checkpoints. EK-FAC then corrects the eigenvalues with one pass
of per-example pseudo-gradients (:mod:`lightning_tda.curvature.passes`). Fitted curvature is cached
(:mod:`lightning_tda.trace.cache`: a sidecar file next to the trace by default), one entry per slot
(kind, covariance source, segment) under a key hashing the checkpoints, options and a fingerprint of the
training data, so a second call reuses it and a refit replaces it. Nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.curvature import passes
from lightning_tda.curvature.eigen import (
    Curvature,
    DenseLayerCurvature,
    LayerEigenbasis,
    eigenbases_from_covariances,
)
from lightning_tda.curvature.passes import PassData
from lightning_tda.layers.fisher import FisherOptions
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.tasks import Task
from lightning_tda.trace import Trace, TraceError, to_json
from lightning_tda.trace.cache import FitCache

CURVATURES = ("ekfac", "kfac", "gauss-newton")
COVARIANCE_SOURCES = ("stream", "recompute")


def fit_curvature(
    trace: Trace,
    model: nn.Module,
    task: Task,
    layers: Sequence[TrackedLayer],
    checkpoints: Sequence[int],
    data: PassData,
    *,
    segment: int | None = None,
    curvature: str = "ekfac",
    covariances: str = "stream",
    fisher: str | None = None,
    samples: int | str | None = None,
    split_examples: bool = False,
    cache: str | bool = "sidecar",
) -> Curvature:
    """Fit per-layer curvature averaged over ``checkpoints``; cached (see :mod:`lightning_tda.trace.cache`).

    Args:
        trace: the trace (covariances of ``segment`` and the checkpoints are read from it).
        model: the trained architecture; each checkpoint is loaded into it (left at the last one).
        task: the task.
        layers: tracked layers of ``model`` to fit.
        checkpoints: checkpoint indices whose corrected eigenvalues (or recomputed factors) are averaged.
        data: the training data of the passes (:class:`PassData`; ``examples`` fits on a random subset).
        segment: the segment whose streamed ``(A, S)`` give the eigenbasis (``covariances="stream"``).
        curvature: ``"ekfac"``, ``"kfac"`` (no correction pass) or ``"gauss-newton"`` (exact dense
            per-layer blocks; small models only).
        covariances: ``"stream"`` (the segment's recorded ``A, S``) or ``"recompute"`` (recompute
            them at the checkpoints over ``data``, what kronfluence does post hoc).
        fisher: ``"true"`` or ``"empirical"``; default: what the trace recorded.
        samples: sampled targets per example in the true-Fisher passes, ``"exact"`` for the exact
            expectation over the predictive distribution, ``None`` for the exact expectation where it
            is affordable (:class:`FisherOptions`).
        split_examples: with several checkpoints, give each checkpoint's passes (correction,
            recomputed covariances) a disjoint random share of the examples, so the average over
            checkpoints sees every example once instead of once per checkpoint (C times cheaper).
            The exact Gauss-Newton blocks are never split.
        cache: where the fit is cached: ``"sidecar"`` (a file next to the trace), ``"trace"`` (inside it)
            or ``"none"``; written by the first process only. ``"gauss-newton"`` fits are never cached
            (dense blocks can be gigabytes).

    Returns:
        ``{layer name: LayerEigenbasis | DenseLayerCurvature}`` in the order of ``layers``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: use one of {', '.join(map(repr, CURVATURES))}.")
    if covariances not in COVARIANCE_SOURCES:
        raise ValueError(f"covariances={covariances!r}: use 'stream' (recorded in training) or 'recompute'.")
    if not checkpoints:
        raise TraceError(
            f"No checkpoints to fit curvature at (segment {segment}); the trace {trace.path} holds none "
            f"there. Record with checkpoints_per_segment >= 1 or choose another segment."
        )
    if covariances == "stream" and curvature != "gauss-newton" and segment is None:
        raise ValueError("covariances='stream' needs the segment whose recorded covariances to use.")
    options = FisherOptions(fisher or trace.fisher, samples, data.seed)
    key_fields = {
        "segment": segment if covariances == "stream" and curvature != "gauss-newton" else None,
        "checkpoints": list(checkpoints),
        "curvature": curvature,
        "covariances": covariances if curvature != "gauss-newton" else None,
        "fisher": options.kind,
        "samples": options.samples,
        "seed": data.seed,
        "examples": data.examples,
        "split_examples": split_examples,
        "layers": [layer.name for layer in layers],
        "data": data.fingerprint(task) if (curvature != "kfac" or covariances == "recompute") else None,
    }
    # streamed factors belong to a segment; recomputed ones to the checkpoints they were computed at (EK-FAC IF's
    # final checkpoint and SOURCE's checkpoints of that segment are different fits and keep different slots)
    streamed = covariances == "stream" and segment is not None
    where = f"segment{segment}" if streamed else "checkpoints" + "-".join(map(str, checkpoints))
    slot, key = f"curvature-{curvature}-{covariances}-{where}", cache_key(key_fields)
    store = FitCache(trace, cache if curvature != "gauss-newton" else "none")
    cached = cached_curvature(store, slot, key, layers, data.device)
    if cached is not None:
        return cached

    if curvature == "gauss-newton":
        fitted = _average_over_checkpoints(
            trace,
            model,
            checkpoints,
            data,
            False,
            lambda part: passes.gauss_newton_blocks(model, layers, task, part, options),
        )
        result: Curvature = {
            layer.name: DenseLayerCurvature(layer.name, layer.shape, fitted[layer.name]) for layer in layers
        }
    else:
        if covariances == "stream":
            factors = {layer.name: trace.covariances(segment, layer.name) for layer in layers}
        else:
            recomputed = _average_over_checkpoints(
                trace,
                model,
                checkpoints,
                data,
                split_examples,
                lambda part: _flatten_pairs(passes.covariances_at(model, layers, task, part, options)),
            )
            factors = {layer.name: (recomputed[f"{layer.name}/A"], recomputed[f"{layer.name}/S"]) for layer in layers}
        bases = eigenbases_from_covariances(factors)
        if curvature == "ekfac":
            corrected = _average_over_checkpoints(
                trace,
                model,
                checkpoints,
                data,
                split_examples,
                lambda part: passes.correct_eigenvalues(bases, model, layers, task, part, options),
            )
            for name, basis in bases.items():
                basis.eigenvalues = corrected[name]
        result = dict(bases)
    data.write_cache(store, slot, key, result, to_json(key_fields))
    return {name: c.to(data.device) for name, c in result.items()}


def fit_segment_curvature(
    trace: Trace,
    model: nn.Module,
    task: Task,
    segment: int,
    data: PassData,
    layers: Sequence[TrackedLayer] | None = None,
    **options: Any,
) -> Curvature:
    """Curvature of ``segment``: its streamed ``(A, S)`` eigenbasis, eigenvalues corrected at (and
    averaged over) the segment's checkpoints. Keyword options as in :func:`fit_curvature`."""
    info = trace.segment(segment)
    layers = list(layers) if layers is not None else trace.tracked_layers(model)
    return fit_curvature(trace, model, task, layers, info.checkpoints, data, segment=segment, **options)


def _flatten_pairs(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    return {f"{name}/{part}": t for name, (a, s) in pairs.items() for part, t in (("A", a), ("S", s))}


def _average_over_checkpoints(
    trace: Trace,
    model: nn.Module,
    checkpoints: Sequence[int],
    data: PassData,
    split_examples: bool,
    compute: Callable[[PassData], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Mean over ``checkpoints`` of ``compute(data)`` at each; with ``split_examples`` checkpoint ``i`` of
    ``C`` passes the ``i``-th of ``C`` disjoint random shares of the data (when it has ``C`` examples)."""
    total: dict[str, Tensor] = {}
    parts = len(checkpoints) if split_examples and data.size() >= len(checkpoints) else 1
    for position, index in enumerate(checkpoints):
        trace.load_checkpoint(model, index)
        for name, value in compute(replace(data, part=(position % parts, parts))).items():
            total[name] = total[name] + value if name in total else value.clone()
    return {name: value / len(checkpoints) for name, value in total.items()}


def cache_key(fields: Mapping[str, Any]) -> str:
    """The hash naming everything a fit depends on (checked against a cached entry's key)."""
    return hashlib.sha1(to_json(fields).encode()).hexdigest()[:20]


def cached_layout(layers: Sequence[TrackedLayer], dense: bool = False) -> dict[str, tuple[int, ...]]:
    """The datasets (name -> shape, float64) a cached fit of ``layers`` consists of: ``<layer>/matrix``
    ``(D, D)`` for dense blocks, else ``<layer>/q_s`` ``(out, out)``, ``<layer>/eigenvalues`` ``(out, a_dim)``
    and ``<layer>/q_a`` ``(a_dim, a_dim)`` (absent for a diagonal input factor: embeddings)."""
    layout: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        out, a_dim = layer.shape
        if dense:
            layout[f"{layer.name}/matrix"] = (out * a_dim, out * a_dim)
            continue
        layout[f"{layer.name}/q_s"] = (out, out)
        layout[f"{layer.name}/eigenvalues"] = (out, a_dim)
        if not layer.diagonal_input:
            layout[f"{layer.name}/q_a"] = (a_dim, a_dim)
    return layout


def cached_curvature(
    cache: FitCache, slot: str, key: str, layers: Sequence[TrackedLayer], device: torch.device, dense: bool = False
) -> Curvature | None:
    """The fit cached in ``slot`` under ``key``, checked against the layers' shapes, or None."""
    tensors = cache.load(slot, key, cached_layout(layers, dense))
    return None if tensors is None else curvature_from_tensors(tensors, layers, device)


def curvature_from_tensors(
    tensors: Mapping[str, Tensor], layers: Sequence[TrackedLayer], device: torch.device
) -> Curvature:
    """Rebuild fitted curvature from cached datasets (``<layer>/matrix`` or ``<layer>/q_a, q_s, eigenvalues``)."""
    result: Curvature = {}
    for layer in layers:
        if f"{layer.name}/matrix" in tensors:
            result[layer.name] = DenseLayerCurvature(layer.name, layer.shape, tensors[f"{layer.name}/matrix"])
        else:
            result[layer.name] = LayerEigenbasis(
                layer.name,
                tensors.get(f"{layer.name}/q_a"),
                tensors[f"{layer.name}/q_s"],
                tensors[f"{layer.name}/eigenvalues"],
            )
    return {name: c.to(device) for name, c in result.items()}
