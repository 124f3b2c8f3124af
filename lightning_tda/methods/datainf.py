"""DataInf (Kwon et al. 2023) and the baselines it is judged against: exact block-diagonal influence,
LiSSA and Hessian-free, all from the final checkpoint of a trace.

Per tracked layer ``l`` (usually the LoRA adapters of a peft model, ``modules="lora"``) with
per-example training gradients ``g_{l,i}`` (``d_l`` entries) and query gradients ``v_{l,q}``, every
method here forms ``r_{l,q} ≈ (G_l + λ_l I)⁻¹ v_{l,q}`` with ``G_l = 1/n Σ_i g_{l,i} g_{l,i}ᵀ`` and
scores training example ``k`` for query ``q`` as ``Σ_l r_{l,q}ᵀ g_{l,k}``. They differ only in ``r``:

* :class:`DataInf` swaps inversion and averaging and applies Sherman–Morrison (Algorithm 1)::

      r_l = 1/(n λ_l) Σ_i (v_l − c_{l,i} g_{l,i}),   c_{l,i} = v_lᵀ g_{l,i} / (λ_l + ‖g_{l,i}‖²)

  O(Σ_l n d_l) time, no ``d_l × d_l`` matrix.
* :class:`ExactInfluence` solves with the ``d_l × d_l`` matrix ``G_l + λ_l I`` (small layers only).
* :class:`LiSSA`: the paper's 10-iteration recursion ``r_j = v + (I − (G_l + λ_l I)) r_{j−1}``,
  ``r_0 = v``, with ``G_l r`` streamed over the training set (one pass per iteration).
* :class:`HessianFree`: ``r = v`` (plain gradient dot products).

Damping (all but Hessian-free): ``λ_l = damping_scale · 1/(n d_l) Σ_i ‖g_{l,i}‖²`` (the paper's
0.1 by default), or a fixed ``damping`` for every layer.

Sign: the paper's ``I(z_k) = −Σ_l r_lᵀ g_{l,k}`` is the change of the query loss when ``z_k`` is
up-weighted, so positive there means *harmful*. These classes return ``+Σ_l r_lᵀ g_{l,k}``, the
library's convention: positive = the training example helped the query (removing it raises the
query loss). For mislabel detection with the paper's mean validation gradient
(``mean_query=True``), mislabeled examples get the most *negative* scores.

Unit: scores are divided by N, the size of the training set, so one unit is the predicted change of
the query's measurement when the example is removed (``G_l`` is the curvature of the *mean* loss).
DataInf's swapped inverse overshoots the exact ``(G_l + λ_l I)⁻¹ v``: with ``λ_l`` far below the
squared gradient norms it is about ``v/λ_l`` (on the rank-2 LoRA test model its largest scores were
100–175x the exact ones). So DataInf rescales each query's ``r`` by the one scalar that brings it
closest to the exact solution in the curvature's norm (:meth:`LayerwiseInfluence.curvature_rescale`,
from the scoring pass's own dot products, no extra pass; recorded as ``config["curvature_rescale"]``):
0.2–0.3x the exact scores there, the shortfall being the cosine between the two directions. One
positive scalar per query changes no ranking.

Passes over the training set (per-example gradients exist for one batch at a time only):
DataInf 3 with the automatic λ (squared norms, then ``r``, then scores) and 2 with a fixed
``damping``; Exact 2; LiSSA ``iterations + 1``; Hessian-free 1. Queries are handled as a
``(Q, d_l)`` matrix per layer, so many queries cost no extra pass; memory beyond the model is
``O(Q Σ_l d_l)`` for the query matrices plus the ``(Q, N)`` scores (``d_l²`` per layer for Exact).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.batches import Data
from lightning_tda.layers.gradients import LayerGradients
from lightning_tda.layers.tracked import LORA_PATTERNS, TrackedLayer, UnsupportedModelError, find_layers
from lightning_tda.methods.base import AttributionMethod, MethodOptions
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.trace.reader import Trace

Gradients = dict[str, Tensor]  # layer name -> (Q, d_l) float64 query-side rows


def select_modules(
    model: nn.Module, layers: list[TrackedLayer], modules: str | Sequence[str] | None
) -> list[TrackedLayer]:
    """Restrict tracked ``layers`` to ``modules``: ``None`` (all), ``"lora"`` (peft LoRA adapters) or
    fnmatch patterns on layer names. Raises a ``ValueError`` naming the fix when nothing is left."""
    if modules is None:
        return layers
    if modules == "lora":
        find_layers(model, "lora")  # raises UnsupportedModelError when the model has no LoRA adapters
        patterns: Sequence[str] = LORA_PATTERNS
    else:
        patterns = [modules] if isinstance(modules, str) else list(modules)
    chosen = [la for la in layers if any(fnmatch.fnmatchcase(la.name, p) for p in patterns)]
    if not chosen:
        hint = "record with TDACallback(layers='lora')" if modules == "lora" else "pass patterns that match them"
        raise UnsupportedModelError(
            f"modules={modules!r} matches none of the trace's tracked layers {[la.name for la in layers]}; {hint}."
        )
    return chosen


def _flat(gradients: LayerGradients) -> Tensor:
    """Dense per-example gradients flattened, ``(B, d_l)`` float64 (small layers: explicit ``d_l × d_l`` matrices)."""
    return gradients.dense().flatten(1).double()


class LayerwiseInfluence(AttributionMethod):
    """Influence ``Σ_l r_{l,q}ᵀ g_{l,k}`` from the final checkpoint, per layer; subclasses form ``r``.

    Args:
        trace: the recorded trace; only its final checkpoint is used.
        model: an instance of the trained architecture (a peft model for ``modules="lora"``).
        task: per-example training losses and query measurements (lower is better).
        modules: ``None`` (all tracked layers), ``"lora"`` (the peft LoRA A/B adapters) or fnmatch
            patterns on layer names.
        mean_query: score against the mean query gradient (the paper's "influence on the validation
            loss"): one row, query id ``-1``. Otherwise one row per query.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.
    """

    name = "layerwise"
    unit = "predicted change of the query's measurement when the training example is removed: rᵀg/N"
    rescaled = False  # apply curvature_rescale per query (DataInf: its r overshoots the exact one)
    rescale_factors: list[float] | None = None

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        modules: str | list[str] | None = None,
        mean_query: bool = False,
        options: MethodOptions | None = None,
    ) -> None:
        super().__init__(
            trace,
            model,
            task,
            options=options,
        )
        self.modules = modules
        self.mean_query = mean_query
        self.layers = select_modules(self.model, self.layers, modules)
        self.dims = {la.name: la.out_features * la.a_dim for la in self.layers}

    # --- public API -----------------------------------------------------------------------------
    def attribute(self, queries: Data, train: Data) -> Scores:
        """Scores ``(Q, N)`` (``(1, N)`` with ``mean_query``); positive = the training example helped."""
        values, n_queries = self._attribute(queries, train, per_layer=False)
        return self._as_scores(values[0], n_queries)

    def attribute_per_layer(self, queries: Data, train: Data) -> dict[str, Scores]:
        """``{layer name: Scores}``, each layer's contribution; they sum to :meth:`attribute`."""
        values, n_queries = self._attribute(queries, train, per_layer=True)
        return {la.name: self._as_scores(values[j], n_queries) for j, la in enumerate(self.layers)}

    def config(self) -> dict[str, Any]:
        config = {**super().config(), "modules": self.modules, "mean_query": self.mean_query}
        if self.rescale_factors is not None:
            config["curvature_rescale"] = self.rescale_factors
        return config

    def self_influence(self, train: Data) -> Scores:
        """``Σ_l g_{l,k}ᵀ A_l g_{l,k} / N`` with ``A_l`` the method's approximation of ``(G_l + λ_l I)⁻¹``
        (the identity for Hessian-free): kind ``"self"``, shape ``(N,)``. Large = unusual or mislabeled.
        No per-example rescaling (it would reorder the ranking)."""
        n_train = len(self.loader(train, "train").dataset)
        self.load_checkpoint(self.trace.final_checkpoint.index)
        inverses = self.inverse_matrices(train)
        values = torch.zeros(n_train, dtype=torch.float64, device=self.device)
        for ids, grads in self.train_gradients(train, f"{self.name}: self-influence"):
            ids = ids.to(self.device)
            for name, g in grads.items():
                if inverses[name] is None:
                    values[ids] += g.squared_norms()
                else:
                    flat = _flat(g)
                    values[ids] += ((flat @ inverses[name]) * flat).sum(1)
        values = self.sum_across_processes(values) / self.training_set_size(n_train)
        return self.scores(values, None, n_train, kind="self")

    # --- to implement ---------------------------------------------------------------------------
    def inverse_products(self, query_grads: Gradients, train: Data) -> Gradients:
        """``{layer: r (Q, d_l) float64}``: the approximate ``(G_l + λ_l I)⁻¹ v`` of each query row."""
        raise NotImplementedError

    def inverse_matrices(self, train: Data) -> dict[str, Tensor | None]:
        """``{layer: (d_l, d_l) float64}``, the approximate inverse as a matrix (``None`` = identity);
        used by :meth:`self_influence`."""
        raise NotImplementedError

    # --- shared passes --------------------------------------------------------------------------
    def train_gradients(self, train: Data, desc: str) -> Iterator[tuple[Tensor, dict[str, LayerGradients]]]:
        """``(ids, per-layer gradients)`` for this process's training batches, one batch at a time."""
        for ids, batch in self.train_batches(train, desc):
            yield ids, self.gradient_rows(batch, "train")

    def query_gradients(self, queries: Data) -> Gradients:
        """``{layer: (Q, d_l)}`` query gradients, or their mean ``(1, d_l)`` with ``mean_query``."""
        rows: dict[str, list[Tensor]] = {la.name: [] for la in self.layers}
        count = 0
        for _, batch in self.batches(queries, "query", f"{self.name}: query gradients"):
            for name, g in self.gradients(batch, "query").items():
                g = g.reshape(len(g), -1).double()
                rows[name].append(g.sum(0, keepdim=True) if self.mean_query else g)
            count += self.task.batch_size(batch)
        if self.mean_query:
            return {name: torch.cat(parts).sum(0, keepdim=True) / count for name, parts in rows.items()}
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def sum_dict(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`sum_across_processes` of every tensor of a dict."""
        return {name: self.sum_across_processes(t) for name, t in tensors.items()}

    def train_sum(
        self, train: Data, desc: str, term: Callable[[str, LayerGradients], Tensor]
    ) -> tuple[dict[str, Tensor], int]:
        """One pass: ``({layer: Σ_batches term(layer, batch gradients)}, n)`` over all training examples."""
        sums: dict[str, Tensor] = {}
        count = 0
        for ids, grads in self.train_gradients(train, desc):
            for name, g in grads.items():
                part = term(name, g)
                sums[name] = part if name not in sums else sums[name] + part
            count += len(ids)
        total = self.sum_across_processes(torch.tensor([float(count)], dtype=torch.float64))
        return self.sum_dict(sums), int(total.item())

    def _attribute(self, queries: Data, train: Data, per_layer: bool) -> tuple[Tensor, int]:
        """Score matrix ``(L or 1, Q, N)`` float64 and the number of queries, in the library's unit
        (divided by N; see :meth:`curvature_rescale` for the per-query factor some methods add)."""
        n_train = len(self.loader(train, "train").dataset)
        n_queries = len(self.loader(queries, "query").dataset)
        self.load_checkpoint(self.trace.final_checkpoint.index)
        query_grads = self.query_gradients(queries)
        products = self.inverse_products(query_grads, train)
        rows = next(iter(products.values())).shape[0]
        cast = {name: r.to(self.dtype) for name, r in products.items()}  # the dot products run in the model's dtype
        values = torch.zeros(
            len(self.layers) if per_layer else 1, rows, n_train, dtype=torch.float64, device=self.device
        )
        curvature_products = {name: torch.zeros_like(r) for name, r in products.items()} if self.rescaled else None
        count = 0
        for ids, grads in self.train_gradients(train, f"{self.name}: scores"):
            ids = ids.to(self.device)
            for j, la in enumerate(self.layers):
                dots = grads[la.name].dot(cast[la.name])  # (rows, B) float64
                values[j if per_layer else 0][:, ids] += dots
                if curvature_products is not None:  # Σ_i (r·g_i) g_i: G r, from the same dot products
                    curvature_products[la.name] += grads[la.name].weighted_sum(dots).flatten(1)
            count += len(ids)
        values = self.sum_across_processes(values) / self.training_set_size(n_train)
        if curvature_products is not None:
            n = int(self.sum_across_processes(torch.tensor([float(count)], dtype=torch.float64)).item())
            curvature = {name: t / n for name, t in self.sum_dict(curvature_products).items()}
            factors = self.curvature_rescale(query_grads, products, curvature)
            self.rescale_factors = factors.tolist()
            values *= factors.to(values.device)[None, :, None]
        return values, n_queries

    def curvature_rescale(self, query_grads: Gradients, products: Gradients, curvature: Gradients) -> Tensor:
        """``(rows,)``: per query, the scalar ``s = Σ_l ⟨r_l, v_l⟩ / Σ_l ⟨r_l, (G_l + λ_l I) r_l⟩`` that
        brings the approximate ``r ≈ (G + λI)⁻¹ v`` closest to the exact one in the curvature's own norm
        (it minimises ``‖s·r − (G + λI)⁻¹ v‖_{G+λI}``; ``s = 1`` for the exact ``r``). A factor that
        comes out non-positive or non-finite is left at 1, so no ranking is ever reversed."""
        numerator = sum((products[name] * query_grads[name]).sum(1) for name in products)
        denominator = sum(
            (products[name] * (curvature[name] + self.lambdas[name] * products[name])).sum(1) for name in products
        )
        factors = numerator / denominator
        return torch.where(torch.isfinite(factors) & (factors > 0), factors, torch.ones_like(factors))

    def _as_scores(self, values: Tensor, n_queries: int) -> Scores:
        if self.mean_query:
            return Scores(
                values.float().cpu(), torch.arange(values.shape[1]), torch.tensor([-1]), self.name, self.config()
            )
        return self.scores(values, n_queries, values.shape[1])


class DampedInfluence(LayerwiseInfluence):
    """Layer-wise influence with a damped Gauss–Newton block ``G_l + λ_l I`` (see the module docstring).

    Args:
        damping: a fixed ``λ > 0`` for every layer; ``None`` uses ``damping_scale`` per layer.
        damping_scale: ``λ_l = damping_scale · mean_i ‖g_{l,i}‖² / d_l`` (the paper: 0.1).
        Others: as in :class:`LayerwiseInfluence`.
    """

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        damping: float | None = None,
        damping_scale: float = 0.1,
        modules: str | list[str] | None = None,
        mean_query: bool = False,
        options: MethodOptions | None = None,
    ) -> None:
        if damping is not None and not damping > 0:
            raise ValueError(f"{type(self).__name__}(damping={damping!r}): use a positive number, or None for auto.")
        if not damping_scale > 0:
            raise ValueError(f"{type(self).__name__}(damping_scale={damping_scale!r}) must be positive (paper: 0.1).")
        super().__init__(
            trace,
            model,
            task,
            modules=modules,
            mean_query=mean_query,
            options=options,
        )
        self.damping = damping
        self.damping_scale = damping_scale
        self.lambdas: dict[str, float] = {}

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "damping": self.damping,
            "damping_scale": self.damping_scale,
            "lambdas": dict(self.lambdas),
        }

    def set_lambdas(self, squared_norm_sums: dict[str, Tensor] | None, n: int) -> dict[str, float]:
        """``λ_l`` from ``Σ_i ‖g_{l,i}‖²`` (or the fixed ``damping``); an all-zero layer is an error."""
        if self.damping is not None:
            self.lambdas = {la.name: float(self.damping) for la in self.layers}
            return self.lambdas
        self.lambdas = {}
        for la in self.layers:
            value = self.damping_scale * float(squared_norm_sums[la.name]) / (n * self.dims[la.name])
            if not value > 0:
                raise ValueError(
                    f"Layer {la.name!r} has a zero gradient on every training example, so its damping "
                    f"λ = {self.damping_scale}·mean‖g‖²/d is 0 and (G + λI) is singular. Leave the layer out "
                    f"(options.layers / modules=[...]), or pass a fixed damping > 0."
                )
            self.lambdas[la.name] = value
        return self.lambdas

    def fit_lambdas(self, train: Data) -> dict[str, float]:
        """A pass summing squared gradient norms (skipped with a fixed ``damping``)."""
        if self.damping is not None:
            return self.set_lambdas(None, 0)
        sums, n = self.train_sum(train, f"{self.name}: damping", lambda _, g: g.squared_norms().sum())
        return self.set_lambdas(sums, n)

    # --- self-influence through an explicit d×d inverse (small layers) ---------------------------
    max_dim: int = 4096

    def check_dims(self, what: str) -> None:
        too_big = {name: d for name, d in self.dims.items() if d > self.max_dim}
        if too_big:
            name, d = max(too_big.items(), key=lambda kv: kv[1])
            raise ValueError(
                f"{type(self).__name__}: {what} needs a d×d matrix per layer, and layer {name!r} has d = {d} "
                f"parameters ({d * d * 8 / 2**30:.2f} GiB in float64, O(d³) to factor), above max_dim="
                f"{self.max_dim}. Restrict to smaller layers (modules='lora' or options.layers), or raise "
                f"max_dim if the memory and time are affordable."
            )

    def self_influence(self, train: Data) -> Scores:
        """See :meth:`LayerwiseInfluence.self_influence`; needs a ``d_l × d_l`` matrix per layer, so
        layers above ``max_dim`` are refused."""
        self.check_dims("self-influence")
        return super().self_influence(train)


class DataInf(DampedInfluence):
    """DataInf (Kwon et al. 2023, Algorithm 1): closed-form influence for LoRA-tuned and small models.

    ``(1/n Σ g gᵀ + λI)⁻¹ ≈ 1/n Σ (g gᵀ + λI)⁻¹ = 1/(nλ) Σ (I − g gᵀ/(λ + ‖g‖²))`` per layer, applied
    to a ``(Q, d_l)`` matrix of query gradients in one pass over the training set
    (``c = V gᵀ / (λ + ‖g‖²)``, ``r = (V − 1/n Σ c g) / λ``), then a second pass scores. The
    approximation error grows with ``d_l`` (Theorem 1), hence LoRA adapters (``modules="lora"``).

    Positive = helpful, i.e. the negative of the paper's ``I_DataInf``.

    Args:
        damping, damping_scale: see :class:`DampedInfluence` (paper: ``damping_scale=0.1``).
        modules: ``"lora"`` for the peft adapters, patterns, or ``None`` for all tracked layers.
        mean_query: the paper's mean validation gradient (one row) instead of one row per query.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.

    Example::

        scores = DataInf(trace, model=MyModule(), task=task, modules="lora").attribute(val_set, train_set)
    """

    name = "datainf"
    unit = "predicted change of the query's measurement when the training example is removed: s·rᵀg/N"
    rescaled = True

    def inverse_products(self, query_grads: Gradients, train: Data) -> Gradients:
        lambdas = self.fit_lambdas(train)

        queries = {name: v.to(self.dtype) for name, v in query_grads.items()}

        def shrink(name: str, g: LayerGradients) -> Tensor:  # Σ_i c_{q,i} g_i with c = v·g / (λ + ‖g‖²)
            c = g.dot(queries[name]) / (lambdas[name] + g.squared_norms())
            return g.weighted_sum(c).flatten(1)

        sums, n = self.train_sum(train, "datainf: r", shrink)
        return {name: (v - sums[name] / n) / lambdas[name] for name, v in query_grads.items()}

    def inverse_matrices(self, train: Data) -> dict[str, Tensor]:
        lambdas = self.fit_lambdas(train)

        def weighted_outer(name: str, g: LayerGradients) -> Tensor:  # Σ_i g_i g_iᵀ / (λ + ‖g_i‖²)
            flat = _flat(g)
            return (flat / (lambdas[name] + (flat * flat).sum(1))[:, None]).T @ flat

        sums, n = self.train_sum(train, "datainf: inverse", weighted_outer)
        eye = {name: torch.eye(self.dims[name], dtype=torch.float64, device=s.device) for name, s in sums.items()}
        return {name: (eye[name] - sums[name] / n) / lambdas[name] for name in sums}


class ExactInfluence(DampedInfluence):
    """Exact block-diagonal influence: ``r = (G_l + λ_l I)⁻¹ v`` with the ``d_l × d_l`` matrix
    ``G_l = 1/n Σ g gᵀ`` (the paper's "Exact", eq. 2), same damping as :class:`DataInf`.

    One pass forms every ``G_l`` (``λ_l`` comes from its trace), a Cholesky solve gives ``r``, and a
    second pass scores. Layers with more than ``max_dim`` parameters are refused at construction.
    Positive = helpful.

    Args:
        max_dim: largest ``d_l`` accepted (default 4096: a 128 MiB float64 matrix).
        Others: as in :class:`DataInf`.
    """

    name = "exact"

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        max_dim: int = 4096,
        damping: float | None = None,
        damping_scale: float = 0.1,
        modules: str | list[str] | None = None,
        mean_query: bool = False,
        options: MethodOptions | None = None,
    ) -> None:
        super().__init__(
            trace,
            model,
            task,
            damping=damping,
            damping_scale=damping_scale,
            modules=modules,
            mean_query=mean_query,
            options=options,
        )
        self.max_dim = max_dim
        self.check_dims("the exact inverse")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_dim": self.max_dim}

    def damped_curvature(self, train: Data) -> dict[str, Tensor]:
        """``{layer: G_l + λ_l I}`` (float64) from one pass; sets ``lambdas``."""
        sums, n = self.train_sum(train, "exact: G", lambda _, g: _flat(g).T @ _flat(g))
        lambdas = self.set_lambdas({name: torch.trace(s) for name, s in sums.items()}, n)
        eye = {name: torch.eye(self.dims[name], dtype=torch.float64, device=s.device) for name, s in sums.items()}
        return {name: s / n + lambdas[name] * eye[name] for name, s in sums.items()}

    def inverse_products(self, query_grads: Gradients, train: Data) -> Gradients:
        products = {}
        for name, matrix in self.damped_curvature(train).items():
            factor = torch.linalg.cholesky(matrix)
            products[name] = torch.cholesky_solve(query_grads[name].T, factor).T
        return products

    def inverse_matrices(self, train: Data) -> dict[str, Tensor]:
        return {
            name: torch.cholesky_inverse(torch.linalg.cholesky(m)) for name, m in self.damped_curvature(train).items()
        }


class LiSSA(DampedInfluence):
    """LiSSA as compared in the DataInf paper: ``r_0 = v``, ``r_j = v + r_{j−1} − (G_l + λ_l I) r_{j−1} / scale``
    for ``iterations`` steps, ``r = r_J / scale``; same damping as :class:`DataInf`.

    ``G_l r`` is streamed over the training set from first-order gradients (one pass per
    iteration; the squared norms for ``λ`` ride along the first). With the paper's ``scale=1`` the
    recursion converges only if ``G_l + λ_l I ≤ I``; it is often unstable (as the paper reports).
    Larger ``scale`` (above the largest eigenvalue, e.g. ``mean‖g‖² + λ``) makes it converge, slower.
    Non-finite results raise. Positive = helpful. No ``self_influence`` (it would need a
    per-example recursion).

    Args:
        iterations: number of recursion steps (paper: 10).
        scale: divides the damped curvature (1 = the paper's variant).
        Others: as in :class:`DataInf`.
    """

    name = "lissa"

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        iterations: int = 10,
        scale: float = 1.0,
        damping: float | None = None,
        damping_scale: float = 0.1,
        modules: str | list[str] | None = None,
        mean_query: bool = False,
        options: MethodOptions | None = None,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"LiSSA(iterations={iterations!r}) must be at least 1 (paper: 10).")
        if not scale > 0:
            raise ValueError(f"LiSSA(scale={scale!r}) must be positive (paper: 1).")
        super().__init__(
            trace,
            model,
            task,
            damping=damping,
            damping_scale=damping_scale,
            modules=modules,
            mean_query=mean_query,
            options=options,
        )
        self.iterations = iterations
        self.scale = scale

    def config(self) -> dict[str, Any]:
        return {**super().config(), "iterations": self.iterations, "scale": self.scale}

    def inverse_products(self, query_grads: Gradients, train: Data) -> Gradients:
        current = dict(query_grads)
        for step in range(self.iterations):
            with_norms = step == 0 and self.damping is None
            sums, n = self.train_sum(train, f"lissa: iteration {step + 1}", _CurvatureProduct(current, with_norms))
            if step == 0:
                self.set_lambdas({name: s[-1] for name, s in sums.items()} if with_norms else None, n)
            current = {
                name: v
                + current[name]
                - (sums[name][: v.numel()].reshape(v.shape) / n + self.lambdas[name] * current[name]) / self.scale
                for name, v in query_grads.items()
            }
        products = {name: r / self.scale for name, r in current.items()}
        for name, r in products.items():
            if not torch.isfinite(r).all():
                raise ValueError(
                    f"LiSSA diverged on layer {name!r} (non-finite result after {self.iterations} iterations with "
                    f"scale={self.scale}). Pass a scale above the largest eigenvalue of G + λI, e.g. "
                    f"scale >= mean‖g‖² + λ, or use DataInf / ExactInfluence."
                )
        return products

    def inverse_matrices(self, train: Data) -> dict[str, Tensor | None]:
        raise NotImplementedError(
            "LiSSA has no self-influence here: it would run the recursion once per training example. "
            "Use ExactInfluence, DataInf or HessianFree.self_influence."
        )


class _CurvatureProduct:
    """Per-batch ``Σ_i (r·g_i) g_i`` for every row ``r`` of a layer's matrix, flattened, with
    ``Σ_i ‖g_i‖²`` appended when the damping is still to be set."""

    def __init__(self, rows: Gradients, with_norms: bool) -> None:
        self.rows, self.with_norms = rows, with_norms

    def __call__(self, name: str, g: LayerGradients) -> Tensor:
        product = g.weighted_sum(g.dot(self.rows[name])).flatten()
        return torch.cat([product, g.squared_norms().sum()[None]]) if self.with_norms else product


class HessianFree(LayerwiseInfluence):
    """Hessian-free influence: plain gradient dot products ``Σ_l v_lᵀ g_{l,k}`` (``r = v``; no damping).

    One pass over the training set. Positive = helpful. Args: as in :class:`LayerwiseInfluence`.
    """

    name = "hessian-free"

    def inverse_products(self, query_grads: Gradients, train: Data) -> Gradients:
        return query_grads

    def inverse_matrices(self, train: Data) -> dict[str, Tensor | None]:
        return {la.name: None for la in self.layers}
