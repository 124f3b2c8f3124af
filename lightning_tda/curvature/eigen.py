"""Per-layer curvature in a Kronecker eigenbasis, and the matrix functions applied with it.

Per tracked layer (gradient matrix ``(out, a_dim)``) the curvature is approximated as
``A ⊗ S`` (docs/algorithms.md §1). We eigendecompose ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ`` and
keep eigenvalues on the Kronecker grid, ``(out, a_dim)``. An embedding's ``A`` is diagonal (one-hot
inputs), so its ``Q_A`` is the identity and is never formed (``q_a=None``).

Any matrix function ``φ`` of the curvature is applied to a gradient-shaped ``V`` as
``Q_S [φ(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ`` (:meth:`LayerEigenbasis.apply`); the numerically stable
scalar functions SOURCE needs are :func:`exp_decay` and :func:`decay_response`. Nothing of size
``(out·a_dim)²`` is formed, except by :class:`DenseLayerCurvature`, the exact per-layer
Gauss-Newton block for small models (the reference the approximations are tested against).
Eigendecompositions never fail (:func:`symmetric_eigh`). Nothing here imports Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

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
