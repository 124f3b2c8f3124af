"""Curvature: K-FAC / EK-FAC eigenbases per layer and the matrix functions applied with them.

Per tracked layer (gradient matrix ``(out, a_dim)``) the curvature is approximated as
``A ⊗ S`` (ALGORITHMS.md §1). We eigendecompose ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ`` and
keep eigenvalues on the Kronecker grid, ``(out, a_dim)``. An embedding's ``A`` is diagonal (one-hot
inputs), so its ``Q_A`` is the identity and is never formed (``q_a=None``):

* K-FAC: ``Λ = Λ_S Λ_Aᵀ`` (outer product);
* EK-FAC: ``Λ*_{ij} = E_n[(Q_Sᵀ G_n Q_A)_{ij}²]``, one pass of per-example pseudo-gradients ``G_n``
  rotated into the eigenbasis (George et al. 2018), averaged over the checkpoints passed in.

The pseudo-gradients of the true Fisher are, by default, the **exact expectation** over the model's
predictive distribution: each square-root factor of the output Hessian (``task.fisher_factors``) is
back-propagated (K factors for K outputs, in one vmapped backward pass), so ``Σ_k vec(G_{n,k}) vec(G_{n,k})ᵀ``
is the example's Gauss-Newton matrix and the correction has no sampling noise. ``samples=m`` draws ``m`` targets per
example instead (kronfluence draws one); sequence outputs always use samples, because the factors
of a sum over positions cannot be back-propagated jointly without cross-position terms. An
``"empirical"`` trace is corrected with the real-label gradients.

Any matrix function ``φ`` of the curvature is applied to a gradient-shaped ``V`` as
``Q_S [φ(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ`` (:meth:`LayerEigenbasis.apply`); the numerically stable
scalar functions SOURCE needs are :func:`exp_decay` and :func:`decay_response`. Nothing of size
``(out·a_dim)²`` is formed, except by :class:`DenseLayerCurvature`, the exact per-layer
Gauss-Newton block for small models (the reference the approximations are tested against).

Fitted curvature is cached (:mod:`lightning_tda.storage`: a sidecar file next to the trace by default),
one entry per slot (kind, covariance source, segment) under a key hashing the checkpoints, options and
a fingerprint of the training data, so a second call reuses it and a refit replaces it. Nothing here
imports Lightning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_tda.batches import Data, as_loader, move_to, progress_bar
from lightning_tda.capture import LayerCapture, TrackedLayer
from lightning_tda.statistics import outer_sum
from lightning_tda.storage import FitCache
from lightning_tda.tasks import Task
from lightning_tda.trace import Trace, TraceError, to_json

CURVATURES = ("ekfac", "kfac", "gauss-newton")
COVARIANCE_SOURCES = ("stream", "recompute")
DEFAULT_SAMPLES = 4  # targets per example when the exact expectation is not available
MAX_EXACT_FACTORS = 64  # back-propagate every output-Hessian factor up to this many outputs
MAX_DENSE_BLOCK = 20_000  # largest per-layer parameter count for the dense Gauss-Newton block


# ------------------------------------------------------------------------------ matrix functions


def exp_decay(values: Tensor, scale: float | Tensor) -> Tensor:
    """``exp(-scale · σ)`` elementwise (SOURCE's segment Jacobian on eigenvalues σ ≥ 0)."""
    return torch.exp(-scale * values.clamp(min=0))


def decay_response(values: Tensor, scale: float | Tensor) -> Tensor:
    """``(1 - exp(-scale · σ)) / σ`` elementwise, equal to ``scale`` at σ = 0 and accurate near it.

    Computed as ``scale · (-expm1(-x) / x)`` with ``x = scale · σ``, switching to the series
    ``scale · (1 - x/2 + x²/6)`` for ``x < 1e-6`` so nothing divides by (nearly) zero.
    """
    x = scale * values.clamp(min=0)
    small = x < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    ratio = torch.where(small, 1 - x / 2 + x * x / 6, -torch.expm1(-safe) / safe)
    return scale * ratio


def damped_inverse(values: Tensor, damping: float | Tensor) -> Tensor:
    """``1 / (σ + damping)`` elementwise (the influence function's inverse on eigenvalues)."""
    return 1.0 / (values.clamp(min=0) + damping)


# ------------------------------------------------------------------------------ per-layer curvature


@dataclass
class LayerEigenbasis:
    """Eigenbasis of one layer's K-FAC factors plus eigenvalues on the Kronecker grid.

    Attributes:
        name: layer name.
        q_a: ``(a_dim, a_dim)`` float64 eigenvectors of ``A``, or ``None`` for the identity (a diagonal
            ``A``: embeddings, where a dense ``(vocabulary, vocabulary)`` basis would be wasted).
        q_s: ``(out, out)`` float64 eigenvectors of ``S``.
        eigenvalues: ``(out, a_dim)`` float64, EK-FAC corrected ``Λ*`` or ``outer(Λ_S, Λ_A)`` for K-FAC.
    """

    name: str
    q_a: Tensor | None
    q_s: Tensor
    eigenvalues: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_s.shape[0], self.eigenvalues.shape[1])

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues.mean())

    def rotate(self, v: Tensor) -> Tensor:
        """``(..., out, a_dim) -> Q_Sᵀ V Q_A`` (float64)."""
        rotated = self.q_s.T @ v.to(self.q_s.dtype)
        return rotated if self.q_a is None else rotated @ self.q_a

    def unrotate(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`: ``Q_S V Q_Aᵀ``."""
        unrotated = self.q_s @ v.to(self.q_s.dtype)
        return unrotated if self.q_a is None else unrotated @ self.q_a.T

    def apply(self, v: Tensor, values: Tensor) -> Tensor:
        """``Q_S [values ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ`` for ``v`` of shape ``(..., out, a_dim)``; float64."""
        return self.unrotate(values * self.rotate(v))

    def damped_inverse(self, v: Tensor, damping: float) -> Tensor:
        """``(H + damping·I)⁻¹ V`` with this layer's curvature ``H``."""
        return self.apply(v, damped_inverse(self.eigenvalues, damping))

    def tensors(self) -> dict[str, Tensor]:
        basis = {} if self.q_a is None else {"q_a": self.q_a}
        return basis | {"q_s": self.q_s, "eigenvalues": self.eigenvalues}

    def to(self, device: torch.device | str) -> LayerEigenbasis:
        q_a = None if self.q_a is None else self.q_a.to(device)
        return LayerEigenbasis(self.name, q_a, self.q_s.to(device), self.eigenvalues.to(device))


@dataclass
class DenseLayerCurvature:
    """The exact per-layer Gauss-Newton block ``H_l`` (``D × D``, ``D = out·a_dim``, row-major in the
    ``(out, a_dim)`` gradient matrix), for small models and as the reference for EK-FAC.

    Offers the same :meth:`apply` / :meth:`damped_inverse` interface as :class:`LayerEigenbasis`;
    ``eigenvalues`` (``(D,)``) and the eigenvectors are computed on first use, the damped inverse
    uses a Cholesky factorisation instead (cheaper for large blocks).
    """

    name: str
    shape: tuple[int, int]
    matrix: Tensor
    _eigh: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _cholesky: dict[float, Tensor] = field(default_factory=dict, repr=False)

    @property
    def mean_eigenvalue(self) -> float:
        return float(torch.diagonal(self.matrix).mean())

    @property
    def eigenvalues(self) -> Tensor:
        return self._eigendecomposition()[0]

    def _eigendecomposition(self) -> tuple[Tensor, Tensor]:
        if self._eigh is None:
            values, vectors = torch.linalg.eigh(self.matrix)
            self._eigh = (values.clamp(min=0), vectors)
        return self._eigh

    def _flat(self, v: Tensor) -> Tensor:
        return v.to(self.matrix.dtype).reshape(*v.shape[:-2], -1)

    def rotate(self, v: Tensor) -> Tensor:
        """``(..., out, a_dim) -> (..., D)`` coordinates in the eigenbasis."""
        return self._flat(v) @ self._eigendecomposition()[1]

    def unrotate(self, v: Tensor) -> Tensor:
        return (v @ self._eigendecomposition()[1].T).reshape(*v.shape[:-1], *self.shape)

    def apply(self, v: Tensor, values: Tensor) -> Tensor:
        return self.unrotate(values * self.rotate(v))

    def damped_inverse(self, v: Tensor, damping: float) -> Tensor:
        key = float(damping)
        if key not in self._cholesky:
            eye = torch.eye(self.matrix.shape[0], dtype=self.matrix.dtype, device=self.matrix.device)
            self._cholesky[key] = torch.linalg.cholesky(self.matrix + key * eye)
        flat = self._flat(v).reshape(-1, self.matrix.shape[0])
        solved = torch.cholesky_solve(flat.T, self._cholesky[key]).T
        return solved.reshape(*v.shape[:-2], *self.shape)

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    def to(self, device: torch.device | str) -> DenseLayerCurvature:
        return DenseLayerCurvature(self.name, self.shape, self.matrix.to(device))


LayerCurvature = LayerEigenbasis | DenseLayerCurvature
Curvature = dict[str, LayerCurvature]  # keyed by layer name, in the trace's layer order


def eigenbases_from_covariances(covariances: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, LayerEigenbasis]:
    """K-FAC eigenbases from per-layer ``(A, S)`` (float64); eigenvalues ``outer(Λ_S, Λ_A)``.

    A 1-D ``A`` is a diagonal input factor (embeddings): its eigenvalues are the diagonal and its basis
    the identity (``q_a=None``). Tiny negative eigenvalues from round-off are clamped to zero.
    """
    bases = {}
    for name, (a, s) in covariances.items():
        lam_a, q_a = (a.double(), None) if a.dim() == 1 else torch.linalg.eigh(a.double())
        lam_s, q_s = torch.linalg.eigh(s.double())
        bases[name] = LayerEigenbasis(name, q_a, q_s, torch.outer(lam_s.clamp(min=0), lam_a.clamp(min=0)))
    return bases


# ------------------------------------------------------------------------------ pseudo-gradients


@dataclass(frozen=True)
class FisherOptions:
    """Which per-example pseudo-gradients a curvature pass uses.

    ``kind="true"``: ``samples=None`` back-propagates every output-Hessian factor (exact expectation;
    used when outputs are ``(B,)`` or ``(B, K)`` with ``K <= MAX_EXACT_FACTORS``, otherwise
    ``DEFAULT_SAMPLES`` targets are drawn); ``samples=m`` draws ``m`` targets per example.
    ``kind="empirical"``: the real-label training gradient.
    """

    kind: str = "true"
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("true", "empirical"):
            raise ValueError(f"fisher={self.kind!r}: use 'true' or 'empirical'.")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"samples={self.samples!r}: use None (exact expectation) or a positive integer.")


def pseudo_gradient_rows(
    capture: LayerCapture,
    outputs: Tensor,
    targets: Tensor,
    task: Task,
    fisher: FisherOptions,
    generator: torch.Generator | None,
) -> Iterator[tuple[dict[str, Tensor], float]]:
    """Yield ``(output-gradient rows {layer: (B, R, out)}, weight)`` whose weighted per-example outer
    products sum to the example's Fisher (true: Gauss-Newton; empirical: ``g gᵀ``)."""
    if fisher.kind == "empirical":
        yield capture.output_gradient_rows(task.loss(outputs, targets).sum()), 1.0
        return
    exact = (
        fisher.samples is None
        and outputs.dim() <= 2
        and outputs.reshape(len(outputs), -1).shape[1] <= MAX_EXACT_FACTORS
    )
    if exact:
        factors = task.fisher_factors(outputs)
        try:
            yield from ((rows, 1.0) for rows in _batched_output_gradient_rows(capture, outputs, factors))
        except RuntimeError:  # an operation without a batched backward: one backward pass per factor
            for k, factor in enumerate(factors):
                yield capture.output_gradient_rows((outputs * factor).sum(), retain_graph=k < len(factors) - 1), 1.0
        return
    samples = fisher.samples or DEFAULT_SAMPLES
    for s in range(samples):
        sampled = task.sample_targets(outputs, generator, targets=targets)
        loss = task.loss(outputs, sampled).sum()
        yield capture.output_gradient_rows(loss, retain_graph=s < samples - 1), 1.0 / samples


def _batched_output_gradient_rows(capture: LayerCapture, outputs: Tensor, factors: Tensor) -> list[dict[str, Tensor]]:
    """Output-gradient rows of every factor ``⟨factor_k, outputs⟩`` from one vmapped backward pass."""
    names = list(capture.outputs)
    flat = [out for name in names for out in capture.outputs[name]]
    grads = torch.autograd.grad(
        outputs, flat, grad_outputs=factors, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    per_factor: list[dict[str, Tensor]] = [{} for _ in range(len(factors))]
    position = 0
    for name in names:
        layer = next(la for la in capture.layers if la.name == name)
        parts = []
        for out in capture.outputs[name]:
            grad = grads[position]
            position += 1
            parts.append(out.new_zeros(len(factors), *out.shape) if grad is None else grad)
        for k in range(len(factors)):
            per_factor[k][name] = torch.cat([layer.gradient_rows(part[k]) for part in parts], dim=1)
    return per_factor


# ------------------------------------------------------------------------------ passes over data


@dataclass
class PassData:
    """How a curvature pass reads the training data."""

    train: Data
    batch_size: int = 128
    device: torch.device = torch.device("cpu")
    examples: int | None = None  # random subset of this many training examples (seeded)
    seed: int = 0
    shard: tuple[int, int] = (0, 1)  # (rank, world size): this process takes every world-th batch
    reduce: Callable[[Tensor], Tensor] | None = None  # sums a partial result across processes
    barrier: Callable[[], None] | None = None  # waits for every process (Fabric's barrier)
    progress: bool | None = None

    def loader(self, task: Task) -> DataLoader:
        loader = as_loader(self.train, self.batch_size, "train")
        n = len(loader.dataset)
        if self.examples is None or self.examples >= n:
            return loader
        if self.examples < 1:
            raise ValueError(f"correction_examples={self.examples}: use a positive number of examples (or None).")
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.examples]
        subset = Subset(loader.dataset, sorted(chosen.tolist()))
        return DataLoader(subset, batch_size=loader.batch_size or self.batch_size, collate_fn=loader.collate_fn)

    def batches(self, task: Task, desc: str) -> Iterator[Any]:
        loader = self.loader(task)
        rank, world = self.shard
        for position, batch in enumerate(progress_bar(loader, self.progress, desc, len(loader))):
            if position % world == rank:
                yield move_to(batch, self.device)

    def total(self, tensor: Tensor) -> Tensor:
        return tensor if self.reduce is None else self.reduce(tensor)

    def write_cache(self, cache: FitCache, slot: str, key: str, fitted: Curvature, description: str) -> None:
        """Store a fit in the cache from the first process only, then wait for every process.

        Every process fitted the same (all-reduced) result, so the others keep their own copy; the
        barrier makes sure no process opens the file while it is being written (HDF5 locks it).
        """
        if cache.enabled and self.shard[0] == 0:
            tensors = {f"{name}/{part}": t for name, c in fitted.items() for part, t in c.tensors().items()}
            cache.store(slot, key, tensors, description)
        if cache.enabled and self.barrier is not None and self.shard[1] > 1:
            self.barrier()

    def fingerprint(self, task: Task) -> str:
        """Identifies the data of a pass: number of examples and a hash of the first and last batch."""
        loader = as_loader(self.train, self.batch_size, "train")
        digest = hashlib.sha1(str(len(loader.dataset)).encode())
        dataset = loader.dataset
        for index in {0, len(dataset) - 1}:
            for part in _tensors(dataset[index]):
                digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def _tensors(item: Any) -> Iterator[Tensor]:
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, (list, tuple)):
        for part in item:
            yield from _tensors(part)
    elif isinstance(item, dict):
        for key in sorted(item):
            yield from _tensors(item[key])


def _capture(layers: Sequence[TrackedLayer], task: Task, batch: Any) -> LayerCapture:
    """A capture of ``layers`` for one training batch: padded positions (the task's row mask) are not rows."""
    return LayerCapture(layers, row_mask=task.row_mask(batch), batch_size=task.batch_size(batch))


def _evaluate(model: nn.Module, task: Task, batch: Any) -> Tensor:
    """Model outputs of a training batch, with a clear error when the data does not fit the model."""
    try:
        return task.forward(model, batch)
    except RuntimeError as err:
        raise ValueError(
            f"The model could not be evaluated on a training batch ({str(err).splitlines()[0]}). Check that the "
            f"training examples have the shape and type the model was trained on."
        ) from err


def correct_eigenvalues(
    curvature: Mapping[str, LayerEigenbasis],
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    task: Task,
    data: PassData,
    fisher: FisherOptions,
) -> dict[str, Tensor]:
    """EK-FAC corrected eigenvalues at the model's current parameters: ``{layer: (out, a_dim)}`` float64.

    ``Λ*_{ij} = mean_n Σ_k w_k (Q_Sᵀ G_{n,k} Q_A)_{ij}²`` over the pass's examples, with the
    pseudo-gradients ``G_{n,k}`` of :func:`pseudo_gradient_rows`. For one row per example
    (``R = 1``) of a dense layer the square factorises, ``(Q_Sᵀ δ_k)_i² (Q_Aᵀ a)_j²``, so the pass costs
    one ``(out, B) × (B, a_dim)`` product per batch after summing ``(Q_Sᵀ δ_k)²`` over the factors.
    """
    layers = [layer for layer in layers if layer.name in curvature]
    sums = {layer.name: torch.zeros_like(curvature[layer.name].eigenvalues) for layer in layers}
    count = torch.zeros((), dtype=torch.float64)
    generator = torch.Generator(device=data.device).manual_seed(fisher.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(task, "EK-FAC correction"):
            with torch.enable_grad(), _capture(layers, task, batch) as capture:
                outputs = _evaluate(model, task, batch)
                targets = task.targets(batch)
                weighted = list(pseudo_gradient_rows(capture, outputs, targets, task, fisher, generator))
                weights = torch.tensor([w for _, w in weighted], dtype=torch.float64, device=outputs.device)
                for layer in layers:
                    basis, act = curvature[layer.name], capture.activations[layer.name]
                    deltas = torch.stack([rows[layer.name] for rows, _ in weighted]).double()  # (K, B, R, out)
                    total = sums[layer.name]
                    if deltas.shape[2] == 1 and act.shape[1] == 1 and basis.q_a is not None:
                        squared = torch.einsum("k,kbo->bo", weights, (deltas[:, :, 0] @ basis.q_s) ** 2)
                        total += squared.T @ (act[:, 0].double() @ basis.q_a) ** 2  # Σ_k w_k (Q_Sᵀ δ_k)² per example
                    else:
                        for delta, weight in zip(deltas, weights):
                            total += weight * _rotated_gradients(basis, layer, delta, act).pow(2).sum(0)
            count += task.batch_size(batch)
    finally:
        model.train(was_training)
    count = data.total(count)
    if count == 0:
        raise ValueError("The EK-FAC correction pass saw no training examples; pass a non-empty training set.")
    return {name: data.total(total) / count for name, total in sums.items()}


def _rotated_gradients(basis: LayerEigenbasis, layer: TrackedLayer, delta: Tensor, act: Tensor) -> Tensor:
    """Per-example gradients in the eigenbasis, ``Q_Sᵀ G_n Q_A = Σ_r (Q_Sᵀ δ_r)(Q_Aᵀ a_r)ᵀ``: ``(B, out, a_dim)``
    float64 for float64 rows ``delta`` ``(B, R, out)``.

    Rotates the ``R`` rows first when that is cheaper than rotating the ``out × a_dim`` matrices (sequences
    shorter than the layer is wide: ``R (out² + a_dim²) < out·a_dim (out + a_dim)``), and always for an
    embedding, whose ``Q_A`` is the identity.
    """
    out, a_dim = basis.shape
    if basis.q_a is None:
        return layer.gradient_matrices(delta @ basis.q_s, act)
    if delta.shape[1] * (out * out + a_dim * a_dim) < out * a_dim * (out + a_dim):
        return torch.einsum("bro,bri->boi", delta @ basis.q_s, act.double() @ basis.q_a)
    return basis.rotate(layer.gradient_matrices(delta, act))


def covariances_at(
    model: nn.Module, layers: Sequence[TrackedLayer], task: Task, data: PassData, fisher: FisherOptions
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors ``(A, S)`` recomputed at the model's current parameters over the pass's data
    (``A`` per row, ``S`` per example, as the callback streams them; ``A`` is 1-D, the diagonal, for an
    embedding); float64."""
    sums = {
        layer.name: [
            torch.zeros(layer.input_factor_shape, dtype=torch.float64),
            torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64),
        ]
        for layer in layers
    }
    rows_count = {name: torch.zeros((), dtype=torch.float64) for name in sums}
    count = torch.zeros((), dtype=torch.float64)
    generator = torch.Generator(device=data.device).manual_seed(fisher.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(task, "K-FAC covariances"):
            with torch.enable_grad(), _capture(layers, task, batch) as capture:
                outputs = _evaluate(model, task, batch)
                for layer in layers:
                    sums[layer.name][0] += layer.input_sum(capture.activations[layer.name]).cpu()
                    rows_count[layer.name] += capture.row_counts[layer.name].cpu()
                targets = task.targets(batch)
                for rows, weight in pseudo_gradient_rows(capture, outputs, targets, task, fisher, generator):
                    for name in sums:
                        sums[name][1] += weight * outer_sum(rows[name]).cpu()
            count += task.batch_size(batch)
    finally:
        model.train(was_training)
    count = data.total(count)
    return {
        name: (data.total(a) / data.total(rows_count[name]), data.total(s) / count) for name, (a, s) in sums.items()
    }


def gauss_newton_blocks(
    model: nn.Module, layers: Sequence[TrackedLayer], task: Task, data: PassData, fisher: FisherOptions
) -> dict[str, Tensor]:
    """Exact per-layer Gauss-Newton (or empirical Fisher) blocks ``mean_n Σ_k w_k vec(G_{n,k}) vec(G_{n,k})ᵀ``,
    ``(D, D)`` float64 with ``D = out·a_dim``, at the model's current parameters. Small models only."""
    for layer in layers:
        size = layer.out_features * layer.a_dim
        if size > MAX_DENSE_BLOCK:
            raise ValueError(
                f"curvature='gauss-newton' needs a dense {size}x{size} block for layer {layer.name!r} (more than "
                f"{MAX_DENSE_BLOCK} parameters); use curvature='ekfac' for models this large."
            )
    sums = {layer.name: _zeros_like_block(layer) for layer in layers}
    count = torch.zeros((), dtype=torch.float64)
    generator = torch.Generator(device=data.device).manual_seed(fisher.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(task, "Gauss-Newton"):
            with torch.enable_grad(), _capture(layers, task, batch) as capture:
                outputs = _evaluate(model, task, batch)
                targets = task.targets(batch)
                weighted = list(pseudo_gradient_rows(capture, outputs, targets, task, fisher, generator))
                for layer in layers:
                    rows = [(weight**0.5) * rows[layer.name].double() for rows, weight in weighted]
                    _accumulate_block(sums[layer.name], layer, rows, capture.activations[layer.name])
            count += task.batch_size(batch)
    finally:
        model.train(was_training)
    count = data.total(count)
    blocks = {}
    for layer in layers:
        total = data.total(sums.pop(layer.name)) / count  # (out, out, a_dim, a_dim) -> (out·a_dim, out·a_dim)
        blocks[layer.name] = total.permute(0, 2, 1, 3).reshape(layer.out_features * layer.a_dim, -1)
    return blocks


def _zeros_like_block(layer: TrackedLayer) -> Tensor:
    out, a_dim = layer.shape
    return torch.zeros(out, out, a_dim, a_dim, dtype=torch.float64)


def _accumulate_block(total: Tensor, layer: TrackedLayer, weighted_rows: Sequence[Tensor], act: Tensor) -> None:
    """Add ``Σ_n Σ_k vec(G_{n,k}) vec(G_{n,k})ᵀ`` to ``total``, kept as ``(out, out, a_dim, a_dim)``.

    With one row per example of a dense layer, ``G_{n,k} = δ_{n,k} a_nᵀ`` and the sum is ``Σ_n S_n ⊗ A_n``
    with ``S_n = Σ_k δ_{n,k} δ_{n,k}ᵀ``: one ``(out², B) × (B, a_dim²)`` product instead of ``(out·a_dim)²·B·K``.
    """
    out, a_dim = total.shape[0], total.shape[2]
    if act.shape[1] == 1 and not layer.diagonal_input and all(rows.shape[1] == 1 for rows in weighted_rows):
        deltas = torch.stack([rows[:, 0] for rows in weighted_rows], dim=1)  # (B, K, out)
        s_n = torch.einsum("bko,bkp->bop", deltas, deltas).reshape(len(act), -1)
        a_n = torch.einsum("bi,bj->bij", act[:, 0].double(), act[:, 0].double()).reshape(len(act), -1)
        total += (s_n.T.cpu() @ a_n.cpu()).reshape(out, out, a_dim, a_dim)
        return
    flat = torch.cat([layer.gradient_matrices(rows, act).flatten(1) for rows in weighted_rows]).cpu()
    total += (flat.T @ flat).reshape(out, a_dim, out, a_dim).permute(0, 2, 1, 3)


# ------------------------------------------------------------------------------ fitting from a trace


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
    samples: int | None = None,
    cache: str | bool = "sidecar",
) -> Curvature:
    """Fit per-layer curvature averaged over ``checkpoints``; cached (see :mod:`lightning_tda.storage`).

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
        samples: ``None`` for the exact expectation over the predictive distribution, or sampled
            targets per example (true Fisher only).
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
        "layers": [layer.name for layer in layers],
        "data": data.fingerprint(task) if (curvature != "kfac" or covariances == "recompute") else None,
    }
    where = f"segment{segment}" if segment is not None else "checkpoints" + "-".join(map(str, checkpoints))
    slot, key = f"curvature-{curvature}-{covariances}-{where}", cache_key(key_fields)
    store = FitCache(trace, cache if curvature != "gauss-newton" else "none")
    cached = cached_curvature(store, slot, key, layers, data.device)
    if cached is not None:
        return cached

    if curvature == "gauss-newton":
        fitted = _average_over_checkpoints(
            trace, model, checkpoints, lambda: gauss_newton_blocks(model, layers, task, data, options)
        )
        result: Curvature = {
            layer.name: DenseLayerCurvature(layer.name, layer.shape, fitted[layer.name]) for layer in layers
        }
    else:
        if covariances == "stream":
            factors = {layer.name: trace.covariances(segment, layer.name) for layer in layers}
        else:
            recomputed = _average_over_checkpoints(
                trace, model, checkpoints, lambda: _flatten_pairs(covariances_at(model, layers, task, data, options))
            )
            factors = {layer.name: (recomputed[f"{layer.name}/A"], recomputed[f"{layer.name}/S"]) for layer in layers}
        bases = eigenbases_from_covariances(factors)
        if curvature == "ekfac":
            corrected = _average_over_checkpoints(
                trace,
                model,
                checkpoints,
                lambda: correct_eigenvalues(bases, model, layers, task, data, options),
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
    trace: Trace, model: nn.Module, checkpoints: Sequence[int], compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for index in checkpoints:
        trace.load_checkpoint(model, index)
        for name, value in compute().items():
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
