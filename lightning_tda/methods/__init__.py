"""Attribution methods. All share the shape ``Method(trace, model, task, ...).attribute(queries, train)``
and the sign convention: a positive score means the training example helped the query."""

from importlib import import_module

_WHERE = {
    "AttributionMethod": "base",
    "MethodOptions": "base",
    "SOURCE": "source",
    "EKFACInfluence": "ekfac",
    "TracInCP": "tracin",
    "DataInf": "datainf",
    "ExactInfluence": "datainf",
    "LiSSA": "datainf",
    "HessianFree": "datainf",
    "ForwardINF": "forward_inf",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"lightning_tda.methods.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lightning_tda.methods' has no attribute {name!r}")
