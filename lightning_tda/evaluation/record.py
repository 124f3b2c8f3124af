"""The measured LDS of each method on one model, kept in its trace, and which method to trust.

``lightning-tda evaluate`` writes an :class:`Evaluation` into the trace under ``results/evaluation``
(one JSON document: the ground truth's size, the queries, and per method its LDS with a bootstrap
confidence interval and a digest of the scores it was measured on). ``lightning-tda report`` reads it
back, validated as untrusted input, shows each method's LDS beside its scores (when the scores in the
trace are still the ones measured) and names the method to trust (:meth:`Evaluation.verdict`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_tda.evaluation.lds import LDSResult
from lightning_tda.scores import EVALUATION_KIND, Scores, reading_results, stored_results, write_result
from lightning_tda.trace.checks import TraceReader, expect_float, expect_int, expect_str
from lightning_tda.trace.schema import to_json

FORMAT = 1
RESULT_NAME = "evaluation"  # results/evaluation
MAX_METHODS = 100
MAX_QUERIES = 100_000


def scores_digest(scores: Scores) -> str:
    """SHA-1 of a score matrix with its ids: tells whether the scores in a trace are those an LDS was measured on."""
    digest = hashlib.sha1()
    for tensor in (scores.values, scores.train_ids, scores.query_ids):
        if tensor is not None:
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class MethodLDS:
    """One method's LDS on this model.

    Attributes:
        method: the method's name (``source``, ``datainf``...).
        mean, ci_low, ci_high: mean LDS over queries and its bootstrap interval (NaN when no query has one).
        per_query: ``(Q,)`` float64 LDS of each query (NaN where its re-trained measurement did not vary).
        scores_digest: :func:`scores_digest` of the scores measured.
    """

    method: str
    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    scores_digest: str

    @classmethod
    def of(cls, scores: Scores, result: LDSResult) -> MethodLDS:
        return cls(scores.method, result.mean, result.ci_low, result.ci_high, result.per_query, scores_digest(scores))

    @property
    def defined(self) -> bool:
        return math.isfinite(self.mean)

    def describe(self) -> str:
        if not self.defined:
            return f"{self.method} LDS undefined (no query's re-trained loss varied)"
        return f"{self.method} {self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass
class Evaluation:
    """Every evaluated method's LDS against one ground truth.

    Attributes:
        methods: one :class:`MethodLDS` per method, in the order evaluated.
        num_subsets, num_seeds, fraction: the ground truth's ``M`` subsets of ``fraction`` of the training
            set, each re-trained with ``R`` seeds.
        query_split, query_ids: the queries (ids in their split).
        confidence: level of the bootstrap intervals.
        ground_truth: path of the re-training cache.
    """

    methods: list[MethodLDS]
    num_subsets: int
    num_seeds: int
    fraction: float
    query_split: str
    query_ids: list[int]
    confidence: float = 0.95
    ground_truth: str = ""

    def method(self, name: str) -> MethodLDS | None:
        return next((m for m in self.methods if m.method == name), None)

    def verdict(self) -> tuple[str | None, str]:
        """``(method to trust or None, one sentence with the numbers)``.

        The method to trust has the highest mean LDS and a confidence interval whose lower bound is above
        every other method's mean and above 0 (a method that predicts nothing scores 0); otherwise there
        is no clear winner.
        """
        ranked = sorted((m for m in self.methods if m.defined), key=lambda m: m.mean, reverse=True)
        numbers = "; ".join(m.describe() for m in [*ranked, *(m for m in self.methods if not m.defined)])
        if not ranked:
            return None, f"No clear winner: no method has a defined LDS ({numbers})."
        best, others = ranked[0], ranked[1:]
        bar = max([0.0, *(m.mean for m in others)])
        if best.ci_low > bar:
            return best.method, (
                f"Trust {best.method} on this model: its LDS {best.mean:.3f} has a {self.confidence:.0%} interval "
                f"[{best.ci_low:.3f}, {best.ci_high:.3f}] above every other method's LDS and above 0 ({numbers})."
            )
        return None, (
            f"No clear winner: {best.method}'s LDS interval reaches down to {best.ci_low:.3f}, not above "
            f"{bar:.3f} ({numbers}). More subsets or queries narrow the intervals."
        )

    # --- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        data["methods"] = [
            {**asdict(m), "per_query": [v if math.isfinite(v) else None for v in np.asarray(m.per_query).tolist()]}
            for m in self.methods
        ]
        for m in data["methods"]:  # JSON has no NaN
            for key in ("mean", "ci_low", "ci_high"):
                m[key] = m[key] if math.isfinite(m[key]) else None
        return data

    def save(self, path: str | os.PathLike) -> str:
        """Write into ``results/evaluation`` of the trace at ``path`` (replacing an earlier evaluation)."""
        text = np.asarray(np.bytes_(to_json(self.to_dict())))
        return write_result(path, RESULT_NAME, {"summary": text}, {"kind": EVALUATION_KIND})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Evaluation | None:
        """The evaluation stored in the trace at ``path``, every field checked; ``None`` if there is none.

        Raises :class:`~lightning_tda.trace.checks.TraceError` naming the field that is malformed.
        """
        if stored_results(path).get(RESULT_NAME) is None:
            return None
        with reading_results(path) as r:
            where = f"results/{RESULT_NAME}"
            kind = r.attribute(where, "kind")
            if kind != EVALUATION_KIND:
                raise r.error(where, f"has kind {kind!r}, expected {EVALUATION_KIND!r}")
            return _parse(r, f"{where}/summary", r.json(f"{where}/summary", dict))


def _parse(r: TraceReader, where: str, data: dict[str, Any]) -> Evaluation:
    def field_of(name: str) -> Any:
        if name not in data:
            raise r.error(where, f"has no {name!r}")
        return data[name]

    expect_int(r, f"{where}: format", field_of("format"), FORMAT, FORMAT)
    split = expect_str(r, f"{where}: query_split", field_of("query_split"), ("test", "val", "train"))
    query_ids = field_of("query_ids")
    if not isinstance(query_ids, list) or not 0 < len(query_ids) <= MAX_QUERIES:
        raise r.error(f"{where}: query_ids", f"is not a list of 1 to {MAX_QUERIES:,} query ids")
    query_ids = [expect_int(r, f"{where}: query_ids", i, 0) for i in query_ids]
    methods = field_of("methods")
    if not isinstance(methods, list) or len(methods) > MAX_METHODS:
        raise r.error(f"{where}: methods", f"is not a list of at most {MAX_METHODS} methods")
    parsed = []
    for position, entry in enumerate(methods):
        place = f"{where}: methods[{position}]"
        if not isinstance(entry, dict):
            raise r.error(place, "is not a JSON object")
        values = {}
        for key in ("mean", "ci_low", "ci_high"):
            value = entry.get(key)
            values[key] = math.nan if value is None else expect_float(r, f"{place}.{key}", value)
        per_query = entry.get("per_query")
        if not isinstance(per_query, list) or len(per_query) != len(query_ids):
            raise r.error(f"{place}.per_query", f"is not a list of {len(query_ids)} numbers (one per query)")
        per_query = np.array(
            [math.nan if v is None else expect_float(r, f"{place}.per_query", v) for v in per_query], dtype=np.float64
        )
        if np.isfinite(per_query).any() and not all(math.isfinite(values[k]) for k in values):
            raise r.error(place, "has per-query LDS values but no mean and interval")
        if math.isfinite(values["mean"]) and not values["ci_low"] <= values["mean"] <= values["ci_high"]:
            raise r.error(place, "has a mean outside its confidence interval")
        parsed.append(
            MethodLDS(
                expect_str(r, f"{place}.method", entry.get("method")),
                values["mean"],
                values["ci_low"],
                values["ci_high"],
                per_query,
                expect_str(r, f"{place}.scores_digest", entry.get("scores_digest")),
            )
        )
    confidence = expect_float(r, f"{where}: confidence", field_of("confidence"), 0.0)
    fraction = expect_float(r, f"{where}: fraction", field_of("fraction"), 0.0)
    if not (0 < fraction < 1 and 0 < confidence < 1):
        raise r.error(where, "has a fraction or confidence outside (0, 1)")
    return Evaluation(
        parsed,
        expect_int(r, f"{where}: num_subsets", field_of("num_subsets"), 2),
        expect_int(r, f"{where}: num_seeds", field_of("num_seeds"), 1),
        fraction,
        split,
        query_ids,
        confidence,
        expect_str(r, f"{where}: ground_truth", field_of("ground_truth")),
    )
