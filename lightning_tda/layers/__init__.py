"""What attribution takes from a model's layers, shared by recording and attribution.

* :mod:`~lightning_tda.layers.tracked`: which modules are tracked and how their tensors become rows and
  gradient matrices (:class:`TrackedLayer`, :func:`find_layers`);
* :mod:`~lightning_tda.layers.capture`: forward and output-gradient hooks that capture those rows;
* :mod:`~lightning_tda.layers.covariances`: streaming K-FAC sums in float64, and the products behind them;
* :mod:`~lightning_tda.layers.fisher`: the Fisher a curvature estimate uses (true: exact or sampled
  targets; empirical), chosen in one place for the callback and the methods;
* :mod:`~lightning_tda.layers.gradients`: per-example gradients kept factored per layer.

This is the bottom of the package: it imports only :mod:`lightning_tda.tasks` and torch, never Lightning.
"""

from lightning_tda.layers.capture import LayerCapture
from lightning_tda.layers.tracked import TrackedLayer, UnsupportedModelError, find_layers

__all__ = ["LayerCapture", "TrackedLayer", "UnsupportedModelError", "find_layers"]
