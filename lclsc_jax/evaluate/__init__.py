"""Evaluation: classification metrics, saliency localisation, perturbation faithfulness, report plots.

``metrics`` and ``localisation`` are NumPy (host side); ``faithfulness`` runs the model
under ``jax.jit`` in bounded batches; ``plots`` draws PNGs with matplotlib (Agg canvas, no pyplot).
``shortcuts`` (NumPy/SciPy) measures what a class-blind reader gets from a frame: global image statistics
and class-blind saliency baselines (``blind_map``). Pure scoring: nothing here trains or loads a run;
the protocols that do (cross-validation, the CAM benchmark, ablations) are ``lclsc_jax.protocols``.
Formulas and references: ``docs/evaluate.md``.
"""

from lclsc_jax.evaluate.faithfulness import (
    ROAD_NEIGHBOUR_WEIGHTS,
    confidence_change,
    curve_auc,
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    noisy_linear_impute,
    road,
    saliency_ranks,
)
from lclsc_jax.evaluate.localisation import (
    area_binarize,
    average_precision,
    bbox_iou,
    binarize,
    dice,
    energy_pointing_game,
    iou,
    localisation_metrics,
    normalize_maps,
    otsu_binarize,
    pixel_precision,
    pixel_recall,
    pointing_game,
    topk_binarize,
)
from lclsc_jax.evaluate.metrics import (
    ECE_BINS,
    aggregate_folds,
    binary_auroc,
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    roc_curve_points,
)
from lclsc_jax.evaluate.shortcuts import BLIND_MAPS, blind_map, global_statistics
from lclsc_jax.evaluate.plots import (
    confidence_histogram,
    confusion_matrix_plot,
    make_confidence_figure,
    make_confusion_figure,
    make_per_patient_figure,
    make_roc_figure,
    per_patient_bars,
    roc_curves,
)

__all__ = [
    "BLIND_MAPS",
    "ECE_BINS",
    "ROAD_NEIGHBOUR_WEIGHTS",
    "aggregate_folds",
    "area_binarize",
    "average_precision",
    "bbox_iou",
    "binarize",
    "binary_auroc",
    "blind_map",
    "calibration_bins",
    "classification_metrics",
    "confidence_change",
    "confidence_histogram",
    "confusion_matrix",
    "confusion_matrix_plot",
    "curve_auc",
    "deletion_curve",
    "dice",
    "energy_pointing_game",
    "gaussian_blur",
    "global_statistics",
    "insertion_curve",
    "iou",
    "localisation_metrics",
    "make_confidence_figure",
    "make_confusion_figure",
    "make_per_patient_figure",
    "make_roc_figure",
    "noisy_linear_impute",
    "normalize_maps",
    "otsu_binarize",
    "per_patient_bars",
    "pixel_precision",
    "pixel_recall",
    "pointing_game",
    "road",
    "roc_curve_points",
    "roc_curves",
    "saliency_ranks",
    "topk_binarize",
]
