"""Curvature after training: K-FAC / EK-FAC eigenbases per layer, the matrix functions applied with them,
the passes over training data that correct or recompute them, and fits from a trace with their cache.

* :mod:`~lightning_tda.curvature.eigen`: eigenbases, exact dense blocks, matrix functions, robust ``eigh``;
* :mod:`~lightning_tda.curvature.passes`: eigenvalue corrections, recomputed covariances, Gauss-Newton blocks;
* :mod:`~lightning_tda.curvature.fit`: fitting a checkpoint's or a segment's curvature, cached.

Which Fisher the passes use is chosen in :mod:`lightning_tda.layers.fisher` (shared with the callback).
Nothing in this package imports Lightning.
"""

from lightning_tda.curvature.eigen import (
    Curvature,
    DenseLayerCurvature,
    LayerCurvature,
    LayerEigenbasis,
    damped_inverse,
    decay_response,
    eigenbases_from_covariances,
    exp_decay,
    symmetric_eigh,
)
from lightning_tda.curvature.fit import COVARIANCE_SOURCES, CURVATURES, fit_curvature, fit_segment_curvature
from lightning_tda.curvature.passes import PassData

__all__ = [
    "COVARIANCE_SOURCES",
    "CURVATURES",
    "Curvature",
    "DenseLayerCurvature",
    "LayerCurvature",
    "LayerEigenbasis",
    "PassData",
    "damped_inverse",
    "decay_response",
    "eigenbases_from_covariances",
    "exp_decay",
    "fit_curvature",
    "fit_segment_curvature",
    "symmetric_eigh",
]
