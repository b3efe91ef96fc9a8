"""``lclsc report WORKDIR``: one self-contained HTML file for a training run or a cross-validation study.

``build_report`` detects what ``WORKDIR`` holds: a training run (``config.json`` + ``splits.json``,
``lclsc train``) is scored on its held-out test patients; a CV study (``cv_summary.json``,
``lclsc cv``) is read from its folds' saved held-out predictions (``fold_XX/predictions.npz``),
so every patient appears with the fold that did not train on it. The page holds: what was
trained, the metrics with 95 % patient-bootstrap intervals (and the fold aggregate of a CV
study), ROC curves, confusion matrices, calibration with per-bin counts, the per-patient
accuracy distribution, the confidence analysis, a saliency gallery (correct and wrong test
cases per class, each method side by side with a colour bar, the evidence mask outlined, the
field of view kept), and the ``lclsc sanity`` / ``robustness`` / ``sequences`` results where
they exist. Images are base64 PNG data URIs, CSS is inline, there is no script and no
external URL: the file opens offline. See ``docs/report.md``.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lclsc_jax import __version__, evaluate, explain
from lclsc_jax.data import normalize_images
from lclsc_jax.evaluate import plots
from lclsc_jax.evaluate.statistics import metric_intervals
from lclsc_jax.explain import figures as xfig
from lclsc_jax.protocols import cross_validation as cv
from lclsc_jax.protocols import report_html as H
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train.config import from_dict, uses_gei

__all__ = ["DEFAULT_METHODS", "HIGH", "LOW", "build_report", "detect_workdir",
           "gallery_cases", "per_patient_accuracy"]

#: The gallery's default methods: fast ones (one forward/backward, or a few tail forwards); ``sc`` only with GEI.
DEFAULT_METHODS: tuple[str, ...] = ("sc", "gradcam", "gradcam++", "layercam", "eigencam", "crm")
#: Per-patient accuracy thresholds counted in the report (the CLE study: 13 patients above 90 %, 6 below 70 %).
HIGH, LOW = 0.9, 0.7
#: Where the other commands write, inside the workdir, and what produces them.
EXTRA_SECTIONS = (
    ("sanity", "Saliency sanity checks", "sanity", "sanity.md", "lclsc sanity --workdir {w}"),
    ("robustness", "Robustness to corruptions", "robustness", "robustness.md", "lclsc robustness --workdir {w}"),
    ("sequences", "Sequences", "sequences", "sequences.md", "lclsc sequences --workdir {w}"),
)


def _log(msg: str, progress: bool) -> None:
    """One progress line on stderr."""
    if progress:
        print(f"[report] {msg}", file=sys.stderr, flush=True)


def detect_workdir(workdir: str) -> str:
    """``"cv"`` for a ``lclsc cv`` study, ``"run"`` for a training run; ``FileNotFoundError`` otherwise."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such folder (expected a training workdir or a `lclsc cv` study)")
    if os.path.isfile(os.path.join(workdir, cv.CV_SUMMARY)):
        return "cv"
    if os.path.isfile(os.path.join(workdir, "config.json")) and os.path.isfile(os.path.join(workdir, "splits.json")):
        return "run"
    if os.path.isfile(os.path.join(workdir, cv.CV_CONFIG)):
        raise FileNotFoundError(f"{workdir} is an unfinished cross-validation study (no {cv.CV_SUMMARY}); "
                                "finish it with the same `lclsc cv` command first")
    raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json/splits.json) nor a "
                            f"cross-validation study (no {cv.CV_SUMMARY}); run `lclsc train` or `lclsc cv` first")


def per_patient_accuracy(labels: Any, probs: Any, patients: Any) -> dict[str, dict[str, Any]]:
    """``{patient: {n, accuracy, correct}}`` of frames ``labels (N,)``, ``probs (N, C)``, ``patients (N,)``."""
    y = np.asarray(labels)
    ok = np.asarray(probs).argmax(axis=1) == y
    pat = np.asarray(patients).astype(str)
    return {p: {"n": int((pat == p).sum()), "accuracy": float(ok[pat == p].mean()),
                "correct": int(ok[pat == p].sum())} for p in sorted(set(pat.tolist()))}


def gallery_cases(labels: Any, probs: Any, num_classes: int, per_class: int,
                  eligible: Any = None) -> list[tuple[int, str, list[int]]]:
    """Rows ``(class, "correct" | "wrong", positions)`` of the gallery, most confident first.

    ``labels (N,)``, ``probs (N, C)``; ``eligible (N,)`` bool restricts the candidates (e.g.
    diagnostic frames); a class with no eligible case of a kind gets an empty list.
    """
    y = np.asarray(labels)
    p = np.asarray(probs)
    pred, conf = p.argmax(axis=1), p.max(axis=1)
    ok = np.ones(len(y), bool) if eligible is None else np.asarray(eligible, bool)
    rows = []
    for c in range(num_classes):
        for kind, sel in (("correct", (y == c) & (pred == c)), ("wrong", (y == c) & (pred != c))):
            idx = np.flatnonzero(sel & ok)
            idx = idx[np.argsort(-conf[idx], kind="stable")][:per_class]
            rows.append((c, kind, [int(i) for i in idx]))
    return rows


# ------------------------------------------------------------------------------- inputs


def _run_inputs(workdir: str, checkpoint: str, progress: bool) -> dict[str, Any]:
    """A training run's test predictions and what the gallery needs (its run and data)."""
    run = runs.load_run(workdir, checkpoint)
    _log(f"loaded {workdir} (checkpoint step {run.step}); predicting its test split", progress)
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(workdir, run.cfg, ds)["test"]
    if len(test) == 0:
        raise ValueError(f"{workdir}: the test split is empty; nothing to report")
    res = runs.predict(run, ds, test)
    return {"kind": "run", "cfg": run.cfg, "class_names": tuple(run.class_names), "ds": ds,
            "probs": np.asarray(res["probs"]), "label": np.asarray(res["label"]),
            "index": np.asarray(res["index"]), "patient": np.asarray(res["patient"]).astype(str),
            "fold": np.zeros(len(res["label"]), np.int64), "runs": {0: run}, "fold_dirs": {0: workdir},
            "checkpoint": checkpoint, "step": run.step}


def _cv_inputs(workdir: str, progress: bool) -> dict[str, Any]:
    """A CV study's pooled held-out predictions (one fold per patient) and its summary."""
    with open(os.path.join(workdir, cv.CV_SUMMARY)) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, cv.CV_CONFIG)) as f:
        settings = json.load(f)
    cfg = from_dict(settings["config"])
    parts: dict[str, list[np.ndarray]] = {"probs": [], "label": [], "index": [], "patient": [], "fold": []}
    fold_dirs = {}
    for entry in summary["folds"]:
        k = int(entry["fold"])
        fold_dir = os.path.join(workdir, entry.get("workdir") or cv.fold_name(k))
        path = os.path.join(fold_dir, cv.FOLD_PREDICTIONS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; the CV study is incomplete")
        with np.load(path) as z:
            for key in ("probs", "label", "index", "patient"):
                parts[key].append(z[key])
        parts["fold"].append(np.full(len(parts["label"][-1]), k, np.int64))
        fold_dirs[k] = fold_dir
    _log(f"read {len(fold_dirs)} folds' held-out predictions from {workdir}", progress)
    ds = loop.load_dataset(cfg)
    out = {key: np.concatenate(v) for key, v in parts.items()}
    out["patient"] = out["patient"].astype(str)
    out.update(kind="cv", cfg=cfg, class_names=tuple(summary.get("class_names") or settings["class_names"]), ds=ds,
               runs={}, fold_dirs=fold_dirs, checkpoint=summary.get("checkpoint", "latest"), summary=summary,
               step=None)
    return out


def _fold_run(inp: dict[str, Any], k: int) -> Any:
    """The trained run of fold ``k`` (loaded once)."""
    if k not in inp["runs"]:
        inp["runs"][k] = runs.load_run(inp["fold_dirs"][k], inp["checkpoint"])
    return inp["runs"][k]


# ----------------------------------------------------------------------------- sections


def _metric_cell(value: float | None, ci: Mapping[str, Any] | None = None, key: str = "") -> tuple[str, dict]:
    """A metric as ``0.833 [0.700, 0.950]`` with its full-precision value in ``data-value``."""
    text = H.fmt(value)
    if ci and ci.get("ci_low") is not None:
        text += f" [{H.fmt(ci['ci_low'])}, {H.fmt(ci['ci_high'])}]"
    attrs = {"data-metric": key, "data-value": "" if value is None else repr(float(value))}
    return text, attrs


def _header(inp: dict[str, Any], workdir: str) -> tuple[str, list[str], str]:
    """Title, subtitle lines and the overview table."""
    cfg = inp["cfg"]
    n, n_pat = len(inp["label"]), len(set(inp["patient"].tolist()))
    if inp["kind"] == "cv":
        s = inp["summary"]
        proto = "leave-one-patient-out" if s.get("protocol") == "lopo" else f"{s['n_folds']}-fold"
        what = f"{proto} cross-validation study"
        ckpt = f"{inp['checkpoint']} checkpoint of each fold"
        scope = f"{n} held-out frames of {n_pat} patients (every patient held out once)"
    else:
        what = "training run"
        ckpt = f"{inp['checkpoint']} (step {inp['step']})"
        scope = f"{n} test frames of {n_pat} held-out patients"
    source = cfg.data.source
    if source == "synthetic":
        source = f"synthetic pCLE simulator ({cfg.synthetic.num_patients} patients)"
    items = {
        "workdir": workdir, "kind": what, "architecture": cfg.model.arch, "loss": cfg.loss.name,
        "inference": "GEI (cosine to the class embeddings)" if uses_gei(cfg) else "linear head",
        "data": source, "image size": f"{cfg.data.image_size} px, {cfg.data.channels} channel(s)",
        "target": getattr(cfg.data, "target", "class"), "classes": ", ".join(inp["class_names"]),
        "checkpoint": ckpt, "evaluated on": scope, "training steps": cfg.train.steps,
        "report date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lclsc_jax": __version__,
    }
    title = f"lclsc report: {os.path.basename(os.path.abspath(workdir))}"
    subtitle = [f"{what} · {cfg.model.arch} · loss {cfg.loss.name} · {', '.join(inp['class_names'])}", scope]
    keys = list(items)
    half = (len(keys) + 1) // 2
    return title, subtitle, H.columns(H.kv_table({k: items[k] for k in keys[:half]}),
                                      H.kv_table({k: items[k] for k in keys[half:]}))


def _metrics_section(inp: dict[str, Any], metrics: Mapping[str, Any], n_boot: int, progress: bool) -> str:
    """Metrics with patient-bootstrap intervals; per class; for CV the fold aggregate and per-fold table."""
    _log(f"bootstrap intervals ({n_boot} patient resamples)", progress)
    ci = metric_intervals(inp["probs"], inp["label"], inp["patient"], n_boot=n_boot)
    rows = []
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("f1", "macro F1"),
                      ("auroc", "AUROC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                      ("precision", "precision"), ("ece", "ECE (15 bins)"),
                      ("patient_accuracy", "patient accuracy (majority vote)")):
        rows.append((name, _metric_cell(metrics.get(key), ci.get(key), key)))
    pooled = " (pooled held-out predictions of every fold)" if inp["kind"] == "cv" else ""
    body = (f"<p>Frame-level metrics on {len(inp['label'])} frames{pooled}, with 95 % intervals from a "
            f"hierarchical bootstrap over patients (within class) and frames ({n_boot} resamples); the "
            "intervals include the patient-to-patient spread.</p>")
    pc = metrics["per_class"]
    note = ""
    if metrics.get("positive_class") is not None:
        note = (f'<p class="note">sensitivity/specificity/precision: positive class '
                f"{H.esc(metrics['class_names'][metrics['positive_class']])}.</p>")
    body += H.columns(
        H.table(["metric", "value [95 % CI]"], rows) + note,
        "<h3>Per class</h3>" + H.table(
            ["class", "support", "recall", "specificity", "precision", "F1", "AUROC (OvR)"],
            [(c, v["support"], v["recall"], v["specificity"], v["precision"], v["f1"], v["auroc"])
             for c, v in pc.items()]))
    if inp["kind"] == "cv":
        s = inp["summary"]
        agg = s["aggregate"]["metrics"]
        body += ("<h3>Across folds</h3><p>Mean ± standard deviation [95 % t-interval] over the folds "
                 "(the folds' training sets overlap, so this interval is too narrow; the bootstrap above "
                 "includes the patients).</p>")
        body += H.table(["metric", "mean ± std [95 % CI]", "pooled"],
                        [(k, (cv.format_ci(agg[k]), {"data-fold-mean": k,
                                                     "data-value": repr(float(agg[k]["mean"]))}), s["pooled"].get(k))
                         for k in cv.SCALAR_KEYS if k in agg and agg[k].get("mean") is not None])
        fold_keys = [k for k in ("accuracy", "balanced_accuracy", "f1", "auroc", "ece", "patient_accuracy")]
        body += "<h3>Per fold</h3>" + H.table(
            ["fold", "test patients", "frames", "checkpoint step"] + fold_keys,
            [(f["fold"], ", ".join(f.get("test_patients") or []), f.get("n_test"), f.get("checkpoint_step"))
             + tuple(f.get(k) for k in fold_keys) for f in s["folds"]])
        for note in s.get("notes", []):
            body += f'<p class="note">{H.esc(note)}</p>'
    return body


def _curves_section(inp: dict[str, Any], metrics: Mapping[str, Any]) -> str:
    """ROC curves (per fold too for CV) and confusion matrices (counts and row-normalised)."""
    names = list(inp["class_names"])
    y, p = inp["label"], inp["probs"]
    parts = []
    if len(np.unique(y)) > 1:
        parts.append(H.img(H.figure_uri(plots.make_roc_figure(y, p, class_names=names)), "ROC curves",
                           "ROC (held-out frames; AUROC as in the metrics table)"))
        if inp["kind"] == "cv":
            folds = sorted(set(inp["fold"].tolist()))
            ys = [y[inp["fold"] == k] for k in folds]
            if any(len(np.unique(v)) > 1 for v in ys):
                parts.append(H.img(H.figure_uri(plots.make_roc_figure(ys, [p[inp["fold"] == k] for k in folds],
                                                                      class_names=names)),
                                   "ROC per fold", "ROC of each fold's held-out patients"))
    else:
        parts.append('<p class="missing">Only one class among the evaluated frames: no ROC curve.</p>')
    cm = np.asarray(metrics["confusion_matrix"])
    grid = "".join(H.img(H.figure_uri(plots.make_confusion_figure(cm, names, normalize=nz)),
                         "confusion matrix" + (" row-normalised" if nz else ""),
                         "rows: true class, columns: predicted" + (", each row sums to 1" if nz else ", counts"))
                   for nz in (False, True))
    return f'<div class="grid">{"".join(parts)}</div><h3>Confusion matrix</h3><div class="grid">{grid}</div>'


def _calibration_section(inp: dict[str, Any], metrics: Mapping[str, Any]) -> str:
    """Reliability diagram with per-bin counts, and the bins as a table."""
    rel = metrics["reliability"]
    edges = rel["bin_edges"]
    rows = [(f"{edges[b]:.3f}–{edges[b + 1]:.3f}", rel["count"][b], rel["confidence"][b], rel["accuracy"][b])
            for b in range(len(rel["count"])) if rel["count"][b]]
    return (f"<p>Expected calibration error ECE = {H.fmt(rel['ece'])} over {len(rel['count'])} equal-width "
            "confidence bins (empty bins left out of the table).</p>"
            + H.img(H.figure_uri(plots.make_reliability_figure(inp["probs"], inp["label"])), "reliability diagram",
                    "accuracy per confidence bin; the number above each bar is its frame count")
            + H.table(["confidence bin", "frames", "mean confidence", "accuracy"], rows))


def _patients_section(inp: dict[str, Any]) -> str:
    """Per-patient accuracy: distribution figure, counts above HIGH / below LOW, table sorted by accuracy."""
    pp = per_patient_accuracy(inp["label"], inp["probs"], inp["patient"])
    acc = {k: v["accuracy"] for k, v in pp.items()}
    n_hi = sum(a > HIGH for a in acc.values())
    n_lo = sum(a < LOW for a in acc.values())
    held = ("every patient's accuracy on its own frames, predicted by the fold that held it out"
            if inp["kind"] == "cv" else "accuracy of each held-out test patient's frames")
    fold_of = {}
    if inp["kind"] == "cv":
        for p_, k in zip(inp["patient"], inp["fold"]):
            fold_of[str(p_)] = int(k)
    order = sorted(pp, key=lambda k: (pp[k]["accuracy"], k))
    names = inp["class_names"]
    label_of = {}
    for p_, lab in zip(inp["patient"], inp["label"]):
        label_of.setdefault(str(p_), []).append(int(lab))
    rows, attrs = [], []
    for k in order:
        v = pp[k]
        lab = names[int(np.bincount(label_of[k]).argmax())]
        row = [k, lab, v["n"], v["correct"], (v["accuracy"], {"data-value": repr(v["accuracy"])})]
        if fold_of:
            row.append(fold_of[k])
        rows.append(row)
        attrs.append({"data-patient": k, "class": "high" if v["accuracy"] > HIGH else
                      ("low" if v["accuracy"] < LOW else "mid")})
    head = ["patient", "class (majority)", "frames", "correct", "accuracy"] + (["fold"] if fold_of else [])
    return (f"<p>{H.esc(held)}. <b data-count='above-{int(HIGH * 100)}'>{n_hi}</b> of {len(pp)} patients above "
            f"{HIGH:.0%}, <b data-count='below-{int(LOW * 100)}'>{n_lo}</b> below {LOW:.0%}.</p>"
            + H.img(H.figure_uri(plots.make_patient_distribution_figure(acc, HIGH, LOW)),
                    "per-patient accuracy distribution", "histogram and strip plot of per-patient accuracy")
            + H.table(head, rows, row_attrs=attrs, cls="patients"))


def _confidence_section(inp: dict[str, Any]) -> str:
    """Correct vs wrong confidence histograms; accuracy and coverage vs confidence threshold."""
    p, y = inp["probs"], inp["label"]
    conf, ok = p.max(axis=1), p.argmax(axis=1) == y
    tab = plots.threshold_table(p, y, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    mean_c = float(conf[ok].mean()) if ok.any() else None
    mean_w = float(conf[~ok].mean()) if (~ok).any() else None
    body = (f"<p>{int(ok.sum())} correct frames (mean confidence {H.fmt(mean_c)}), {int((~ok).sum())} wrong "
            f"(mean confidence {H.fmt(mean_w)}). Keeping only frames at or above a confidence threshold trades "
            "coverage for accuracy.</p>")
    fig_h = plots.make_confidence_figure(p, y)
    fig_h.delaxes(fig_h.axes[1])  # the reliability panel is in the calibration section
    body += '<div class="grid">' + H.img(H.figure_uri(fig_h), "confidence histogram",
                                         "correct (blue) and wrong (vermillion) frames per confidence bin, "
                                         "counts on the bars, symmetric-log scale")
    body += H.img(H.figure_uri(plots.make_threshold_figure(p, y)), "accuracy and coverage vs threshold",
                  "accuracy of the frames kept (confidence ≥ threshold) and the fraction kept") + "</div>"
    body += H.table(["confidence ≥", "frames kept", "coverage", "accuracy of kept"],
                    [(float(t), int(k), float(c), None if not np.isfinite(a) else float(a))
                     for t, k, c, a in zip(tab["threshold"], tab["kept"], tab["coverage"], tab["accuracy"])])
    return body


def _case_figure(display: np.ndarray, maps: Mapping[str, np.ndarray], mask: np.ndarray | None,
                 valid: np.ndarray | None, title: str) -> Figure:
    """One gallery row: the frame (mask outlined) and each method's map with its colour bar."""
    cells = ["image"] + list(maps)
    fig = Figure(figsize=(2.35 * len(cells), 2.5))
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    fig.subplots_adjust(wspace=0.45)
    for ax, m in zip(axes, cells):
        if m == "image":
            xfig.overlay(ax, display, np.zeros(display.shape[:2]), "image", alpha=0.0, mask=mask)
        else:
            xfig.overlay(ax, display, maps[m], m, valid=valid, mask=mask, colorbar=True)
    fig.suptitle(title, fontsize=9)
    return fig


def _gallery_section(inp: dict[str, Any], per_class: int, methods: Sequence[str] | None, progress: bool) -> str:
    """Saliency gallery: per class, correct and wrong held-out cases, every method side by side."""
    ds, names = inp["ds"], inp["class_names"]
    idx = inp["index"]
    eligible = np.ones(len(idx), bool)
    # A tissue classifier is shown on diagnostic frames; a frame filter's classes are the flag itself.
    if getattr(ds, "diagnostic", None) is not None and getattr(inp["cfg"].data, "target", "class") != "diagnostic":
        eligible &= np.asarray(ds.diagnostic)[idx].astype(bool)
    rows = gallery_cases(inp["label"], inp["probs"], len(names), per_class, eligible)
    picked = sorted({i for _, _, pos in rows for i in pos})
    if not picked:
        return '<p class="missing">No test case to show.</p>'
    run0 = _fold_run(inp, int(inp["fold"][picked[0]]))
    gei = run0.global_emb is not None
    chosen = list(methods) if methods else [m for m in DEFAULT_METHODS if gei or m != "sc"]
    unknown = [m for m in chosen if m not in explain.METHODS]
    if unknown:
        raise ValueError(f"unknown saliency method(s) {unknown}; choose from {list(explain.METHODS)}")
    u8 = np.stack([ds.source[int(idx[i])]["image"] for i in picked])
    masks = None
    if ds.has_masks:
        masks = np.stack([np.asarray(ds.source[int(idx[i])]["mask"]).astype(bool) for i in picked])
    display = u8.astype(np.float32) / 255.0
    valid = xfig.field_of_view(display)
    x = normalize_images(u8)
    pred = inp["probs"][picked].argmax(axis=1)
    maps: dict[str, np.ndarray] = {m: np.zeros((len(picked),) + u8.shape[1:3], np.float32) for m in chosen}
    skipped: dict[str, str] = {}
    folds = sorted({int(inp["fold"][i]) for i in picked})
    for fk in folds:
        run = _fold_run(inp, fk)
        sel = [j for j, i in enumerate(picked) if int(inp["fold"][i]) == fk]
        for k, m in enumerate(chosen):
            if m in skipped:
                continue
            _log(f"saliency {m} ({k + 1}/{len(chosen)}) on {len(sel)} case(s)"
                 + (f", fold {fk}" if inp["kind"] == "cv" else ""), progress)
            try:
                mp = explain.saliency_batched(m, run.model, run.variables, x[sel], pred[sel], batch_size=8,
                                              stage="last", global_emb=run.global_emb, tau=run.cfg.loss.tau,
                                              **run.saliency_options(m))
            except (ValueError, FileNotFoundError) as e:
                skipped[m] = str(e).split(";")[0]
                continue
            maps[m][sel] = xfig.restrict_to_fov(mp, valid)
    shown = [m for m in chosen if m not in skipped]
    pos_of = {i: j for j, i in enumerate(picked)}
    body = [f"<p>Held-out cases, most confident first, explaining the <b>predicted</b> class; methods: "
            f"{H.esc(', '.join(shown))}. Colour bars: the normalised map (0 to 1)"
            + ("; white outline: the evidence mask" if masks is not None else "")
            + ("; maps restricted to the circular field of view (black corners)" if valid is not None else "")
            + ".</p>"]
    for m, why in skipped.items():
        body.append(f'<p class="note">{H.esc(m)} skipped: {H.esc(why)}</p>')
    for c, kind, pos in rows:
        body.append(f"<h3>{H.esc(names[c])}: {kind}</h3>")
        if not pos:
            body.append(f'<p class="none" data-empty="{H.esc(names[c])}-{kind}">none</p>')
            continue
        for i in pos:
            j = pos_of[i]
            pr = inp["probs"][i]
            title = (f"patient {inp['patient'][i]}, record {int(idx[i])}: true {names[int(inp['label'][i])]}, "
                     f"predicted {names[int(pr.argmax())]} (p={pr.max():.2f})")
            fig = _case_figure(display[j], {m: maps[m][j] for m in shown},
                               None if masks is None else masks[j], valid, title)
            body.append(H.img(H.figure_uri(fig, dpi=90), f"saliency {names[c]} {kind} record {int(idx[i])}"))
    return "".join(body)


def _extra_section(workdir: str, folder: str, md_name: str, command: str) -> str:
    """A result folder of another command: its Markdown summary and PNGs, or how to produce it."""
    d = os.path.join(workdir, folder)
    md = os.path.join(d, md_name)
    js = os.path.join(d, md_name.replace(".md", ".json"))
    if not (os.path.isfile(md) or os.path.isfile(js)):
        return (f'<p class="missing">Not computed for this workdir. Produce it with '
                f"<code>{H.esc(command.format(w=workdir))}</code>, then run <code>lclsc report</code> again.</p>")
    body = []
    if os.path.isfile(md):
        with open(md) as f:
            body.append(H.markdown(f.read()))
    else:
        with open(js) as f:
            body.append(H.kv_table(_flatten(json.load(f))))
    for png in sorted(glob.glob(os.path.join(d, "*.png"))):
        with open(png, "rb") as f:
            body.append(H.img(H.png_uri(f.read()), os.path.basename(png), os.path.basename(png)))
    return "".join(body)


def _flatten(obj: Any, prefix: str = "", limit: int = 80) -> dict[str, Any]:
    """Scalar leaves of a JSON object as ``{"a.b.c": value}`` (lists of scalars joined; at most ``limit``)."""
    out: dict[str, Any] = {}

    def walk(o: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(o, Mapping):
            for k, v in o.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(o, list) and o and all(not isinstance(v, (Mapping, list)) for v in o):
            out[key] = ", ".join(H.fmt(v) for v in o[:20]) + (" …" if len(o) > 20 else "")
        elif not isinstance(o, list):
            out[key] = H.fmt(o) if isinstance(o, float) else o

    walk(obj, prefix)
    return out


# --------------------------------------------------------------------------------- main


def build_report(workdir: str, out: str | None = None, *, checkpoint: str = "best", gallery_per_class: int = 2,
                 methods: Sequence[str] | None = None, n_boot: int = 1000, progress: bool = True) -> Path:
    """Write the HTML report of a training run or a ``lclsc cv`` study in ``workdir``; return its path.

    ``out``: the file (default ``WORKDIR/report.html``). ``checkpoint``: which checkpoint of a
    training run (a CV study uses the checkpoint its folds were evaluated with).
    ``gallery_per_class``: correct and wrong cases per class in the saliency gallery (0: no
    gallery); ``methods``: the gallery's saliency methods (default ``DEFAULT_METHODS``, ``sc``
    only for GEI runs). ``n_boot``: bootstrap resamples of the intervals. Progress on stderr.
    """
    if gallery_per_class < 0:
        raise ValueError(f"gallery_per_class (--gallery) must be >= 0, got {gallery_per_class}")
    if n_boot < 1:
        raise ValueError(f"n_boot (--n-boot) must be >= 1, got {n_boot}")
    kind = detect_workdir(workdir)
    inp = _run_inputs(workdir, checkpoint, progress) if kind == "run" else _cv_inputs(workdir, progress)
    names = list(inp["class_names"])
    metrics = evaluate.classification_metrics(inp["label"], inp["probs"], class_names=names,
                                              patients=inp["patient"])
    title, subtitle, overview = _header(inp, workdir)
    metrics_html = _metrics_section(inp, metrics, n_boot, progress)
    _log("figures: ROC, confusion, calibration, patients, confidence", progress)
    sections = [
        ("overview", "What was evaluated", overview),
        ("metrics", "Metrics", metrics_html),
        ("roc", "ROC and confusion matrix", _curves_section(inp, metrics)),
        ("calibration", "Calibration", _calibration_section(inp, metrics)),
        ("patients", "Per-patient accuracy", _patients_section(inp)),
        ("confidence", "Confidence analysis", _confidence_section(inp)),
    ]
    if gallery_per_class:
        sections.append(("gallery", "Saliency gallery", _gallery_section(inp, gallery_per_class, methods, progress)))
    for anchor, name, folder, md, command in EXTRA_SECTIONS:
        sections.append((anchor, name, _extra_section(workdir, folder, md, command)))
    path = Path(out) if out else Path(workdir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(H.page(title, subtitle, sections), encoding="utf-8")
    os.replace(tmp, path)
    _log(f"written: {path}", progress)
    return path
