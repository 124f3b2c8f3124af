"""The options every attribution method shares (MethodOptions): validation, defaults, the model's device."""

from __future__ import annotations

import pytest
import torch

from lightning_tda import ClassificationTask
from lightning_tda.methods import SOURCE, DataInf, EKFACInfluence, ForwardINF, MethodOptions, TracInCP

METHODS = [SOURCE, EKFACInfluence, TracInCP, DataInf, ForwardINF]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"query_batch_size": -1}, "query_batch_size=-1"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"query_batch_size": True}, "query_batch_size=True"),
    ],
)
def test_bad_batch_sizes_are_refused_with_the_field_name(bad, message):
    with pytest.raises(ValueError, match=message):
        MethodOptions(**bad)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_every_method_reads_the_shared_options(cls, digits_run):
    from lightning_tda import Trace

    options = MethodOptions(layers="net.4", batch_size=32, query_batch_size=8, progress=False)
    method = cls(Trace.open(digits_run["path"]), digits_run["model_factory"](), ClassificationTask(), options=options)
    assert [layer.name for layer in method.layers] == ["net.4"]
    assert (method.batch_size, method.query_batch_size, method.progress) == (32, 8, False)
    assert method.device == torch.device("cpu")  # the model's device when none is given


def test_layers_that_match_nothing_name_the_trace_layers(digits_run):
    from lightning_tda import Trace

    with pytest.raises(ValueError, match=r"options.layers=\['head'\] matches none of the trace's layers"):
        TracInCP(
            Trace.open(digits_run["path"]),
            digits_run["model_factory"](),
            ClassificationTask(),
            options=MethodOptions(layers=["head"]),
        )
