"""Evaluation: classification metrics, saliency localisation, perturbation faithfulness, report plots.

``metrics`` and ``localisation`` are NumPy (host side); ``faithfulness`` runs the model
under ``jax.jit`` in bounded batches; ``plots`` draws PNGs with matplotlib (Agg canvas, no pyplot).
``similarity`` (NumPy/SciPy/scikit-image) compares two stacks of maps (Spearman, SSIM, HOG) for the
saliency sanity checks. ``statistics`` (NumPy) gives intervals that include the data: a hierarchical
bootstrap over patients and frames, paired by frame, and Student-t intervals for independent repeats.
``sequences`` (NumPy) turns frames into procedures: sliding windows, aggregators, decision stability
and a frame filter's sensitivity/specificity.
``shortcuts`` (NumPy/SciPy) measures what a class-blind reader gets from a frame: global image statistics
and class-blind saliency baselines (``blind_map``). ``probes`` (NumPy/scikit-learn) scores frozen
embeddings: DINO's weighted k-NN and a logistic-regression linear probe. Pure scoring: nothing here
trains or loads a run; the protocols that do (cross-validation, the CAM benchmark, ablations) are
``lclsc_jax.protocols``. Formulas and references: ``docs/evaluate.md``.
"""

from lclsc_jax.evaluate.faithfulness import (
    ROAD_NEIGHBOUR_WEIGHTS,
    SCORE_KINDS,
    confidence_change,
    curve_auc,
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    noisy_linear_impute,
    road,
    saliency_ranks,
    target_scores,
)
from lclsc_jax.evaluate.localisation import (
    POINTING_TIES,
    area_binarize,
    average_precision,
    bbox_iou,
    binarize,
    class_specificity,
    dice,
    energy_pointing_game,
    iou,
    localisation_metrics,
    normalize_maps,
    otsu_binarize,
    pixel_precision,
    pixel_recall,
    pointing_game,
    runner_up_class,
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
from lclsc_jax.evaluate.probes import PROBE_CS, PROBE_FOLDS, knn_accuracy, knn_predict, linear_probe
from lclsc_jax.evaluate.shortcuts import BLIND_MAPS, blind_map, global_statistics
from lclsc_jax.evaluate.similarity import (
    SIMILARITIES,
    hog_similarity,
    map_similarities,
    spearman,
    ssim,
)
from lclsc_jax.evaluate.statistics import (
    bootstrap_by_class,
    bootstrap_weights,
    detectable_difference,
    hierarchical_bootstrap,
    paired_bootstrap,
    patient_labels,
    t_interval,
)

__all__ = [
    "BLIND_MAPS",
    "ECE_BINS",
    "POINTING_TIES",
    "PROBE_CS",
    "PROBE_FOLDS",
    "ROAD_NEIGHBOUR_WEIGHTS",
    "SCORE_KINDS",
    "SIMILARITIES",
    "aggregate_folds",
    "area_binarize",
    "average_precision",
    "bbox_iou",
    "binarize",
    "binary_auroc",
    "blind_map",
    "bootstrap_by_class",
    "bootstrap_weights",
    "calibration_bins",
    "class_specificity",
    "classification_metrics",
    "confidence_change",
    "confidence_histogram",
    "confusion_matrix",
    "confusion_matrix_plot",
    "curve_auc",
    "deletion_curve",
    "detectable_difference",
    "dice",
    "energy_pointing_game",
    "gaussian_blur",
    "global_statistics",
    "hierarchical_bootstrap",
    "hog_similarity",
    "insertion_curve",
    "iou",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "localisation_metrics",
    "make_confidence_figure",
    "make_confusion_figure",
    "make_per_patient_figure",
    "make_roc_figure",
    "map_similarities",
    "noisy_linear_impute",
    "normalize_maps",
    "otsu_binarize",
    "paired_bootstrap",
    "patient_labels",
    "per_patient_bars",
    "pixel_precision",
    "pixel_recall",
    "pointing_game",
    "road",
    "roc_curve_points",
    "roc_curves",
    "runner_up_class",
    "saliency_ranks",
    "spearman",
    "ssim",
    "t_interval",
    "target_scores",
    "topk_binarize",
]
