"""Saliency localisation against ground-truth masks (NumPy / scikit-image, host side).

Saliency maps ``(N, H, W)`` in ``[0, 1]`` are compared with binary masks ``(N, H, W)``
of the discriminative region. An optional ``valid`` mask (``(H, W)`` or ``(N, H, W)``;
pCLE's circular field of view) restricts every computation to valid pixels. Every function
also takes volumes: maps and masks ``(N, D, H, W)`` (one map ``(D, H, W)``), ``valid``
``(D, H, W)`` or ``(N, D, H, W)``; "pixels" are then voxels, raster order is C order over
``(D, H, W)``, connected components are 26-connected and boxes are 3D.

``hausdorff95`` is MONAI's ``compute_hausdorff_distance(..., percentile=95)``: the surface of
a mask is its voxels removed by a binary erosion (``scipy.ndimage.binary_erosion``, cross
structuring element, zero border), the directed distances from each surface voxel of one mask
to the nearest surface voxel of the other are taken (Euclidean, in ``spacing`` units), and the
result is the larger of the two directed 95th percentiles (linear interpolation). When either
mask is empty the distance is undefined and ``hausdorff95`` returns NaN (MONAI: NaN when both
are empty, inf when one is); batch means skip NaN and report how many frames were defined.

Conventions (see ``docs/evaluate.md``): a fixed threshold ``t`` keeps ``map >= t``;
Otsu keeps ``map > t_otsu`` (scikit-image's convention), with ``t_otsu`` computed by
``threshold_otsu`` over the exact distinct values of ``map[valid]``; "area" keeps the
map's ``k`` most salient valid pixels with ``k`` the GT's pixel count (threshold-free
Dice at the mask's area; ties to the earlier pixel in raster order); a flat
map (max == min over the valid pixels) has no Otsu or area foreground and never scores a
pointing-game hit. ``pr_auc`` is the average precision of the map's valid pixels ranked
against the mask (``sklearn.metrics.average_precision_score``). Zero denominators give 0
(no predicted pixels -> precision 0; no saliency mass -> energy 0), except dice/IoU of two
empty masks, which are 1.

Class specificity (``class_specificity``): a map that explains *the* class should differ from the
map of another class on the same frame. Per frame, the map for the true class and the map for the
most likely wrong class (``runner_up_class``) are compared by their Pearson correlation over the
valid pixels (1 = the map ignores the class) and by the gap of their Dice at the mask's area
(true - wrong; > 0 = the true class's map is the one on the evidence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt
from skimage.filters import threshold_otsu
from skimage.measure import label as cc_label

__all__ = [
    "POINTING_TIES",
    "area_binarize",
    "average_precision",
    "bbox_iou",
    "binarize",
    "class_specificity",
    "dice",
    "energy_pointing_game",
    "hausdorff95",
    "iou",
    "localisation_metrics",
    "normalize_maps",
    "otsu_binarize",
    "pixel_precision",
    "pixel_recall",
    "pointing_game",
    "runner_up_class",
    "topk_binarize",
]

_RANGE_ATOL = 1e-4


# ----------------------------------------------------------------------------- checks


def _as_valid(valid: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast ``valid`` (None, or the trailing axes of ``shape``) to a bool array of ``shape``."""
    if valid is None:
        return np.ones(shape, dtype=bool)
    v = np.asarray(valid)
    if v.ndim < 2 or v.ndim > len(shape) or v.shape != shape[len(shape) - v.ndim:]:
        raise ValueError(f"valid must have shape {shape[-2:]}, {shape[1:]} or {shape}, got {v.shape}")
    return np.broadcast_to(v.astype(bool), shape)


def _check_single(s: np.ndarray, fn: str) -> None:
    """``ValueError`` unless ``s`` is one map ``(H, W)`` or one volume ``(D, H, W)``."""
    if s.ndim not in (2, 3):
        raise ValueError(f"{fn} takes one map (H, W) or volume (D, H, W), got {s.shape}")


def _check_batch(s: np.ndarray, name: str = "maps") -> None:
    """``ValueError`` unless ``s`` is a batch of maps ``(N, H, W)`` or volumes ``(N, D, H, W)``."""
    if s.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (N, H, W) or (N, D, H, W), got {s.shape}")


def _check_map(saliency: Any, name: str = "saliency") -> np.ndarray:
    """A finite float64 array with values in [0, 1]."""
    s = np.asarray(saliency, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or inf")
    if s.size and (s.min() < -_RANGE_ATOL or s.max() > 1 + _RANGE_ATOL):
        raise ValueError(
            f"{name} values must lie in [0, 1] (got [{s.min():.3g}, {s.max():.3g}]); "
            "rescale first, e.g. with normalize_maps"
        )
    return np.clip(s, 0.0, 1.0)


def _check_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """A boolean array of ``shape`` from a bool or {0, 1} array."""
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {m.shape}")
    if m.dtype != bool and not np.all((m == 0) | (m == 1)):
        raise ValueError(f"{name} must be binary (bool or 0/1 values)")
    return m.astype(bool)


def normalize_maps(maps: Any, valid: Any = None) -> np.ndarray:
    """Min-max rescale each map of ``maps (N, H, W)`` or ``(N, D, H, W)`` to [0, 1] over its valid pixels; flat -> 0."""
    m = np.asarray(maps, dtype=np.float64)
    _check_batch(m)
    v = _as_valid(valid, m.shape)
    axes = tuple(range(1, m.ndim))
    lo = np.where(v, m, np.inf).min(axis=axes, keepdims=True)
    hi = np.where(v, m, -np.inf).max(axis=axes, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(v, np.clip(out, 0.0, 1.0), 0.0)


# ------------------------------------------------------------------------ binarising


def binarize(saliency: Any, threshold: float, valid: Any = None) -> np.ndarray:
    """Boolean mask ``saliency >= threshold`` (any shape), False outside ``valid``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    s = _check_map(saliency)
    return (s >= threshold) & _as_valid(valid, s.shape)


def otsu_binarize(saliency: Any, valid: Any = None) -> np.ndarray:
    """Boolean mask ``saliency (H, W) | (D, H, W) > t_otsu`` over the valid pixels (exact-value Otsu); empty if flat."""
    s = _check_map(saliency)
    _check_single(s, "otsu_binarize")
    v = _as_valid(valid, s.shape)
    vals = s[v]
    if vals.size == 0 or vals.max() == vals.min():
        return np.zeros(s.shape, dtype=bool)
    # Otsu over the exact distinct values (not a 256-bin histogram, whose bin centres can
    # fall below a value of the lower class and leak it into the foreground).
    levels, counts = np.unique(vals, return_counts=True)
    return (s > threshold_otsu(hist=(counts, levels))) & v


def topk_binarize(saliency: Any, k: int, valid: Any = None) -> np.ndarray:
    """Boolean mask of the ``k`` largest valid pixels of ``saliency (H, W) | (D, H, W)``; ties to raster order.

    Empty when ``k == 0`` or the map is flat over the valid pixels (it ranks nothing).
    """
    s = _check_map(saliency)
    _check_single(s, "topk_binarize")
    v = _as_valid(valid, s.shape)
    flat_idx = np.flatnonzero(v)
    k = int(k)
    if k < 0 or k > flat_idx.size:
        raise ValueError(f"k must lie in [0, {flat_idx.size}] (the valid pixels), got {k}")
    out = np.zeros(s.size, dtype=bool)
    vals = s.ravel()[flat_idx]
    if k == 0 or vals.max() == vals.min():
        return out.reshape(s.shape)
    order = np.argsort(-vals, kind="stable")  # descending; equal values keep raster order
    out[flat_idx[order[:k]]] = True
    return out.reshape(s.shape)


def area_binarize(saliency: Any, gt: Any, valid: Any = None) -> np.ndarray:
    """``topk_binarize`` of ``saliency (H, W) | (D, H, W)`` with ``k = |GT & valid|``: prediction at the mask's area."""
    s = np.asarray(saliency)
    g = _check_mask(gt, s.shape, "gt") & _as_valid(valid, s.shape)
    return topk_binarize(s, int(g.sum()), valid)


def average_precision(saliency: Any, gt: Any, valid: Any = None) -> float | None:
    """Average precision (PR-AUC) of the valid pixels of ``saliency (H, W) | (D, H, W)`` vs ``gt``; None if GT is empty.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct map values as thresholds (the
    step-wise area of ``sklearn.metrics.average_precision_score``); a flat map scores the GT's
    share of the valid pixels (chance).
    """
    s = _check_map(saliency)
    g = _check_mask(gt, s.shape, "gt")
    v = _as_valid(valid, s.shape)
    scores, truth = s[v], g[v]
    n_pos = int(truth.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct value
    tps = np.cumsum(truth)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ------------------------------------------------------------------ overlap measures


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks of the same shape."""
    p = np.asarray(pred)
    return _check_mask(p, p.shape, "pred"), _check_mask(gt, p.shape, "gt")


def dice(pred: Any, gt: Any) -> float:
    """Dice ``2|P & G| / (|P| + |G|)`` of two boolean masks (H, W); 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    den = p.sum() + g.sum()
    return 1.0 if den == 0 else float(2 * (p & g).sum() / den)


def iou(pred: Any, gt: Any) -> float:
    """Jaccard ``|P & G| / |P | G|`` of two boolean masks (H, W); 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    union = (p | g).sum()
    return 1.0 if union == 0 else float((p & g).sum() / union)


def pixel_precision(pred: Any, gt: Any) -> float:
    """Fraction of predicted pixels inside the GT, ``|P & G| / |P|``; 0.0 when P is empty."""
    p, g = _pair(pred, gt)
    return 0.0 if p.sum() == 0 else float((p & g).sum() / p.sum())


def pixel_recall(pred: Any, gt: Any) -> float:
    """Fraction of GT pixels predicted, ``|P & G| / |G|``; 0.0 when G is empty."""
    p, g = _pair(pred, gt)
    return 0.0 if g.sum() == 0 else float((p & g).sum() / g.sum())


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive bounding box ``(lo (ndim,), hi (ndim,))`` of a non-empty boolean mask."""
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected (8 in 2D, 26 in 3D) component of a boolean mask (ties -> lowest label)."""
    lab = cc_label(mask, connectivity=mask.ndim)
    if lab.max() == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def bbox_iou(pred: Any, gt: Any) -> float:
    """IoU of the box around P's largest connected component and the box of all GT pixels, (H, W) or (D, H, W)."""
    p, g = _pair(pred, gt)
    if p.sum() == 0 or g.sum() == 0:
        return 0.0
    (a0, a1), (b0, b1) = _bbox(_largest_component(p)), _bbox(g)
    inter = float(np.prod(np.maximum(np.minimum(a1, b1) - np.maximum(a0, b0) + 1, 0)))
    vol_a, vol_b = float(np.prod(a1 - a0 + 1)), float(np.prod(b1 - b0 + 1))
    return inter / (vol_a + vol_b - inter)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask ^ binary_erosion(mask)`` (cross structure, zero border; as MONAI)."""
    return mask ^ binary_erosion(mask, border_value=0)


def hausdorff95(pred: Any, gt: Any, spacing: Sequence[float] | float | None = None, percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance of two masks ``(H, W)`` or ``(D, H, W)``; NaN if either is empty.

    MONAI's ``compute_hausdorff_distance(percentile=95)``: ``max(q95(d(S_P -> S_G)), q95(d(S_G -> S_P)))``
    over the surface voxels ``S`` (``mask ^ erosion(mask)``), distances Euclidean in ``spacing``
    units (``(ndim,)`` or a scalar; default 1 per axis).
    """
    p, g = _pair(pred, gt)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    if not p.any() or not g.any():
        return float("nan")
    if spacing is None:
        sampling = np.ones(p.ndim)
    else:
        sampling = np.broadcast_to(np.asarray(spacing, np.float64), (p.ndim,)).copy()
        if not np.all(sampling > 0):
            raise ValueError(f"spacing must be positive, got {spacing}")
    sp, sg = _surface(p), _surface(g)
    d_pg = distance_transform_edt(~sg, sampling=sampling)[sp]
    d_gp = distance_transform_edt(~sp, sampling=sampling)[sg]
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


# -------------------------------------------------------------------- pointing games


#: How ``pointing_game`` treats several pixels at the maximum: the first in raster order, or any of them.
POINTING_TIES: tuple[str, ...] = ("first", "any")


def pointing_game(saliency: Any, gt: Any, tolerance: float = 0.0, valid: Any = None, ties: str = "first") -> bool:
    """Hit if the map's maximum (H, W) or (D, H, W) lies within ``tolerance`` px of a GT pixel (Zhang et al. 2018).

    Distances are Euclidean in pixels; an empty GT is a miss. ``ties``: with ``"first"`` (default)
    the maximum is the first maximal pixel in raster order (``argmax``) and a flat map (no maximum)
    is a miss; with ``"any"`` any maximal pixel near the GT is a hit, so a flat map is a hit
    whenever the GT is not empty (Quantus' ``PointingGame``, whose flat maps score hits).
    """
    s = _check_map(saliency)
    _check_single(s, "pointing_game")
    g = _check_mask(gt, s.shape, "gt")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if ties not in POINTING_TIES:
        raise ValueError(f"ties must be one of {POINTING_TIES}, got {ties!r}")
    v = _as_valid(valid, s.shape)
    vals = s[v]
    if not g.any() or vals.size == 0 or (ties == "first" and vals.max() == vals.min()):
        return False
    if ties == "first":
        peaks = np.array([np.unravel_index(int(np.argmax(np.where(v, s, -np.inf))), s.shape)])
    else:
        peaks = np.argwhere(v & (s == vals.max()))
    gt_px = np.argwhere(g)
    d2 = ((peaks[:, None, :] - gt_px[None, :, :]) ** 2).sum(-1)
    return bool(d2.min() <= tolerance**2)


def energy_pointing_game(saliency: Any, gt: Any, valid: Any = None) -> float:
    """Share of saliency mass inside the GT, ``sum(S * G) / sum(S)`` over valid pixels (any shape); 0 if no mass."""
    s = _check_map(saliency)
    g = _check_mask(gt, s.shape, "gt")
    s = np.where(_as_valid(valid, s.shape), s, 0.0)
    total = s.sum()
    return 0.0 if total == 0 else float((s * g).sum() / total)


# ------------------------------------------------------------------------- batch entry


def _frame_spacings(spacing: Any, n: int, ndim: int) -> list[np.ndarray | None]:
    """Per-frame spacing ``(ndim,)`` from None, a scalar, ``(ndim,)`` or ``(n, ndim)``."""
    if spacing is None:
        return [None] * n
    sp = np.asarray(spacing, np.float64)
    if sp.ndim == 2:
        if sp.shape != (n, ndim):
            raise ValueError(f"per-frame spacing must have shape ({n}, {ndim}), got {sp.shape}")
        return list(sp)
    return [np.broadcast_to(sp, (ndim,))] * n

_OVERLAPS = {
    "dice": dice,
    "iou": iou,
    "precision": pixel_precision,
    "recall": pixel_recall,
    "bbox_iou": bbox_iou,
}


def _mean(values: list[float], keep: np.ndarray) -> float | None:
    """Mean over the kept images, None when none are kept."""
    kept = [x for x, k in zip(values, keep) if k]
    return float(np.mean(kept)) if kept else None


def localisation_metrics(
    maps: Any,
    masks: Any,
    thresholds: Sequence[float] = (0.5,),
    otsu: bool = True,
    valid: Any = None,
    tolerance: float = 0.0,
    return_per_image: bool = False,
    area: bool = True,
    pointing_ties: str = "first",
    hd95: bool = False,
    spacing: Sequence[float] | float | None = None,
) -> dict[str, Any]:
    """Mean localisation scores of ``maps (N, H, W)`` or ``(N, D, H, W)`` in [0, 1] against same-shaped ``masks``.

    Returns ``{"n_images", "n_empty_gt", "n_evaluated", "pointing_game",
    "energy_pointing_game", "pr_auc", "thresholds": {key: {dice, iou, precision, recall, bbox_iou}}}``
    with one ``key`` per fixed threshold (``str(t)``), ``"otsu"`` and (``area=True``)
    ``"area"``: each map's top-k valid pixels with k the GT's area (``area_binarize``).
    ``pr_auc`` is the mean per-image average precision (``average_precision``). Images whose GT
    mask is empty (within ``valid``) are excluded from every mean and counted in
    ``n_empty_gt``. ``pointing_ties``: ``pointing_game``'s ``ties``. With ``return_per_image`` a
    ``per_image`` entry holds the per-image values (None for excluded images). ``hd95``: each
    threshold's entry also holds ``hd95`` (``hausdorff95`` of the binarised map and the mask;
    ``spacing``: a scalar, one value per spatial axis, or ``(N, ndim)`` per frame). Frames where
    it is undefined (an empty binarised map) are skipped by the mean; ``n_hd95`` counts the
    others, and the mean is None when no frame has one.
    """
    s = _check_map(maps, "maps")
    _check_batch(s)
    if s.shape[0] == 0:
        raise ValueError("maps is empty: need at least one image")
    v = _as_valid(valid, s.shape)
    g = _check_mask(masks, s.shape, "masks") & v
    ts = [float(t) for t in thresholds]
    for t in ts:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must lie in [0, 1], got {t}")
    if not ts and not otsu and not area:
        raise ValueError("give at least one threshold, otsu=True or area=True")

    n = s.shape[0]
    keep = g.reshape(n, -1).any(axis=1)
    spacings = _frame_spacings(spacing, n, s.ndim - 1) if hd95 else [None] * n
    per_image: dict[str, Any] = {
        "pointing_game": [pointing_game(s[i], g[i], tolerance, v[i], pointing_ties) if keep[i] else None
                          for i in range(n)],
        "energy_pointing_game": [energy_pointing_game(s[i], g[i], v[i]) if keep[i] else None for i in range(n)],
        "pr_auc": [average_precision(s[i], g[i], v[i]) if keep[i] else None for i in range(n)],
        "thresholds": {},
    }
    binaries: dict[str, list[np.ndarray]] = {str(t): [binarize(s[i], t, v[i]) for i in range(n)] for t in ts}
    if otsu:
        binaries["otsu"] = [otsu_binarize(s[i], v[i]) for i in range(n)]
    if area:
        binaries["area"] = [area_binarize(s[i], g[i], v[i]) for i in range(n)]
    for key, preds in binaries.items():
        per_image["thresholds"][key] = {
            name: [fn(preds[i], g[i]) if keep[i] else None for i in range(n)] for name, fn in _OVERLAPS.items()
        }
        if hd95:
            vals = [hausdorff95(preds[i], g[i], spacings[i]) if keep[i] else None for i in range(n)]
            per_image["thresholds"][key]["hd95"] = [None if v is None or np.isnan(v) else v for v in vals]

    out: dict[str, Any] = {
        "n_images": int(n),
        "n_empty_gt": int((~keep).sum()),
        "n_evaluated": int(keep.sum()),
        "tolerance": float(tolerance),
        "pointing_game": _mean([float(x) if x is not None else 0.0 for x in per_image["pointing_game"]], keep),
        "energy_pointing_game": _mean(
            [x if x is not None else 0.0 for x in per_image["energy_pointing_game"]], keep
        ),
        "pr_auc": _mean([x if x is not None else 0.0 for x in per_image["pr_auc"]], keep),
        "thresholds": {
            key: {name: _mean([x or 0.0 for x in vals], keep) for name, vals in d.items() if name != "hd95"}
            for key, d in per_image["thresholds"].items()
        },
    }
    if hd95:
        for key, d in per_image["thresholds"].items():
            defined = [x for x in d["hd95"] if x is not None]
            out["thresholds"][key]["hd95"] = float(np.mean(defined)) if defined else None
            out["thresholds"][key]["n_hd95"] = len(defined)
    if return_per_image:
        out["per_image"] = per_image
    return out


# ----------------------------------------------------------------- class specificity


def runner_up_class(scores: Any, targets: Any) -> np.ndarray:
    """``(N,)`` int64: the best class other than ``targets (N,)`` in ``scores (N, K)`` (ties -> lower index)."""
    sc = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if sc.ndim != 2 or sc.shape[1] < 2:
        raise ValueError(f"scores must have shape (N, K) with K >= 2, got {sc.shape}")
    if t.shape != (sc.shape[0],) or t.dtype.kind not in "iu" or (t.size and (t.min() < 0 or t.max() >= sc.shape[1])):
        raise ValueError(f"targets must be class indices in 0..{sc.shape[1] - 1} of shape ({sc.shape[0]},)")
    masked = sc.copy()
    masked[np.arange(sc.shape[0]), t] = -np.inf
    return masked.argmax(axis=1).astype(np.int64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two 1-D arrays; None when either is constant."""
    if a.max() == a.min() or b.max() == b.min():
        return None
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt((da * da).sum() * (db * db).sum())
    return None if den == 0 else float(np.clip((da * db).sum() / den, -1.0, 1.0))


def class_specificity(
    maps_true: Any, maps_wrong: Any, masks: Any, valid: Any = None, return_per_image: bool = False
) -> dict[str, Any]:
    """How much a frame's map depends on the class: true- vs wrong-class maps ``(N, [D,] H, W)`` in [0, 1].

    Per frame ``i``: ``correlation`` = Pearson r of the two maps over the valid pixels (None when
    either map is flat there; 1 = class-blind), and, for frames with a non-empty mask
    ``(N, H, W)``, ``dice_area_true`` / ``dice_area_wrong`` = Dice at the mask's area (as in
    ``localisation_metrics``, key ``"area"``) and ``dice_area_gap`` = true - wrong. Returns the
    means (None when no frame qualifies), ``n_images``, ``n_correlated`` (frames with a defined
    r), ``n_evaluated`` (non-empty masks) and, with ``return_per_image``, the per-frame lists.
    """
    a = _check_map(maps_true, "maps_true")
    b = _check_map(maps_wrong, "maps_wrong")
    if a.ndim not in (3, 4) or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"maps_true and maps_wrong must have the same shape (N, [D,] H, W), N >= 1; got {a.shape}, "
                         f"{b.shape}")
    v = _as_valid(valid, a.shape)
    g = _check_mask(masks, a.shape, "masks") & v
    n = a.shape[0]
    corr = [_pearson(a[i][v[i]], b[i][v[i]]) if v[i].any() else None for i in range(n)]
    keep = g.reshape(n, -1).any(axis=1)
    d_true = [dice(area_binarize(a[i], g[i], v[i]), g[i]) if keep[i] else None for i in range(n)]
    d_wrong = [dice(area_binarize(b[i], g[i], v[i]), g[i]) if keep[i] else None for i in range(n)]
    gap = [None if t is None else t - w for t, w in zip(d_true, d_wrong)]

    def mean(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return float(np.mean(vals)) if vals else None

    out: dict[str, Any] = {
        "n_images": int(n),
        "n_correlated": int(sum(c is not None for c in corr)),
        "n_evaluated": int(keep.sum()),
        "correlation": mean(corr),
        "dice_area_true": mean(d_true),
        "dice_area_wrong": mean(d_wrong),
        "dice_area_gap": mean(gap),
    }
    if return_per_image:
        out["per_image"] = {"correlation": corr, "dice_area_true": d_true, "dice_area_wrong": d_wrong,
                            "dice_area_gap": gap}
    return out
