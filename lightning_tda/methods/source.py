"""SOURCE: training data attribution by segmented stationary unrolling (Bae et al. 2024).

Training is split into the trace's segments ℓ = 1..L. Inside a segment the Hessian, gradients
and learning rate are treated as stationary, which turns the unrolled derivative of the final
parameters into matrix functions of the segment-mean (EK-FAC) Gauss-Newton Hessian H̄_ℓ
(``docs/algorithms.md`` §2)::

    τ(q, z) = Σ_ℓ Σ_{c∈ℓ} (1/C_ℓ) ⟨ u_c(q), ∇ℓ(z, θ_c) ⟩,   u_c = φ_r(H̄_ℓ) S̄_{ℓ+1} ··· S̄_L ∇f(q, θ_c)
    S̄_ℓ = φ_S(H̄_ℓ) = exp(−η̄_ℓ K_ℓ H̄_ℓ),   φ_r(σ) = (1 − exp(−η̄_ℓ K_ℓ σ)) / σ

over the C_ℓ checkpoints θ_c of segment ℓ, with K_ℓ its number of optimizer steps. By default the
query gradient is taken at the same checkpoint as the training gradient it meets
(``query_gradients="checkpoints"``, measured better against re-training far from convergence,
``docs/source.md``); ``query_gradients="final"`` takes it at θ_T, the paper's estimator
``Σ_ℓ ⟨u_ℓ(q), ḡ_ℓ(z)⟩`` of one run's unrolled derivative. Everything is block-diagonal over layers
and every segment has its own eigenbasis per layer, so each S̄ and φ_r is applied by rotating into
that segment's basis and back.

``response="first-order"`` keeps these formulas to first order in the horizon (``S̄ = I``, φ_r(σ) = η̄_ℓ K_ℓ):
the limit before training has acted on the curvature, which is TracInCP's sum with each segment's mean rate.
``response="auto"`` takes it for SGD runs that stopped early, where it ranked better (``docs/source.md``).

Training examples are streamed checkpoint by checkpoint and only dot products are accumulated, so
no per-example training gradients outlive their batch.
Optimizers: SGD (effective rate η(1 − dampening)/(1 − β) with momentum β, Nesterov alike), Adam and
AdamW through the recorded diagonal preconditioner P̄ = 1/(√v̂ + eps) (``docs/source.md``).
Weight decay enters the exponentials as the curvature it adds. Sign: positive = helped the query.
Unit: the scores are ``τ/N`` (the unrolled derivative's 1/N, docs/algorithms.md §2, eq. 22), the predicted
change of the query's measurement when the example is removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.batches import Data
from lightning_tda.curvature.eigen import (
    Curvature,
    DenseLayerCurvature,
    LayerEigenbasis,
    decay_response,
    eigenbases_from_covariances,
    exp_decay,
)
from lightning_tda.curvature.fit import COVARIANCE_SOURCES, CURVATURES, cache_key, cached_curvature, fit_curvature
from lightning_tda.curvature.passes import PassData, correct_eigenvalues, covariances_at, gauss_newton_blocks
from lightning_tda.layers.fisher import FisherOptions
from lightning_tda.layers.gradients import LayerGradients, total_dot
from lightning_tda.methods.base import AttributionMethod, MethodOptions, optimizer_name
from lightning_tda.methods.source_choices import chosen_covariances, chosen_response, settled_segments
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.timeline import ScoreSums, Timeline
from lightning_tda.trace.cache import FitCache, cache_location
from lightning_tda.trace.checks import TraceError
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.schema import to_json

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW")
QUERY_GRADIENTS = ("checkpoints", "final")
RESPONSES = ("auto", "unrolled", "first-order")
_SUPPORTED_TEXT = "SGD (plain, with momentum or Nesterov), Adam and AdamW"


# ------------------------------------------------------------------------------ training dynamics


@dataclass(frozen=True)
class LayerDynamics:
    """How one layer was trained during one segment, as far as SOURCE models it.

    Attributes:
        horizon: ``η̄ K`` times the momentum factor ``(1 − dampening)/(1 − β)`` (SGD): the length of
            the segment in units of (effective) learning rate.
        weight_decay: the optimizer's weight decay of the layer's param group.
        decoupled: AdamW-style decay (``θ ← θ − η·wd·θ``, not preconditioned).
        preconditioner: Adam's diagonal ``P̄ = 1/(√v̂ + eps)`` as an ``(out, a_dim)`` float64 matrix,
            ``None`` for SGD.
    """

    horizon: float
    weight_decay: float
    decoupled: bool
    preconditioner: Tensor | None


def optimizer_kind(trace: Trace) -> str:
    """``"SGD"``, ``"Adam"`` or ``"AdamW"``; raises ``ValueError`` naming the supported optimizers."""
    name = optimizer_name(trace)
    if name not in SUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"SOURCE cannot model the optimizer {trace.optimizer_class} recorded in {trace.path}: it supports "
            f"{_SUPPORTED_TEXT}. Use a method that only needs the final model (e.g. EKFACInfluence) or TracInCP."
        )
    for index, group in enumerate(trace.optimizer.get("param_groups", [])):
        if group.get("maximize"):
            raise ValueError(
                f"SOURCE models minimisation; param group {index} of {trace.path} was trained with maximize=True."
            )
    return name


def segment_second_moment(trace: Trace, segment: int, layer: str) -> Tensor | None:
    """Adam's ``v̂`` of ``layer`` over ``segment``, ``(out, a_dim)`` float64: the mean over the segment's checkpoints
    when the trace holds it at each of them (where SOURCE takes its gradients and curvature), else the mean over the
    segment's statistics steps; None without either.

    The checkpoints' mean is the default because the statistics steps can be few: under the callback's overhead
    budget the modern suite's CNN had one in its first segment, early in the warm-up, whose v̂ put the head's
    preconditioner 30x above the next segment's, and SOURCE's LDS there was 0.34 with it, 0.43 with the
    checkpoints' mean (an A/B on that trace, docs/source.md; within 0.01 on four other AdamW settings)."""
    at_checkpoints = [trace.checkpoint_preconditioner(c, layer) for c in trace.segment(segment).checkpoints]
    if at_checkpoints and all(v is not None for v in at_checkpoints):
        return torch.stack(at_checkpoints).mean(0)
    return trace.preconditioner(segment, layer)


def layer_dynamics(trace: Trace, segment: int, layer: str) -> LayerDynamics:
    """The :class:`LayerDynamics` of ``layer`` in ``segment`` from the trace's optimizer record."""
    kind = optimizer_kind(trace)
    info = trace.segment(segment)
    group_index = next(la.param_group for la in trace.layers if la.name == layer)
    group = trace.optimizer["param_groups"][group_index]
    horizon = float(info.mean_lr[group_index]) * info.num_steps
    weight_decay = float(group.get("weight_decay", 0.0) or 0.0)
    if kind == "SGD":
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta > 0:
            horizon *= (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - beta)
        return LayerDynamics(horizon, weight_decay, False, None)
    second_moment = segment_second_moment(trace, segment, layer)
    if second_moment is None:
        raise TraceError(
            f"The trace {trace.path} holds no Adam second moments for layer {layer!r} in segment {segment} "
            f"(they are recorded on statistics steps). Record with a smaller every_n_steps or fewer segments."
        )
    preconditioner = 1.0 / (second_moment.double().sqrt() + float(group.get("eps", 1e-8)))
    return LayerDynamics(horizon, weight_decay, kind == "AdamW", preconditioner)


def curvature_diagonal(curvature: LayerEigenbasis | DenseLayerCurvature) -> Tensor:
    """Diagonal of a layer's curvature as an ``(out, a_dim)`` matrix.

    EK-FAC: ``diag(Q Λ Qᵀ)_{ij} = Σ_{kl} (Q_S)_{ik}² Λ_{kl} (Q_A)_{jl}²`` (``Q_A = I`` for an embedding).
    """
    if isinstance(curvature, DenseLayerCurvature):
        return torch.diagonal(curvature.matrix).reshape(curvature.shape).clamp(min=0)
    q_s = curvature.q_s.double()
    diagonal = (q_s**2) @ curvature.eigenvalues.clamp(min=0)
    return diagonal if curvature.q_a is None else diagonal @ (curvature.q_a.double() ** 2).T


class SegmentOperators:
    """SOURCE's two matrix functions of one segment, per layer, applied to query-side vectors.

    * :meth:`propagate` applies ``S̄_ℓᵀ`` (the transpose of the segment Jacobian);
    * :meth:`respond` applies ``R_ℓᵀ`` where the segment response is ``r̄_ℓ = R_ℓ ḡ_ℓ``, so that
      ``⟨v, r̄_ℓ(z)⟩ = ⟨R_ℓᵀ v, ḡ_ℓ(z)⟩``.

    SGD: ``S̄ = exp(−t(H̄ + wd))`` and ``R = (1 − exp(−t(H̄ + wd)))/(H̄ + wd)`` on the curvature's
    eigenvalues (symmetric, so transposes are free).

    Adam/AdamW (preconditioner ``P``, ``M = P(H̄ + wd)`` resp. ``wd + P H̄``): ``S̄ = exp(−tM)`` and
    ``R = (1 − exp(−tM)) M⁻¹ P``. With ``p̄`` the layer's geometric-mean preconditioner these are
    applied as the EK-FAC matrix function at the scalar ``p̄`` times a diagonal correction from the
    diagonal Hessian ``d`` (``docs/source.md``)::

        Rᵀ v = F_R(H̄; p̄) [ (f_R(d; P) / f_R(d; p̄)) ⊙ v ],   f_R(σ; p) = p (1 − e^{−t m(σ; p)}) / m(σ; p)
        S̄ᵀ v = F_S(H̄; p̄) [ (f_S(d; P) / f_S(d; p̄)) ⊙ v ],   f_S(σ; p) = e^{−t m(σ; p)}

    which is exact when ``P`` is a multiple of the identity, and when ``H̄`` is diagonal wherever ``P ≥ p̄``.
    The Jacobian's diagonal correction is capped at 1 (it never amplifies): where ``P < p̄`` it would
    undo, entry by entry, decay that the EK-FAC factor applied in another basis, and on a CNN trained
    with AdamW it reached 3e19 and drowned the later segments (``docs/source.md``).
    """

    def __init__(self, curvature: Curvature, dynamics: Mapping[str, LayerDynamics]) -> None:
        self.curvature = dict(curvature)
        self.dynamics = dict(dynamics)
        self._jacobian: dict[str, Tensor] = {}  # on the eigenvalues
        self._response: dict[str, Tensor] = {}
        self._jacobian_scale: dict[str, Tensor] = {}  # diagonal corrections (Adam only)
        self._response_scale: dict[str, Tensor] = {}
        for name, curv in self.curvature.items():
            dyn = self.dynamics[name]
            values = curv.eigenvalues.clamp(min=0)
            if dyn.preconditioner is None:
                self._jacobian[name] = exp_decay(values + dyn.weight_decay, dyn.horizon)
                self._response[name] = decay_response(values + dyn.weight_decay, dyn.horizon)
                continue
            p = dyn.preconditioner.to(values.device)
            p_bar = p.log().mean().exp()
            diagonal = curvature_diagonal(curv)
            self._jacobian[name] = torch.exp(-dyn.horizon * _rate(dyn, p_bar, values))
            self._response[name] = _response(dyn, p_bar, values)
            exponent = -dyn.horizon * (_rate(dyn, p, diagonal) - _rate(dyn, p_bar, diagonal))
            self._jacobian_scale[name] = torch.exp(exponent.clamp(max=0.0))
            self._response_scale[name] = _response(dyn, p, diagonal) / _response(dyn, p_bar, diagonal)

    def propagate(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``S̄_ℓᵀ v`` per layer for ``(..., out, a_dim)`` float64 vectors."""
        return {name: self._apply(name, v, self._jacobian, self._jacobian_scale) for name, v in vectors.items()}

    def respond(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``R_ℓᵀ v`` per layer (the query-side preconditioning of the segment's training gradients)."""
        return {name: self._apply(name, v, self._response, self._response_scale) for name, v in vectors.items()}

    def _apply(self, name: str, v: Tensor, values: dict[str, Tensor], scales: dict[str, Tensor]) -> Tensor:
        if name in scales:
            v = scales[name] * v
        return self.curvature[name].apply(v, values[name])


def _rate(dyn: LayerDynamics, p: Tensor, values: Tensor) -> Tensor:
    """Eigen/diagonal rate of the preconditioned segment dynamics: ``wd + pσ`` (AdamW) or ``p(σ + wd)``."""
    return dyn.weight_decay + p * values if dyn.decoupled else p * (values + dyn.weight_decay)


def _response(dyn: LayerDynamics, p: Tensor, values: Tensor) -> Tensor:
    """``p (1 − e^{−t m}) / m`` with ``m`` the rate; ``p t`` at ``m = 0``."""
    return p * decay_response(_rate(dyn, p, values), dyn.horizon)


class FirstOrderOperators:
    """SOURCE's operators to first order in the horizon (``t·m → 0``): ``S̄ = I`` and ``R = tP`` (``t`` for SGD).

    The limit of :class:`SegmentOperators` where training has not acted on the curvature yet; SOURCE's scores
    become TracInCP's sum ``Σ_c η_c ⟨∇f(q, θ_c), P ∇ℓ(z, θ_c)⟩`` with each segment's mean learning rate and
    preconditioner. No curvature is fitted.
    """

    def __init__(self, dynamics: Mapping[str, LayerDynamics]) -> None:
        self.dynamics = dict(dynamics)

    def propagate(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(vectors)

    def respond(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        result = {}
        for name, v in vectors.items():
            dyn = self.dynamics[name]
            scale = dyn.horizon if dyn.preconditioner is None else dyn.horizon * dyn.preconditioner.to(v.device)
            result[name] = v * scale
        return result


Operators = SegmentOperators | FirstOrderOperators


# ------------------------------------------------------------------------------ the method


class SOURCE(AttributionMethod):
    """SOURCE attribution from a trace (segmented stationary unrolling with EK-FAC curvature).

    Args:
        trace: the recorded trace; its segments are SOURCE's segments.
        model: an instance of the trained architecture.
        task: the task (training loss, query measurement, Fisher factors).
        segments: attribute to these segment indices only (e.g. ``[0]`` for the first stage of a
            two-stage run); ``None``: all. Later segments still propagate the query through ``S̄``.
            Default ``"auto"``: all, except the segments before the loss plateau of an Adam/AdamW run that
            drove its training loss to zero (:func:`settled_segments`); ``Scores.config`` records the
            choice (``segments``) and its reason (``segments_reason``).
        fast: Fast-SOURCE: average the parameters of each segment's checkpoints and fit the
            eigenvalue correction and the training gradients once, at the average.
        query_gradients: ``"checkpoints"`` (default: the query gradient where each training gradient is
            taken) or ``"final"`` (at θ_T, the paper's estimator).
        response: ``"unrolled"``: the segments' matrix functions ``S̄``, ``R`` of the fitted curvature;
            ``"first-order"``: their limit at short horizons (``S̄ = I``, ``R = tP``; no curvature is fitted);
            ``"auto"`` (default): first-order for an SGD run that stopped early, else unrolled
            (:func:`chosen_response`; ``Scores.config`` records ``response`` and ``response_reason``).
        curvature: ``"ekfac"`` (default), ``"kfac"`` (no correction pass) or ``"gauss-newton"``
            (exact dense per-layer blocks, small models only; the reference in tests).
        covariances: where each segment's eigenbasis comes from: ``"stream"`` (the K-FAC covariances the
            callback recorded), ``"recompute"`` (recomputed at the segment's checkpoints, one more pass) or
            ``"auto"`` (default): streamed where the segment holds at least 4 statistics steps, else recomputed
            (:func:`chosen_covariances`; ``Scores.config["covariances_by_segment"]`` has each segment's choice
            and reason, and is empty for the first-order response, which fits no curvature).
        correction_examples: use a random subset of this many training examples for the EK-FAC
            correction pass (default: all).
        split_correction: each of a segment's C checkpoints corrects the eigenvalues on a disjoint
            random 1/C of the examples, so the segment's correction (an average over checkpoints and
            examples) reads every example once rather than C times; ``False`` reads all of them at
            every checkpoint (C times the cost; BENCHMARKS.md compares the two).
        samples: targets drawn per example for the true-Fisher correction; ``None`` uses the exact
            expectation over the predictive distribution where affordable (else 4 sampled targets),
            ``"exact"`` forces it (see ``curvature.FisherOptions``).
        seed: seed of the correction subset and of sampled targets.
        cache: where fitted curvature is reused from and stored: ``"sidecar"`` (a file next to the trace,
            default), ``"trace"`` (inside it) or ``"none"``; see :mod:`lightning_tda.trace.cache`.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.

    Cost: one gradient pass over the training data per checkpoint of the attributed segments
    (one per segment with ``fast=True``) plus the EK-FAC correction passes: about C× an EK-FAC
    influence function for C checkpoints. Memory: the query vectors (``n_queries × parameters``
    per attributed segment) and one training batch of per-example gradients.
    """

    name = "source"
    unit = "predicted change of the query's measurement when the training example is removed: τ/N"

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        segments: Sequence[int] | str | None = "auto",
        fast: bool = False,
        query_gradients: str = "checkpoints",
        response: str = "auto",
        curvature: str = "ekfac",
        covariances: str = "auto",
        correction_examples: int | None = None,
        split_correction: bool = True,
        samples: int | str | None = None,
        seed: int = 0,
        cache: str | bool = "sidecar",
        options: MethodOptions | None = None,
    ) -> None:
        super().__init__(
            trace,
            model,
            task,
            options=options,
        )
        if curvature not in CURVATURES:
            raise ValueError(f"SOURCE(curvature={curvature!r}): use one of {', '.join(map(repr, CURVATURES))}.")
        if query_gradients not in QUERY_GRADIENTS:
            raise ValueError(
                f"SOURCE(query_gradients={query_gradients!r}): use 'checkpoints' (at the checkpoints the training "
                f"gradients are taken at) or 'final' (at the final parameters, the paper's estimator)."
            )
        if response not in RESPONSES:
            raise ValueError(
                f"SOURCE(response={response!r}): use 'auto', 'unrolled' (the segments' matrix functions of the "
                f"curvature) or 'first-order' (their limit at short horizons: no curvature)."
            )
        if covariances not in ("auto", *COVARIANCE_SOURCES):
            raise ValueError(
                f"SOURCE(covariances={covariances!r}): use 'auto', 'stream' (recorded in training) or 'recompute'."
            )
        self.optimizer = optimizer_kind(trace)
        self.fast = fast
        self.query_gradients = query_gradients
        self.requested_response = response
        self.response = response  # "auto" until an attribution settles it
        self.response_reason = "given" if response != "auto" else "settled by the first attribution call"
        self.covariances = covariances
        self.curvature_kind = curvature
        self.correction_examples = correction_examples
        self.split_correction = split_correction
        self.samples = samples
        self.seed = seed
        self.cache = cache_location(cache)
        available = [s.index for s in trace.segments]
        if not available:
            raise TraceError(f"The trace {trace.path} has no closed segments; train for at least one step.")
        if isinstance(segments, str):
            if segments != "auto":
                raise ValueError(f"SOURCE(segments={segments!r}): use 'auto', None (all) or a list of segment indices.")
            chosen, self.segments_reason = settled_segments(trace)
        else:
            chosen = available if segments is None else sorted({int(s) for s in segments})
            self.segments_reason = "given" if segments is not None else "all segments (segments=None)"
        missing = [s for s in chosen if s not in available]
        if missing or not chosen:
            raise ValueError(
                f"SOURCE(segments={list(segments or [])}): segment(s) {missing or '[]'} are not in the trace "
                f"{trace.path}, which has segments {available}. Pass indices from that list."
            )
        self.segments = chosen
        # The query is propagated back from the end of training through every later segment.
        self.needed = [s for s in available if s >= chosen[0]]
        for s in self.needed:
            if not trace.segment(s).checkpoints:
                role = "attributed" if s in chosen else "needed to propagate later segments"
                raise TraceError(
                    f"Segment {s} of {trace.path} ({role}) holds no checkpoints, so its curvature and gradients "
                    f"cannot be evaluated. Record with checkpoints_per_segment >= 1."
                )
        for s in self.needed:  # fail now (not after passes) if the optimizer state is missing
            for layer in self.layers:
                layer_dynamics(trace, s, layer.name)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "segments": list(self.segments),
            "segments_reason": self.segments_reason,
            "fast": self.fast,
            "query_gradients": self.query_gradients,
            "response": self.response,
            "response_reason": self.response_reason,
            "curvature": self.curvature_kind,
            "covariances": self.covariances,
            "covariances_by_segment": (  # the first-order response fits no curvature
                {} if self.response == "first-order" else {str(s): self.segment_covariances(s)[1] for s in self.needed}
            ),
            "correction_examples": self.correction_examples,
            "split_correction": self.split_correction,
            "samples": self.samples,
            "seed": self.seed,
            "optimizer": self.optimizer,
            "horizons": {
                str(s): {la.name: layer_dynamics(self.trace, s, la.name).horizon for la in self.layers}
                for s in self.segments
            },
        }

    # --- curvature and operators ----------------------------------------------------------------
    def _pass_data(self, train: Data) -> PassData:
        world = self.fabric.world_size if self.fabric is not None else 1
        rank = self.fabric.global_rank if self.fabric is not None else 0
        return PassData(
            train,
            batch_size=self.batch_size,
            device=self.device,
            examples=self.correction_examples,
            seed=self.seed,
            shard=(rank, world),
            reduce=self.sum_across_processes if world > 1 else None,
            barrier=self.fabric.barrier if world > 1 else None,
            progress=self.progress,
        )

    def segment_covariances(self, segment: int) -> tuple[str, str]:
        """``("stream" | "recompute", reason)``: where ``segment``'s eigenbasis comes from."""
        if self.covariances == "auto":
            return chosen_covariances(self.trace, segment)
        return self.covariances, "given"

    def segment_curvature(self, segment: int, train: Data) -> Curvature:
        """The fitted curvature of ``segment`` (at its checkpoints, or at their average if ``fast``)."""
        data = self._pass_data(train)
        if not self.fast:
            return fit_curvature(
                self.trace,
                self.model,
                self.task,
                self.layers,
                self.trace.segment(segment).checkpoints,
                data,
                segment=segment,
                curvature=self.curvature_kind,
                covariances=self.segment_covariances(segment)[0],
                samples=self.samples,
                split_examples=self.split_correction,
                cache=self.cache,
            )
        return self._fit_at_average(segment, data)

    def _fit_at_average(self, segment: int, data: PassData) -> Curvature:
        """Fast-SOURCE curvature: streamed eigenbasis, correction (or dense blocks) at the averaged parameters."""
        checkpoints = self.trace.segment(segment).checkpoints
        options = FisherOptions(self.trace.fisher, self.samples, self.seed)
        covariances, _ = self.segment_covariances(segment)
        key_fields = {
            "method": "source-fast",
            "segment": segment,
            "checkpoints": list(checkpoints),
            "curvature": self.curvature_kind,
            "covariances": covariances,
            "samples": self.samples,
            "seed": self.seed,
            "examples": self.correction_examples,
            "layers": [la.name for la in self.layers],
            "data": data.fingerprint(self.task),
        }
        slot, key = f"source-fast-{self.curvature_kind}-segment{segment}", cache_key(key_fields)
        store, dense = FitCache(self.trace, self.cache), self.curvature_kind == "gauss-newton"
        cached = cached_curvature(store, slot, key, self.layers, self.device, dense=dense)
        if cached is not None:
            return cached
        self.model.load_state_dict(self._averaged_state(segment))
        self.model.eval()
        if self.curvature_kind == "gauss-newton":
            blocks = gauss_newton_blocks(self.model, self.layers, self.task, data, options)
            fitted: Curvature = {la.name: DenseLayerCurvature(la.name, la.shape, blocks[la.name]) for la in self.layers}
        else:
            if covariances == "recompute":
                factors = covariances_at(self.model, self.layers, self.task, data, options)
            else:
                factors = {la.name: self.trace.covariances(segment, la.name) for la in self.layers}
            bases = eigenbases_from_covariances(factors)
            if self.curvature_kind == "ekfac":
                corrected = correct_eigenvalues(bases, self.model, self.layers, self.task, data, options)
                for name, basis in bases.items():
                    basis.eigenvalues = corrected[name]
            fitted = dict(bases)
        data.write_cache(store, slot, key, fitted, to_json(key_fields))
        return {name: c.to(self.device) for name, c in fitted.items()}

    def operators(self, train: Data) -> dict[int, Operators]:
        """The operators of every segment the attribution needs, keyed by segment index: the
        :class:`SegmentOperators` of the fitted curvature, or :class:`FirstOrderOperators` (no fit) when the
        response is first-order; ``response="auto"`` is settled here (:func:`chosen_response`)."""
        if self.requested_response == "auto":
            self.response, self.response_reason = chosen_response(self.trace, len(self.loader(train, "train").dataset))
        result: dict[int, Operators] = {}
        for s in self.needed:
            dynamics = {la.name: layer_dynamics(self.trace, s, la.name) for la in self.layers}
            if self.response == "first-order":
                result[s] = FirstOrderOperators(dynamics)
                continue
            curvature = {name: c.to(self.device, self.dtype) for name, c in self.segment_curvature(s, train).items()}
            result[s] = SegmentOperators(curvature, dynamics)
        return result

    def query_vectors(
        self, gradients: Mapping[str, Tensor], operators: Mapping[int, Operators]
    ) -> dict[int, dict[str, Tensor]]:
        """``u_ℓ = R_ℓᵀ S̄_{ℓ+1} ··· S̄_L ∇f`` for every attributed segment ℓ: ``(Q, out, a_dim)`` in the dtype of
        the operators' eigenvectors (the model's; float64 for exact Gauss-Newton blocks)."""
        v = dict(gradients)
        result = {}
        for s in reversed(self.needed):
            if s in self.segments:
                result[s] = operators[s].respond(v)
            if s > self.segments[0]:
                v = operators[s].propagate(v)
        return result

    def segment_query_vectors(
        self, gradients: Mapping[str, Tensor], operators: Mapping[int, Operators], segment: int
    ) -> dict[str, Tensor]:
        """``u_ℓ = R_ℓᵀ S̄_{ℓ+1} ··· S̄_L ∇f`` of one segment ℓ for query gradients ``(Q, out, a_dim)`` taken
        in that segment (the checkpoint pairing), in the dtype of the operators' eigenvectors."""
        v = dict(gradients)
        for s in reversed(self.needed):
            if s > segment:
                v = operators[s].propagate(v)
        return operators[segment].respond(v)

    # --- states the training gradients are taken at ---------------------------------------------
    def _averaged_state(self, segment: int) -> dict[str, Tensor]:
        states = [
            self.trace.checkpoint_state(c, like=self.model.state_dict())
            for c in self.trace.segment(segment).checkpoints
        ]
        averaged = {}
        for key, value in states[-1].items():
            if value.is_floating_point():
                averaged[key] = torch.stack([s[key].double() for s in states]).mean(0).to(value.dtype)
            else:
                averaged[key] = value
        return averaged

    def _gradient_states(self, segment: int) -> Iterator[tuple[Mapping[str, Tensor], float]]:
        """``(model state, weight)`` pairs whose weighted gradients give the segment-mean ``ḡ_ℓ``."""
        if self.fast:
            yield self._averaged_state(segment), 1.0
            return
        checkpoints = self.trace.segment(segment).checkpoints
        for index in checkpoints:
            yield self.trace.checkpoint_state(index, like=self.model.state_dict()), 1.0 / len(checkpoints)

    def _set_state(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state)
        self.model.eval()

    # --- attribution ----------------------------------------------------------------------------
    def _pairs(
        self, queries: Data, operators: Mapping[int, Operators]
    ) -> Iterator[tuple[int, Mapping[str, Tensor], float, dict[str, Tensor]]]:
        """``(segment, state, weight, u)``: the query vectors ``u`` (``{layer: (Q, out, a_dim)}`` in :attr:`dtype`)
        to pair with the training gradients at ``state``. With ``query_gradients="final"`` they are taken once at
        the final parameters and shared by every state of a segment; with ``"checkpoints"`` the query gradients
        are taken at ``state`` itself (one pass over the queries per checkpoint)."""
        if self.query_gradients == "final":
            self.load_checkpoint(self.trace.final_checkpoint.index)
            final = self.query_vectors(self.query_matrices(queries), operators)
            for s in self.segments:
                u = {name: v.to(self.dtype) for name, v in final.pop(s).items()}
                for state, weight in self._gradient_states(s):
                    yield s, state, weight, u
            return
        for s in self.segments:
            for state, weight in self._gradient_states(s):
                self._set_state(state)
                u = self.segment_query_vectors(self.query_matrices(queries), operators, s)
                yield s, state, weight, {name: v.to(self.dtype) for name, v in u.items()}

    def _score(self, queries: Data, train: Data, over_time: bool) -> ScoreSums:
        """The one scoring pass of :meth:`attribute` and :meth:`attribute_over_time` (per segment if ``over_time``)."""
        n_train = len(self.loader(train, "train").dataset)
        operators = self.operators(train)
        n_queries = len(self.loader(queries, "query").dataset)
        segments = self.segments if over_time else None
        sums = self.score_sums(n_queries, n_train, 1.0 / self.training_set_size(n_train), segments)
        for s, state, weight, u in self._pairs(queries, operators):
            sums.enter(s)
            self._set_state(state)
            for ids, batch in self.train_batches(train, f"SOURCE segment {s}"):
                sums.add(ids.to(self.device), weight * total_dot(self.gradient_rows(batch, "train"), u))
        return sums

    def attribute(self, queries: Data, train: Data) -> Scores:
        """Scores ``(n_queries, n_train)``: ``τ(q, z) = Σ_ℓ Σ_c w_c ⟨u_c(q), ∇ℓ(z, θ_c)⟩``; positive = helped."""
        values = self._score(queries, train, over_time=False).scores()
        return self.scores(values, *values.shape)

    def attribute_over_time(self, queries: Data, train: Data, *, keep: int | None = None) -> Timeline:
        """The scores of :meth:`attribute` split by segment ``ℓ`` (the terms ``Σ_{c∈ℓ} w_c ⟨u_c, ∇ℓ(z, θ_c)⟩``),
        one pass: ``values`` ``(S, Q, N)`` for the attributed segments."""
        return self.timeline(self._score(queries, train, over_time=True), keep)

    def self_influence(self, train: Data) -> Scores:
        """``τ(z, z)/N`` for every training example, shape ``(N,)``, without forming the ``N × N`` matrix.

        The query measurement is the example's own training loss, its gradient taken where the query
        gradients are (at each checkpoint, or at the final parameters). The segments' model states are
        held in memory (one copy per checkpoint) and swapped per batch; the query vectors exist for one
        layer and one chunk of examples at a time.
        """
        n_train = len(self.loader(train, "train").dataset)
        operators = self.operators(train)
        final = self.trace.checkpoint_state(self.trace.final_checkpoint.index, like=self.model.state_dict())
        states = [(s, state, weight) for s in self.segments for state, weight in self._gradient_states(s)]
        values = torch.zeros(n_train, dtype=torch.float64, device=self.device)
        for ids, batch in self.train_batches(train, "SOURCE self-influence"):
            along: list[tuple[int, float, dict[str, LayerGradients]]] = []
            for s, state, weight in states:
                self._set_state(state)
                along.append((s, weight, self.gradient_rows(batch, "train")))
            total = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
            if self.query_gradients == "final":
                self._set_state(final)
                for name, g in self.gradient_rows(batch, "train").items():
                    for chunk, dense in g.chunks():
                        vectors = self.query_vectors({name: dense}, operators)
                        for s, weight, grads in along:
                            total[chunk] += weight * grads[name][chunk].self_dot(vectors[s][name])
            else:
                for s, weight, grads in along:
                    for name, g in grads.items():
                        for chunk, dense in g.chunks():
                            u = self.segment_query_vectors({name: dense}, operators, s)[name]
                            total[chunk] += weight * g[chunk].self_dot(u)
            values[ids.to(self.device)] = total
        values = self.sum_across_processes(values) / self.training_set_size(n_train)
        return self.scores(values, None, n_train, kind="self")
