"""Passes over the training data that estimate curvature after training: EK-FAC eigenvalue corrections,
recomputed K-FAC covariances and exact Gauss-Newton blocks, at given parameters.

Each pass streams the training set in batches (sharded across processes when a Fabric is given,
:class:`PassData`), captures the tracked layers' rows (:mod:`lightning_tda.layers.capture`) and their
pseudo-gradients (:mod:`lightning_tda.layers.fisher`), and accumulates in float64. EK-FAC's correction is
``Λ*_{ij} = E_n[(Q_Sᵀ G_n Q_A)_{ij}²]`` (George et al. 2018; docs/algorithms.md §1), averaged over the
checkpoints passed in. An ``"empirical"`` trace is corrected with the real-label gradients. Nothing here
imports Lightning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_tda.batches import Data, as_loader, move_to, progress_bar, tensors_of
from lightning_tda.curvature.eigen import Curvature, LayerEigenbasis
from lightning_tda.layers.capture import LayerCapture
from lightning_tda.layers.covariances import KFACStatistics
from lightning_tda.layers.fisher import FisherOptions, pseudo_gradient_rows
from lightning_tda.layers.gradients import LayerGradients, compute_dtype
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.tasks import Task
from lightning_tda.trace.cache import FitCache

MAX_DENSE_BLOCK = 20_000  # largest per-layer parameter count for the dense Gauss-Newton block

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
            for part in tensors_of(dataset[index]):
                digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


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

    Accumulated by the callback's :class:`~lightning_tda.layers.covariances.KFACStatistics`: products in float32
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
