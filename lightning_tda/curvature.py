"""Curvature: K-FAC / EK-FAC eigenbases per layer and the matrix functions applied with them.

Per tracked layer (gradient matrix ``(out, a_dim)``) the curvature is approximated as
``A ⊗ S`` (ALGORITHMS.md §1). We eigendecompose ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ`` and
keep eigenvalues on the Kronecker grid, ``(out, a_dim)``. An embedding's ``A`` is diagonal (one-hot
inputs), so its ``Q_A`` is the identity and is never formed (``q_a=None``):

* K-FAC: ``Λ = Λ_S Λ_Aᵀ`` (outer product);
* EK-FAC: ``Λ*_{ij} = E_n[(Q_Sᵀ G_n Q_A)_{ij}²]``, one pass of per-example pseudo-gradients ``G_n``
  rotated into the eigenbasis (George et al. 2018), averaged over the checkpoints passed in.

The pseudo-gradients of the true Fisher are, where affordable, the **exact expectation** over the
model's predictive distribution: each square-root factor of the output Hessian (``task.fisher_factors``)
is back-propagated (K factors for K outputs, in one vmapped backward pass), so
``Σ_k vec(G_{n,k}) vec(G_{n,k})ᵀ`` is the example's Gauss-Newton matrix and the correction has no
sampling noise. That multiplies the passes' backward and per-factor work by K, so larger models
(K × tracked parameters above ``EXACT_BUDGET``) draw ``DEFAULT_SAMPLES`` targets per example instead
(:class:`FisherOptions`; ``samples=m`` or ``samples="exact"`` choose; kronfluence draws one).
Sequence outputs always use samples, because the factors of a sum over positions cannot be
back-propagated jointly without cross-position terms. An ``"empirical"`` trace is corrected with the
real-label gradients.

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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_tda.batches import Data, as_loader, move_to, progress_bar
from lightning_tda.capture import LayerCapture, TrackedLayer
from lightning_tda.gradients import LayerGradients, compute_dtype
from lightning_tda.statistics import KFACStatistics
from lightning_tda.storage import FitCache
from lightning_tda.tasks import Task
from lightning_tda.trace import Trace, TraceError, to_json

CURVATURES = ("ekfac", "kfac", "gauss-newton")
COVARIANCE_SOURCES = ("stream", "recompute")
DEFAULT_SAMPLES = 4  # targets per example when the exact expectation is not affordable
MAX_EXACT_FACTORS = 64  # back-propagate every output-Hessian factor up to this many outputs
EXACT_BUDGET = 2**24  # ... and while (outputs) × (tracked parameters) stays below this
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

    Inputs that were always zero (a 3×3 kernel's padding taps on a 1×1 feature map: 8 of 9 input
    columns of the widest ResNet convolutions) have unit eigenvectors in ``q_a``
    (:func:`symmetric_eigh`); products with ``q_a`` then copy those columns and multiply only the
    rest, which is exact and makes the rotations of such layers up to ``(a_dim / active)²`` cheaper.
    """

    name: str
    q_a: Tensor | None
    q_s: Tensor
    eigenvalues: Tensor
    _input_split: InputSplit | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._input_split = None if self.q_a is None else InputSplit.of(self.q_a)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_s.shape[0], self.eigenvalues.shape[1])

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues.mean())

    def rotate_inputs(self, x: Tensor) -> Tensor:
        """``X Q_A`` over the last dimension (input rows or gradient matrices), in the basis' dtype."""
        x = x.to(self.q_s.dtype)
        if self.q_a is None:
            return x
        return x @ self.q_a if self._input_split is None else self._input_split.times(x)

    def rotate(self, v: Tensor) -> Tensor:
        """``(..., out, a_dim) -> Q_Sᵀ V Q_A`` (in the basis' dtype, float64 unless cast)."""
        return self.rotate_inputs(self.q_s.T @ v.to(self.q_s.dtype))

    def unrotate(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`: ``Q_S V Q_Aᵀ``."""
        v = v.to(self.q_s.dtype)
        if self.q_a is not None:
            v = v @ self.q_a.T if self._input_split is None else self._input_split.times_transpose(v)
        return self.q_s @ v

    def apply(self, v: Tensor, values: Tensor) -> Tensor:
        """``Q_S [values ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ`` for ``v`` of shape ``(..., out, a_dim)``, in the eigenvectors' dtype."""
        rotated = self.rotate(v)
        return self.unrotate(values.to(rotated.dtype) * rotated)

    def damped_inverse(self, v: Tensor, damping: float) -> Tensor:
        """``(H + damping·I)⁻¹ V`` with this layer's curvature ``H``."""
        return self.apply(v, damped_inverse(self.eigenvalues, damping))

    def tensors(self) -> dict[str, Tensor]:
        basis = {} if self.q_a is None else {"q_a": self.q_a}
        return basis | {"q_s": self.q_s, "eigenvalues": self.eigenvalues}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerEigenbasis:
        """A copy on ``device``, with the eigenvectors in ``dtype`` if given (eigenvalues stay float64).

        Methods apply the curvature in the model's dtype: the decomposition is float64, the products
        with gradients (which are only as precise as the model) need not be."""
        q_a = None if self.q_a is None else self.q_a.to(device, dtype)
        return LayerEigenbasis(self.name, q_a, self.q_s.to(device, dtype), self.eigenvalues.to(device))


@dataclass
class InputSplit:
    """``Q_A`` with (signed) unit columns: ``Q_A[unit_rows, unit_columns] = diag(signs)`` and the rest of it
    ``block = Q_A[rest_rows][:, rest_columns]``, so ``X Q_A`` copies ``unit_rows`` and multiplies ``block``."""

    unit_rows: Tensor
    unit_columns: Tensor
    signs: Tensor
    rest_rows: Tensor
    rest_columns: Tensor
    block: Tensor

    @staticmethod
    def of(q: Tensor) -> InputSplit | None:
        """The split of an orthogonal ``q``, or ``None`` if it has no unit columns."""
        nonzero = q != 0
        unit = (nonzero.sum(dim=0) == 1) & (q.abs().amax(dim=0) == 1)
        if not unit.any():
            return None
        unit_columns, rest_columns = unit.nonzero().flatten(), (~unit).nonzero().flatten()
        unit_rows = nonzero[:, unit_columns].to(torch.int8).argmax(dim=0)
        rest = torch.ones(len(q), dtype=torch.bool, device=q.device)
        rest[unit_rows] = False
        rest_rows = rest.nonzero().flatten()
        signs = q[unit_rows, unit_columns]
        return InputSplit(unit_rows, unit_columns, signs, rest_rows, rest_columns, q[rest_rows][:, rest_columns])

    def times(self, x: Tensor) -> Tensor:
        """``X Q`` over the last dimension."""
        out = torch.empty_like(x)
        out[..., self.unit_columns] = x[..., self.unit_rows] * self.signs
        out[..., self.rest_columns] = x[..., self.rest_rows] @ self.block
        return out

    def times_transpose(self, x: Tensor) -> Tensor:
        """``X Qᵀ`` over the last dimension."""
        out = torch.empty_like(x)
        out[..., self.unit_rows] = x[..., self.unit_columns] * self.signs
        out[..., self.rest_rows] = x[..., self.rest_columns] @ self.block.T
        return out


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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DenseLayerCurvature:
        """A copy on ``device``; the exact reference stays float64 whatever ``dtype`` is asked."""
        return DenseLayerCurvature(self.name, self.shape, self.matrix.to(device))


LayerCurvature = LayerEigenbasis | DenseLayerCurvature
Curvature = dict[str, LayerCurvature]  # keyed by layer name, in the trace's layer order


def eigenbases_from_covariances(covariances: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, LayerEigenbasis]:
    """K-FAC eigenbases from per-layer ``(A, S)``; eigenvalues ``outer(Λ_S, Λ_A)``, float64.

    Each factor goes through :func:`symmetric_eigh`, which does not fail on ill-conditioned or
    rank-deficient factors. A 1-D ``A`` is a diagonal input factor (embeddings): its eigenvalues are the
    diagonal and its basis the identity (``q_a=None``). Tiny negative eigenvalues from round-off are
    clamped to zero.
    """
    bases = {}
    for name, (a, s) in covariances.items():
        lam_a, q_a = (a.double(), None) if a.dim() == 1 else symmetric_eigh(a, f"{name} (input factor A)")
        lam_s, q_s = symmetric_eigh(s, f"{name} (output-gradient factor S)")
        bases[name] = LayerEigenbasis(name, q_a, q_s, torch.outer(lam_s.clamp(min=0), lam_a.clamp(min=0)))
    return bases


EIGH_JITTERS = (1e-12, 1e-9, 1e-6)  # relative to the mean diagonal, tried in turn when LAPACK does not converge
_warned_layers: set[str] = set()


def symmetric_eigh(matrix: Tensor, name: str = "matrix") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric (covariance) factor that does not fail: ``(values (n,), vectors (n, n))``,
    float64, eigenvalues ascending, vectors orthonormal columns with ``matrix ≈ vectors · diag(values) · vectorsᵀ``.

    The factor is converted to float64 and symmetrized. Rows and columns that are exactly zero
    (inputs that are always zero, such as a 3×3 kernel's padding taps on a 1×1 feature map) have unit
    eigenvectors with eigenvalue 0 and are split off, so only the rest is decomposed. If LAPACK does
    not converge (ill-conditioned factors with many repeated eigenvalues, e.g. a 2,304-wide factor
    estimated from fewer rows than its width), it is retried with a jitter ``ε · mean diagonal`` on
    the diagonal for ε in ``EIGH_JITTERS`` (and the eigenvalues shifted back), then decomposed by an
    SVD instead; a warning names the factor once.

    Raises:
        ValueError: the factor holds NaN or infinite values (nothing can be decomposed).
    """
    matrix = matrix.to(torch.float64)
    matrix = (matrix + matrix.T) / 2
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"The curvature factor of {name} holds NaN or infinite values, so it has no eigendecomposition. The "
            f"statistics diverged; fit the curvature again (covariances='recompute') or leave the layer out."
        )
    size, device = matrix.shape[0], matrix.device
    active = (matrix != 0).any(dim=0).nonzero().flatten()
    if len(active) == size:
        values, vectors = _robust_eigh(matrix, name)
        return values, vectors.contiguous()
    inactive = (matrix == 0).all(dim=0).nonzero().flatten()
    values = torch.zeros(size, dtype=torch.float64, device=device)
    vectors = torch.zeros(size, size, dtype=torch.float64, device=device)
    vectors[inactive, torch.arange(len(inactive), device=device)] = 1.0
    if len(active):
        block_values, block_vectors = _robust_eigh(matrix[active][:, active], name)
        columns = len(inactive) + torch.arange(len(active), device=device)
        values[columns] = block_values
        vectors[active[:, None], columns[None, :]] = block_vectors
    return _ascending(values, vectors)


def _ascending(values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.argsort(values)
    return values[order].contiguous(), vectors[:, order].contiguous()


def _robust_eigh(matrix: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric float64 matrix, with jittered retries and an SVD fallback."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        pass
    scale = float(torch.diagonal(matrix).abs().mean()) or 1.0
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for jitter in EIGH_JITTERS:
        try:
            values, vectors = torch.linalg.eigh(matrix + jitter * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        _warn_once(name, f"succeeded after adding {jitter:g} x its mean diagonal to the diagonal")
        return values - jitter * scale, vectors
    vectors, _, _ = torch.linalg.svd(matrix + EIGH_JITTERS[-1] * scale * eye)
    values = torch.einsum("ij,ik,kj->j", vectors, matrix, vectors)  # Rayleigh quotients keep the signs
    _warn_once(name, "fell back to an SVD")
    return _ascending(values, vectors)


def _warn_once(name: str, what: str) -> None:
    if name not in _warned_layers:
        _warned_layers.add(name)
        warnings.warn(
            f"The eigendecomposition of the curvature factor of {name} did not converge (ill-conditioned, many "
            f"repeated eigenvalues) and {what}. The basis is valid; the layer's curvature is as accurate as its "
            f"statistics.",
            RuntimeWarning,
            stacklevel=4,
        )


# ------------------------------------------------------------------------------ pseudo-gradients


@dataclass(frozen=True)
class FisherOptions:
    """Which per-example pseudo-gradients a curvature pass uses.

    ``kind="true"``: ``samples="exact"`` back-propagates every output-Hessian factor (the exact
    expectation over the predictive distribution; outputs ``(B,)`` or ``(B, K)``), ``samples=m`` draws
    ``m`` targets per example, and ``samples=None`` (the default) takes the exact expectation where
    it is affordable (see :meth:`exact_expectation`) and draws ``DEFAULT_SAMPLES`` targets otherwise.
    ``kind="empirical"``: the real-label training gradient.
    """

    kind: str = "true"
    samples: int | str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("true", "empirical"):
            raise ValueError(f"fisher={self.kind!r}: use 'true' or 'empirical'.")
        number = isinstance(self.samples, int) and not isinstance(self.samples, bool) and self.samples >= 1
        if self.samples not in (None, "exact") and not number:
            raise ValueError(
                f"samples={self.samples!r}: use None (exact expectation where affordable), 'exact' or a positive "
                f"integer (sampled targets per example)."
            )

    def exact_expectation(self, outputs: Tensor, layers: Sequence[TrackedLayer]) -> bool:
        """Whether the true-Fisher passes back-propagate all ``K`` output-Hessian factors of ``outputs``.

        With ``samples=None``: when outputs are ``(B,)`` or ``(B, K)`` with ``K <= MAX_EXACT_FACTORS`` and
        ``K`` × the tracked parameters ``<= EXACT_BUDGET``. The exact expectation multiplies the backward
        pass and the per-factor work of the passes by ``K``: on the digits MLP (10 × 26k) it is cheap and
        removes the sampling noise that costs influence accuracy there; on a ResNet-18 at half width
        (10 × 2.8M) it took 1.8x the CPU time of 4 sampled targets, whose scores correlate 0.985 with it
        (BENCHMARKS.md).
        """
        flat = outputs.dim() <= 2
        if self.samples == "exact":
            if not flat:
                raise ValueError(
                    f"samples='exact' back-propagates the output-Hessian factors of (B,) or (B, K) outputs; these "
                    f"are {tuple(outputs.shape)} (a sequence). Pass samples=<number of sampled targets> instead."
                )
            return True
        if self.samples is not None or not flat:
            return False
        factors = outputs.reshape(len(outputs), -1).shape[1]
        parameters = sum(layer.out_features * layer.a_dim for layer in layers)
        return factors <= MAX_EXACT_FACTORS and factors * parameters <= EXACT_BUDGET


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
    if fisher.exact_expectation(outputs, capture.layers):
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
    part: tuple[int, int] = (0, 1)  # (index, count): the index-th of count disjoint random shares (seeded)
    seed: int = 0
    shard: tuple[int, int] = (0, 1)  # (rank, world size): this process takes every world-th batch
    reduce: Callable[[Tensor], Tensor] | None = None  # sums a partial result across processes
    barrier: Callable[[], None] | None = None  # waits for every process (Fabric's barrier)
    progress: bool | None = None

    def loader(self, task: Task) -> DataLoader:
        loader = as_loader(self.train, self.batch_size, "train")
        n = len(loader.dataset)
        if self.examples is not None and self.examples < 1:
            raise ValueError(f"correction_examples={self.examples}: use a positive number of examples (or None).")
        index, count = self.part
        if (self.examples is None or self.examples >= n) and count == 1:
            return loader
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.examples]
        if count > 1:
            shares = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(self.seed + 1))
            chosen = chosen[shares[index::count]]
        subset = Subset(loader.dataset, sorted(chosen.tolist()))
        return DataLoader(subset, batch_size=loader.batch_size or self.batch_size, collate_fn=loader.collate_fn)

    def size(self) -> int:
        """Number of examples the pass reads before any split into parts."""
        n = len(as_loader(self.train, self.batch_size, "train").dataset)
        return n if self.examples is None else min(n, self.examples)

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
    pseudo-gradients ``G_{n,k}`` of :func:`pseudo_gradient_rows` (see :func:`squared_rotated_sum` for
    how each batch is computed). Products are taken in the model's dtype (at least float32) and
    summed in float64; everything stays on the pass's device.
    """
    layers = [layer for layer in layers if layer.name in curvature]
    sums = {layer.name: torch.zeros_like(curvature[layer.name].eigenvalues, device=data.device) for layer in layers}
    count = torch.zeros((), dtype=torch.float64, device=data.device)
    generator = torch.Generator(device=data.device).manual_seed(fisher.seed)
    cast: dict[str, LayerEigenbasis] = {}  # the eigenvectors in the compute dtype, cast once per pass
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(task, "EK-FAC correction"):
            with torch.enable_grad(), _capture(layers, task, batch) as capture:
                outputs = _evaluate(model, task, batch)
                targets = task.targets(batch)
                weighted = list(pseudo_gradient_rows(capture, outputs, targets, task, fisher, generator))
                weights = [w for _, w in weighted]
                for layer in layers:
                    act = capture.activations[layer.name]  # (B, R, a_dim) rows, or an embedding's token ids
                    dtype = compute_dtype(weighted[0][0][layer.name].dtype)
                    if layer.name not in cast:
                        cast[layer.name] = curvature[layer.name].to(data.device, dtype)
                    deltas = torch.stack([rows[layer.name] for rows, _ in weighted]).to(dtype)  # (K, B, R, out)
                    act = act.to(dtype) if act.is_floating_point() else act
                    sums[layer.name] += squared_rotated_sum(layer, deltas, weights, act, cast[layer.name])
            count += task.batch_size(batch)
    finally:
        model.train(was_training)
    count = data.total(count)
    if count == 0:
        raise ValueError("The EK-FAC correction pass saw no training examples; pass a non-empty training set.")
    return {name: data.total(total) / count for name, total in sums.items()}


def squared_rotated_sum(
    layer: TrackedLayer, deltas: Tensor, weights: Sequence[float], activations: Tensor, basis: LayerEigenbasis
) -> Tensor:
    """``Σ_b Σ_k w_k (Q_Sᵀ G_{b,k} Q_A)²`` elementwise, ``G_{b,k} = Σ_r δ_{k,b,r} a_{b,r}ᵀ``: ``(out, a_dim)`` float64.

    Args:
        layer: the tracked layer.
        deltas: ``(K, B, R, out)`` output-gradient rows of the ``K`` pseudo-gradients.
        weights: the ``K`` weights.
        activations: ``(B, R, a_dim)`` input rows (same dtype as ``deltas``), or an embedding's token ids ``(B, R)``.
        basis: the layer's eigenbasis, its eigenvectors in that dtype too.

    For one row per example the square factorises, ``(Q_Sᵀ δ_k)_i² (Q_Aᵀ a)_j²``: one
    ``(out, B) × (B, a_dim)`` product. Otherwise the rows are rotated first (``Q_Aᵀ a_r`` once,
    ``Q_Sᵀ δ_r`` per factor) and the rotated per-example matrices formed from them, or, when that is
    dearer (many rows of a small layer), the per-example matrices are formed and rotated; dense
    matrices exist for a chunk of examples at a time. An embedding's ``Q_A`` is the identity: its rows
    are always rotated first.
    """
    factors, _, rows, out = deltas.shape
    a_dim = layer.a_dim
    if rows == 1 and basis.q_a is not None:
        squared = sum(w * (d[:, 0] @ basis.q_s) ** 2 for d, w in zip(deltas, weights))  # (B, out)
        return (squared.T @ basis.rotate_inputs(activations[:, 0]) ** 2).double()
    total = torch.zeros(out, a_dim, dtype=torch.float64, device=deltas.device)
    rows_first = rows * a_dim**2 + factors * rows * (out**2 + out * a_dim)
    matrices_first = factors * (rows * out * a_dim + out**2 * a_dim + out * a_dim**2)
    if rows_first <= matrices_first or basis.q_a is None:
        rotated_inputs = activations if basis.q_a is None else basis.rotate_inputs(activations)
        for delta, weight in zip(deltas, weights):
            for _, rotated in LayerGradients(layer, delta @ basis.q_s, rotated_inputs).chunks():
                total += weight * rotated.pow(2).sum(0).double()
    else:
        for delta, weight in zip(deltas, weights):
            for _, dense in LayerGradients(layer, delta, activations).chunks():
                total += weight * basis.rotate(dense).pow(2).sum(0).double()
    return total


def covariances_at(
    model: nn.Module, layers: Sequence[TrackedLayer], task: Task, data: PassData, fisher: FisherOptions
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors ``(A, S)`` recomputed at the model's current parameters over the pass's data
    (``A`` per row, ``S`` per example, as the callback streams them; ``A`` is 1-D, the diagonal, for an
    embedding); float64, on the pass's device.

    Accumulated by the callback's :class:`~lightning_tda.statistics.KFACStatistics`: products in float32
    for factors at least 256 wide (float64 below), sums in float64, a stride-1 convolution's ``A`` from
    shifted products of its input rather than unfolded rows, batches with non-finite values left out.
    """
    statistics = KFACStatistics(layers, device=data.device)
    count = torch.zeros((), dtype=torch.float64, device=data.device)
    generator = torch.Generator(device=data.device).manual_seed(fisher.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(task, "K-FAC covariances"):
            capture = LayerCapture(
                layers,
                row_mask=task.row_mask(batch),
                batch_size=task.batch_size(batch),
                on_inputs=statistics.stage_inputs,
            )
            with torch.enable_grad(), capture:
                outputs = _evaluate(model, task, batch)
                targets = task.targets(batch)
                weighted = list(pseudo_gradient_rows(capture, outputs, targets, task, fisher, generator))
                for layer in layers:  # Σ_k w_k δ_k δ_kᵀ per example: the weighted rows of every k together
                    rows = torch.cat([weight**0.5 * rows[layer.name] for rows, weight in weighted], dim=1)
                    statistics.stage_gradients(layer.name, rows)
            statistics.commit()
            count += task.batch_size(batch)
    finally:
        model.train(was_training)
    for total in statistics.flat_tensors():
        total.copy_(data.total(total))
    if data.total(count) == 0:
        raise ValueError("The K-FAC covariance pass saw no training examples; pass a non-empty training set.")
    return {layer.name: statistics.factors(layer.name) for layer in layers}


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
    sums = {layer.name: _zeros_like_block(layer, data.device) for layer in layers}
    count = torch.zeros((), dtype=torch.float64, device=data.device)
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


def _zeros_like_block(layer: TrackedLayer, device: torch.device) -> Tensor:
    out, a_dim = layer.shape
    return torch.zeros(out, out, a_dim, a_dim, dtype=torch.float64, device=device)


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
        total += (s_n.T @ a_n).reshape(out, out, a_dim, a_dim)
        return
    flat = torch.cat([layer.gradient_matrices(rows, act).flatten(1) for rows in weighted_rows])
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
    samples: int | str | None = None,
    split_examples: bool = False,
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
    where = f"segment{segment}" if segment is not None else "checkpoints" + "-".join(map(str, checkpoints))
    slot, key = f"curvature-{curvature}-{covariances}-{where}", cache_key(key_fields)
    store = FitCache(trace, cache if curvature != "gauss-newton" else "none")
    cached = cached_curvature(store, slot, key, layers, data.device)
    if cached is not None:
        return cached

    if curvature == "gauss-newton":
        fitted = _average_over_checkpoints(
            trace, model, checkpoints, data, False, lambda part: gauss_newton_blocks(model, layers, task, part, options)
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
                lambda part: _flatten_pairs(covariances_at(model, layers, task, part, options)),
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
                lambda part: correct_eigenvalues(bases, model, layers, task, part, options),
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
