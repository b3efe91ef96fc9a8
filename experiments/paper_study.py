"""The paper study's robustness and sanity parts, on the folds of `lclsc ablate --preset paper` (issue 15).

`lclsc ablate --preset paper --out runs/paper` trains and scores every fold (accuracy, localisation,
class specificity, ROAD; its own tables). This script adds, on the same fold runs:

* **robustness**: `lclsc robustness` of every fold of the chosen variants against the `ce` fold of
  the same replicate (the same test patients, the same corrupted frames), then, pooled over the 5
  folds (every patient tested once per replicate) and averaged over the replicates: accuracy at each
  severity (mean over the 10 corruptions), mCE and relative mCE (Hendrycks & Dietterich 2019) with
  95% intervals from the hierarchical bootstrap over patients then frames (the weights of
  `evaluate.statistics.bootstrap_weights`, the ratio recomputed in every resample), and the paired
  accuracy difference to `ce` at each severity; Grad-CAM / SC Dice at the mask's area under
  corruption as the mean over folds and replicates (few frames per fold: no interval);
* **classification**: accuracy, balanced accuracy, macro AUROC and macro F1 of the pooled fold
  predictions, per run and paired with `ce` over their shared replicates, with the same patient
  bootstrap (`evaluate.statistics.weighted_classification_metrics` under shared resampling weights)
  and the smallest difference detectable with 80% power;
* **sanity**: the cascading and independent model-randomisation tests (`lclsc sanity`) of Grad-CAM
  (and the SC maps of contrastive runs) on fold 0 of each replicate of the chosen variants:
  Spearman(abs) after the full cascade per method.

Resumable: a fold whose `robustness_ce/frames.npz` (or `sanity/sanity.json`) exists is not redone.
Writes `OUT_RESULTS/classification.md|json`, `robustness.md|json|png` and `sanity.md|json`.

    python experiments/paper_study.py --ablation runs/paper --results experiments/results/paper
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any

import numpy as np

from lclsc_jax.data import corruptions as K
from lclsc_jax.evaluate import statistics
from lclsc_jax.protocols.robustness import evaluate_robustness
from lclsc_jax.protocols.sanity import sanity_checks

ROB_DIR = "robustness_ce"


def replicate_dirs(ablation: str, variant: str) -> list[str]:
    """The CV folders of ``variant``'s replicates (``runs/<variant>__split=S__seed=T``), sorted."""
    return sorted(d for d in glob.glob(os.path.join(ablation, "runs", f"{variant}__split=*__seed=*"))
                  if os.path.exists(os.path.join(d, "results.json")))


def folds_of(rep: str) -> list[str]:
    """The fold workdirs of one CV replicate, sorted."""
    return sorted(glob.glob(os.path.join(rep, "fold_[0-9][0-9]")))


def run_robustness(ablation: str, variants: list[str], max_images: int) -> None:
    """``lclsc robustness`` of every fold of ``variants`` against ce's fold of the same replicate (skips done ones)."""
    for v in variants:
        for rep in replicate_dirs(ablation, v):
            ref_rep = os.path.join(os.path.dirname(rep), "ce" + os.path.basename(rep)[len(v):])
            for fold in folds_of(rep):
                out = os.path.join(fold, ROB_DIR)
                if os.path.exists(os.path.join(out, "frames.npz")):
                    continue
                ref = os.path.join(ref_rep, os.path.basename(fold))
                t0 = time.time()
                evaluate_robustness(fold, reference=ref, max_images=max_images, out_dir=out, figures=False,
                                    progress=False)
                print(f"[paper] robustness {fold} ({time.time() - t0:.0f} s)", flush=True)


def load_frames(ablation: str, variant: str) -> dict[str, Any] | None:
    """Per replicate, the 5 folds' frames joined: ``correct``/``reference_correct (R, K, N)``, conditions, patients."""
    reps = []
    for rep in replicate_dirs(ablation, variant):
        files = [os.path.join(f, ROB_DIR, "frames.npz") for f in folds_of(rep)]
        if not files or not all(os.path.exists(f) for f in files):
            continue  # a replicate counts once every fold is scored
        parts = [np.load(f) for f in files]
        idx = np.concatenate([p["indices"] for p in parts])
        order = np.argsort(idx)
        reps.append({k: np.concatenate([p[k] for p in parts], axis=-1)[..., order]
                     for k in ("correct", "reference_correct", "patients", "labels", "indices")}
                    | {"conditions": parts[0]["conditions"], "name": os.path.basename(rep)})
    if not reps:
        return None
    for r in reps[1:]:
        if not np.array_equal(r["indices"], reps[0]["indices"]):
            raise ValueError(f"{variant}: replicates test different frames; pool them per split seed")
    return {"correct": np.stack([r["correct"] for r in reps]).astype(np.float64),
            "reference_correct": np.stack([r["reference_correct"] for r in reps]).astype(np.float64),
            "conditions": [str(c) for c in reps[0]["conditions"]], "patients": reps[0]["patients"],
            "labels": reps[0]["labels"], "replicates": [r["name"] for r in reps]}


def _mce(err: np.ndarray, ref: np.ndarray, conditions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """mCE and relative mCE ``(B,)`` from errors ``(B, K)`` of the run and the reference (row 0 clean),
    one ``data.corruptions.mean_corruption_error`` per resample."""
    names = list(dict.fromkeys(c.split("/")[0] for c in conditions[1:]))
    cols = {c: [i for i, k in enumerate(conditions) if k.split("/")[0] == c] for c in names}
    mce, rel = [], []
    for e, r in zip(err, ref):
        res = K.mean_corruption_error({c: e[i] for c, i in cols.items()}, {c: r[i] for c, i in cols.items()},
                                      float(e[0]), float(r[0]))
        mce.append(np.nan if res["mce"] is None else res["mce"])
        rel.append(np.nan if res["relative_mce"] is None else res["relative_mce"])
    return np.asarray(mce), np.asarray(rel)


def _interval(v: np.ndarray) -> dict[str, float]:
    """Row 0 (the data as observed) and the 95% percentile interval and SE of rows 1.. (the resamples)."""
    return {"estimate": float(v[0]), "ci_low": float(np.nanquantile(v[1:], 0.025)),
            "ci_high": float(np.nanquantile(v[1:], 0.975)), "se": float(np.nanstd(v[1:], ddof=1))}


def robustness_stats(fr: dict[str, Any], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """mCE, relative mCE, accuracy per severity (and the paired difference to ce), with patient-bootstrap CIs."""
    x, xr = fr["correct"], fr["reference_correct"]  # (R, K, N)
    pat, cond = fr["patients"], fr["conditions"]
    w = statistics.bootstrap_weights(pat, n_boot, seed, strata=fr["labels"])  # (B, N)
    w = np.concatenate([np.ones((1, w.shape[1])), w])  # row 0: the data as observed

    def err(a: np.ndarray) -> np.ndarray:  # (B, K): replicate-averaged weighted error of each condition
        return 1.0 - np.einsum("bn,rkn->bk", w, a) / (w.sum(1)[:, None] * a.shape[0])

    e, er = err(x), err(xr)
    mce, rel = _mce(e, er, cond)
    q = _interval
    sev = sorted({int(c.split("/")[1]) for c in cond})
    per_sev, per_sev_ref, diff = {}, {}, {}
    for s in sev:
        cols = [i for i, c in enumerate(cond) if int(c.split("/")[1]) == s]
        a, b = 1.0 - e[:, cols].mean(1), 1.0 - er[:, cols].mean(1)
        per_sev[s], per_sev_ref[s], diff[s] = q(a), q(b), q(a - b)
    per_corruption = {}
    for c in sorted({k.split("/")[0] for k in cond[1:]}):
        cols = [i for i, k in enumerate(cond) if k.split("/")[0] == c]
        per_corruption[c] = {"accuracy": [float(1 - e[0, i]) for i in cols],
                             "reference_accuracy": [float(1 - er[0, i]) for i in cols]}
    return {"mce": q(mce), "relative_mce": q(rel), "accuracy_by_severity": per_sev,
            "reference_accuracy_by_severity": per_sev_ref, "accuracy_difference_by_severity": diff,
            "per_corruption": per_corruption, "severities": sev, "n_boot": n_boot,
            "n_replicates": int(x.shape[0]), "n_patients": int(len(np.unique(pat))), "n_frames": int(x.shape[2]),
            "replicates": fr["replicates"]}


def saliency_under_corruption(ablation: str, variant: str) -> dict[str, dict[int, float]]:
    """Mean Grad-CAM / SC Dice at the mask's area per severity (over corruptions, folds, replicates)."""
    acc: dict[str, dict[int, list[float]]] = {}
    for rep in replicate_dirs(ablation, variant):
        for fold in folds_of(rep):
            path = os.path.join(fold, ROB_DIR, "robustness.json")
            if not os.path.exists(path):
                continue
            for r in json.load(open(path))["rows"]:
                for m in ("gradcam", "sc"):
                    v = r.get(f"{m}_dice@area")
                    if v is not None:
                        acc.setdefault(m, {}).setdefault(int(r["severity"]), []).append(float(v))
    return {m: {s: float(np.mean(v)) for s, v in sorted(d.items())} for m, d in acc.items()}


CLASSIFICATION = ("accuracy", "balanced_accuracy", "auroc", "f1")


def pooled_predictions(rep: str) -> dict[str, np.ndarray]:
    """One replicate's test predictions over its folds (every patient once), sorted by record index."""
    parts = [np.load(os.path.join(f, "predictions.npz")) for f in folds_of(rep)]
    idx = np.concatenate([p["index"] for p in parts])
    order = np.argsort(idx)
    return {k: np.concatenate([p[k] for p in parts])[order] for k in ("probs", "label", "index", "patient")}


def patient_accuracy(ablation: str, variant: str) -> dict[str, float]:
    """Each patient's frame accuracy on its held-out fold, averaged over the variant's replicates."""
    per: dict[str, list[float]] = {}
    for rep in replicate_dirs(ablation, variant):
        p = pooled_predictions(rep)
        ok = p["probs"].argmax(1) == p["label"]
        for pid in np.unique(p["patient"]):
            per.setdefault(str(pid), []).append(float(ok[p["patient"] == pid].mean()))
    return {k: float(np.mean(v)) for k, v in sorted(per.items())}


def classification_stats(ablation: str, variants: list[str], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUROC, F1 of each variant and paired with ce over shared replicates.

    Per replicate the pooled 5-fold predictions; one set of patient-then-frame bootstrap weights
    (stratified by class) shared by every variant, so the differences are paired by frame.
    """
    preds = {v: {os.path.basename(r).split("__", 1)[1]: pooled_predictions(r) for r in replicate_dirs(ablation, v)}
             for v in ["ce", *variants]}
    ref = next(iter(preds["ce"].values()))
    w = statistics.bootstrap_weights(ref["patient"], n_boot, seed, strata=ref["label"])
    w = np.concatenate([np.ones((1, w.shape[1])), w])

    def per_rep(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not np.array_equal(p["index"], ref["index"]):
            raise ValueError("replicates test different frames; pair them per split seed")
        return statistics.weighted_classification_metrics(p["probs"], p["label"], w)

    scores = {v: {rep: per_rep(p) for rep, p in d.items()} for v, d in preds.items()}
    q = _interval
    out: dict[str, Any] = {}
    for v, reps in scores.items():
        row: dict[str, Any] = {"replicates": sorted(reps), "n_patients": int(len(np.unique(ref["patient"]))),
                               "n_frames": int(len(ref["index"]))}
        for m in CLASSIFICATION:
            row[m] = q(np.mean([r[m] for r in reps.values()], 0))
        shared = sorted(set(reps) & set(scores["ce"]))
        if v != "ce" and shared:
            row["paired_replicates"] = shared
            for m in CLASSIFICATION:
                d = q(np.mean([reps[r][m] - scores["ce"][r][m] for r in shared], 0))
                d["detectable"] = statistics.detectable_difference(d["se"])
                row[f"{m}_vs_ce"] = d
        out[v] = row
    return out


def classification_report(ablation: str, variants: list[str], results: str, n_boot: int) -> dict[str, Any]:
    """Write classification.md/json: the accuracy claim's table."""
    st = classification_stats(ablation, variants, n_boot)
    ce = st["ce"]
    lines = ["# Classification of the paper study's runs (experiments/paper_study.py)", "",
             f"Pooled 5-fold patient-wise CV predictions ({ce['n_patients']} patients, {ce['n_frames']} frames per "
             f"replicate), averaged over replicates; 95% intervals: hierarchical bootstrap over patients then frames "
             f"({n_boot} resamples, stratified by class, the same resamples for every run: paired by frame). "
             "AUROC and F1 are macro averages (one-vs-rest AUROC).", "",
             "| run | replicates | " + " | ".join(CLASSIFICATION) + " |", "|---|---|" + "---|" * len(CLASSIFICATION)]
    for v, r in st.items():
        lines.append(f"| {v} | {len(r['replicates'])} | " + " | ".join(_ci(r[m]) for m in CLASSIFICATION) + " |")
    lines += ["", "Paired difference to `ce` (the replicates both have; the smallest difference detectable with 80% "
              "power at 5%, 2.8 x the bootstrap SE, after ±):", "",
              "| run − ce | replicates | " + " | ".join(CLASSIFICATION) + " |",
              "|---|---|" + "---|" * len(CLASSIFICATION)]
    for v, r in st.items():
        if "paired_replicates" in r:
            lines.append(f"| {v} − ce | {len(r['paired_replicates'])} | " + " | ".join(
                f"{_ci(r[f'{m}_vs_ce'])} ±{r[f'{m}_vs_ce']['detectable']:.3f}" for m in CLASSIFICATION) + " |")
    lines += ["", "Patient shift (every patient is a held-out patient once per replicate): each patient's frame "
              "accuracy, averaged over the replicates, summarised over the 24 patients.", "",
              "| run | min | 25% | median | 75% | max | patients below 0.5 |", "|---|---|---|---|---|---|---|"]
    for v in st:
        acc = patient_accuracy(ablation, v)
        st[v]["patient_accuracy"] = acc
        vals = np.array(list(acc.values()))
        qs = np.quantile(vals, [0, 0.25, 0.5, 0.75, 1])
        lines.append(f"| {v} | " + " | ".join(f"{x:.2f}" for x in qs) + f" | {int((vals < 0.5).sum())}/{len(vals)} |")
    _write(results, "classification", lines, st)
    return st


def _write(results: str, name: str, lines: list[str], data: Any) -> None:
    """``RESULTS/<name>.md`` (the table lines) and ``<name>.json``; the table printed."""
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    print("\n".join(lines))


def _ci(d: dict[str, float], digits: int = 3) -> str:
    """``est [lo, hi]``."""
    return f"{d['estimate']:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def robustness_report(ablation: str, variants: list[str], results: str, n_boot: int) -> dict[str, Any]:
    """Write robustness.md/json/png over the variants that have every fold scored."""
    stats: dict[str, Any] = {}
    for v in variants:
        fr = load_frames(ablation, v)
        if fr is None:
            continue
        stats[v] = robustness_stats(fr, n_boot) | {"saliency_dice@area": saliency_under_corruption(ablation, v)}
    if not stats:
        raise SystemExit("no variant has robustness results on every fold yet")
    first = next(iter(stats.values()))
    sev = first["severities"]
    lines = ["# Robustness of the paper study's runs (experiments/paper_study.py)", "",
             f"Each fold run of `lclsc ablate --preset paper` ({ablation}) degraded by the 10 corruptions of "
             "`lclsc robustness` at severities 1-5, the `ce` fold of the same replicate scored on the same "
             "corrupted frames. Pooled over the 5 folds (every patient tested once per replicate), averaged over "
             f"replicates; 95% intervals: hierarchical bootstrap over patients then frames ({n_boot} resamples, "
             "stratified by class), the models fixed.", "",
             "| run | replicates | patients | frames | mCE | relative mCE | clean acc. | ce clean acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for v, s in stats.items():
        lines.append(f"| {v} | {s['n_replicates']} | {s['n_patients']} | {s['n_frames']} | {_ci(s['mce'])} | "
                     f"{_ci(s['relative_mce'])} | {_ci(s['accuracy_by_severity'][0])} | "
                     f"{_ci(s['reference_accuracy_by_severity'][0])} |")
    lines += ["", "Accuracy at each severity (mean over the 10 corruptions); `ce` is scored on the same frames.", "",
              "| run | " + " | ".join(str(x) for x in sev) + " |", "|---|" + "---|" * len(sev)]
    lines.append("| ce | " + " | ".join(_ci(first["reference_accuracy_by_severity"][x]) for x in sev) + " |")
    for v, s in stats.items():
        lines.append(f"| {v} | " + " | ".join(_ci(s["accuracy_by_severity"][x]) for x in sev) + " |")
    lines += ["", "Paired accuracy difference to `ce` at each severity:", "",
              "| run | " + " | ".join(str(x) for x in sev) + " |", "|---|" + "---|" * len(sev)]
    for v, s in stats.items():
        lines.append(f"| {v} − ce | " + " | ".join(_ci(s["accuracy_difference_by_severity"][x]) for x in sev) + " |")
    lines += ["", "Saliency under corruption: Dice at the mask's area per severity (mean over corruptions, folds, "
              "replicates; 8 frames with a lesion per fold, no interval).", "",
              "| run | map | " + " | ".join(str(x) for x in sev) + " |", "|---|---|" + "---|" * len(sev)]
    for v, s in stats.items():
        for m, d in s["saliency_dice@area"].items():
            lines.append(f"| {v} | {m} | " + " | ".join(f"{d.get(x, float('nan')):.3f}" for x in sev) + " |")
    lines += ["", "Accuracy per corruption (severities 1-5, point estimates):", "",
              "| corruption | " + " | ".join(["ce", *stats]) + " |", "|---|" + "---|" * (1 + len(stats))]
    for c in first["per_corruption"]:
        cells = [" ".join(f"{a:.2f}" for a in first["per_corruption"][c]["reference_accuracy"])]
        cells += [" ".join(f"{a:.2f}" for a in s["per_corruption"][c]["accuracy"]) for s in stats.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    _write(results, "robustness", lines, stats)
    _figure(stats, sev, os.path.join(results, "robustness.png"))
    return stats


def _figure(stats: dict[str, Any], sev: list[int], path: str) -> None:
    """Accuracy against severity with 95% bands, one line per run (ce from the first run's reference)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    first = next(iter(stats.values()))
    series = {"ce": first["reference_accuracy_by_severity"]} | {v: s["accuracy_by_severity"] for v, s in stats.items()}
    for name, d in series.items():
        est = [d[x]["estimate"] for x in sev]
        ax.plot(sev, est, marker="o", label=name)
        ax.fill_between(sev, [d[x]["ci_low"] for x in sev], [d[x]["ci_high"] for x in sev], alpha=0.15)
    ax.axhline(1 / 3, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy (mean over 10 corruptions)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Held-out patients, 5-fold CV, 95% patient bootstrap", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_sanity(ablation: str, variants: list[str], max_images: int, results: str,
               compute: bool = True) -> dict[str, Any]:
    """Model-randomisation tests on fold 0 of every replicate of ``variants`` (``compute``: run missing ones);
    writes sanity.md/json."""
    out: dict[str, Any] = {}
    for v in variants:
        for rep in replicate_dirs(ablation, v):
            fold = folds_of(rep)[0]
            path = os.path.join(fold, "sanity", "sanity.json")
            if not os.path.exists(path) and not compute:
                continue
            if not os.path.exists(path):
                t0 = time.time()
                methods = ["gradcam"] if v == "ce" else ["gradcam", "sc"]  # the maps the claims are about
                sanity_checks(fold, methods=methods, max_images=max_images, progress=False)
                print(f"[paper] sanity {fold} ({time.time() - t0:.0f} s)", flush=True)
            s = json.load(open(path))
            for m, verdict in s["verdicts"].items():
                out.setdefault(v, {}).setdefault(m, []).append(verdict["spearman_abs_full_cascade"])
    lines = ["# Sanity checks of the paper study's runs (experiments/paper_study.py)", "",
             f"Cascading model randomisation (`lclsc sanity`, {max_images} test frames of fold 0 of each replicate): "
             "mean Spearman(abs) between each method's maps before and after re-initialising every block, per "
             "replicate. A method passes below 0.5 (docs/sanity.md).", "",
             "| run | method | Spearman(abs) after the full cascade, per replicate | passes |", "|---|---|---|---|"]
    for v, d in out.items():
        for m, vals in d.items():
            lines.append(f"| {v} | {m} | {', '.join(f'{x:.3f}' for x in vals)} | "
                         f"{sum(x < 0.5 for x in vals)}/{len(vals)} |")
    _write(results, "sanity", lines, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: robustness and sanity on the paper study's fold runs, then the reports."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", default="runs/paper", help="the `lclsc ablate --preset paper` output folder")
    p.add_argument("--results", default="experiments/results/paper", help="where the reports go")
    p.add_argument("--classification", nargs="*",
                   default=["supcon", "lcl", "lcl_sc", "lcl_sc_topk", "lcl_sc_wildcat", "lcl_sc_k0.01", "lcl_sc_k0.05",
                            "lcl_sc_k0.25", "lcl_sc_consistency", "lcl_sc_decomposed"],
                   help="variants whose classification is tabulated against ce")
    p.add_argument("--robustness", nargs="*", default=["lcl_sc", "lcl", "supcon"],
                   help="variants scored under corruption against ce")
    p.add_argument("--sanity", nargs="*", default=["ce", "lcl_sc", "lcl_sc_decomposed"],
                   help="variants given the model-randomisation tests")
    p.add_argument("--max-images", type=int, default=8, help="frames with a lesion whose maps are scored per fold")
    p.add_argument("--sanity-images", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--report-only", action="store_true", help="only write the reports from what exists")
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.ablation, "plan.json")):
        p.error(f"{a.ablation} is not an ablation output folder (no plan.json)")
    done = [v for v in a.classification if replicate_dirs(a.ablation, v)]
    if done:
        classification_report(a.ablation, done, a.results, a.n_boot)
    if not a.report_only:
        run_robustness(a.ablation, a.robustness, a.max_images)
    if a.robustness:
        robustness_report(a.ablation, a.robustness, a.results, a.n_boot)
    if a.sanity:
        run_sanity(a.ablation, a.sanity, a.sanity_images, a.results, compute=not a.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
