"""Two-stage and sequence-level evaluation of a trained tissue classifier (``lclsc sequences``).

The frames of one split (held-out patients by default) are grouped into sequences (patient, probe pass,
frame index). Per frame: the classifier's probabilities and scores (GEI cosine ``cos(z, G_c)``, or
log-probabilities for a linear-head run) and, with a frame filter run (``data.target=diagnostic``),
P(diagnostic) on the same records; a frame is *kept* when P(diagnostic) >= ``threshold``.

Reported, each with a patient-bootstrap 95% interval (``evaluate.statistics.hierarchical_bootstrap``,
``levels="patients"``: a resample draws patients, each brings all its frames / window positions /
sequences):

* the filter: sensitivity (non-diagnostic frames rejected), specificity (diagnostic frames kept), kept fraction;
* frame accuracy over all frames, the frames the filter keeps, and the truly diagnostic frames (an oracle);
* window accuracy (every position of every sequence: its window's decision vs the label; undecided positions,
  windows without a kept frame, count as wrong) and sequence accuracy (one decision per sequence from all its
  frames), for each aggregator (``mean_score``, ``vote``) and the learned temporal model, with each keep rule
  (``all``: every frame; ``filter``; ``oracle``: the true flags);
* accuracy vs window length, and the seconds of video a stable online decision needs.

The temporal model (``models.temporal.TemporalHead``) is fitted on the classifier's frozen embeddings of the
TRAIN split's sequences (one fit per keep rule) and evaluated on ``split``; its parameters are saved under
the output folder. Its sequence decision is the argmax of its per-frame log-probabilities averaged over the
kept frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from lclsc_jax.evaluate import sequences as sq
from lclsc_jax.evaluate.statistics import hierarchical_bootstrap
from lclsc_jax.protocols import runs

__all__ = ["DEFAULT_WINDOWS_S", "SequenceError", "check_same_data", "evaluate_sequences", "frame_scores",
           "summary_table"]

#: Window lengths (seconds) of the accuracy-vs-window curve.
DEFAULT_WINDOWS_S = (0.25, 0.5, 1.0, 2.0, 4.0)
_DATA_FIELDS_IGNORED = ("target", "cache_dir", "num_workers", "label_fraction")


class SequenceError(ValueError):
    """Input that cannot be evaluated as sequences (wrong run kind, no sequences, bad window)."""


def _say(msg: str, enabled: bool) -> None:
    """One progress line on stderr."""
    if enabled:
        print(f"[sequences] {msg}", file=sys.stderr, flush=True)


def frame_scores(probs: np.ndarray, embedding: np.ndarray, global_emb: np.ndarray | None) -> np.ndarray:
    """(N, C) frame scores: GEI cosine ``cos(z, G_c)`` from (N, D) embeddings and (C, D) global embeddings, or
    ``log(probs)`` for a linear-head run (``global_emb is None``)."""
    if global_emb is None:
        return np.log(np.clip(np.asarray(probs, np.float64), 1e-12, None))
    z = np.asarray(embedding, np.float64)
    g = np.asarray(global_emb, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return z @ g.T


def check_same_data(cfg: Any, filter_cfg: Any, filter_workdir: str) -> None:
    """Raise SequenceError unless the filter run was trained as a filter on the classifier's data."""
    if filter_cfg.data.target != "diagnostic":
        raise SequenceError(f"--filter {filter_workdir}: that run was trained with data.target="
                            f"{filter_cfg.data.target}, not a frame filter; train one with "
                            "--set data.target=diagnostic loss.name=ce")
    a, b = dataclasses.asdict(cfg.data), dataclasses.asdict(filter_cfg.data)
    diff = [k for k in a if k not in _DATA_FIELDS_IGNORED and a[k] != b.get(k)]
    if cfg.data.source == "synthetic" and cfg.synthetic != filter_cfg.synthetic:
        diff.append("synthetic.*")
    if diff:
        raise SequenceError(f"--filter {filter_workdir}: its data differ from the classifier's ({', '.join(diff)}); "
                            "train the filter on the same data settings")


def _load(workdir: str, which: str, flag: str) -> Any:
    """``runs.load_run`` with the flag named in its error."""
    try:
        return runs.load_run(workdir, which)
    except FileNotFoundError as e:
        raise SequenceError(f"{flag}: {e}") from None


def _interval(outcomes: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Estimate and patient-bootstrap interval of the mean of ``outcomes (N,)`` (NaN = not scored)."""
    x = np.asarray(outcomes, np.float64)
    if x.size == 0 or not np.isfinite(x).any():
        return {"estimate": None, "ci_low": None, "ci_high": None, "n": 0, "n_patients": 0}
    b = hierarchical_bootstrap(x, patients, n_boot=n_boot, seed=seed, levels="patients")
    return {"estimate": b["estimate"], "ci_low": b["ci_low"], "ci_high": b["ci_high"],
            "n": int(np.isfinite(x).sum()), "n_patients": b["n_patients"]}


def _clean(x: Any) -> Any:
    """JSON-ready copy: NumPy scalars to Python, NaN to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _no_kept_in_window(keep: np.ndarray, window: int, causal: bool) -> np.ndarray:
    """(T,) True where a position's window holds no kept frame."""
    lo, hi = sq.window_bounds(len(keep), window, causal)
    kc = np.concatenate([[0], np.cumsum(keep)])
    return (kc[hi] - kc[lo]) == 0


def _temporal(groups_tr, groups_ev, frame, keep_tr, keep_ev, n_classes, window, causal, steps, seed, out_path):
    """Fit the temporal model on train sequences, save its params; per-sequence (T, C) probs on the eval ones."""
    from lclsc_jax.models.temporal import TemporalHead
    from lclsc_jax.train import temporal as tt

    model = TemporalHead(num_classes=n_classes, window=window, hidden=64, causal=causal)
    z_tr = [frame["z"][g] for g in groups_tr]
    y_tr = [frame["label"][g] for g in groups_tr]
    k_tr = [keep_tr[g] for g in groups_tr]
    params, losses = tt.fit_temporal(model, z_tr, y_tr, k_tr, steps=steps, seed=seed)
    tt.save_params(out_path, params)
    probs = tt.predict_temporal(model, params, [frame["z"][g] for g in groups_ev], [keep_ev[g] for g in groups_ev])
    return probs, {"params": os.path.basename(out_path), "steps": int(steps),
                   "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                   "train_sequences": len(groups_tr),
                   "window_frames": int(window), "causal": bool(causal), "hidden": 64}


def _method_outputs(how, probs_seq, scores_seq, keep_seq, window, causal):
    """Per-position decisions (T,) and the sequence decision for one sequence, one aggregator."""
    preds, _ = sq.window_predictions(scores_seq, probs_seq, keep_seq, window, causal=causal, how=how)
    seq_dec = sq.decisions(sq.aggregate_window(scores_seq, probs_seq, keep_seq, how=how))
    online, _ = sq.growing_predictions(scores_seq, probs_seq, keep_seq, how=how)
    return preds, int(seq_dec), online


def evaluate_sequences(workdir: str, filter_workdir: str | None = None, *, split: str = "test", fps: float = 12.0,
                       window_s: float = 1.0, causal: bool = True, threshold: float = 0.5, n_boot: int = 1000,
                       temporal_steps: int = 300, out_dir: str | None = None, seed: int = 0, progress: bool = True,
                       which: str = "best", windows_s: tuple[float, ...] = DEFAULT_WINDOWS_S,
                       figures: bool = True) -> dict[str, Any]:
    """Frame / window / sequence accuracy of the classifier run ``workdir`` (optionally behind the filter run
    ``filter_workdir``) on ``split``; writes ``OUT/sequences.json`` and figures, returns the same summary."""
    from lclsc_jax.train import loop

    t0 = time.time()
    if fps <= 0:
        raise SequenceError(f"--fps must be > 0, got {fps}")
    window = int(round(window_s * fps))
    if window < 1:
        raise SequenceError(f"--window {window_s} s at {fps} frames/s is {window_s * fps:.2f} frames; a window needs "
                            "at least 1 frame")
    if not 0.0 <= threshold <= 1.0:
        raise SequenceError(f"--threshold must be in [0, 1], got {threshold}")
    _say(f"loading {workdir}", progress)
    run = _load(workdir, which, "--workdir")
    if run.cfg.data.target != "class":
        raise SequenceError(f"--workdir {workdir} is a frame filter (data.target={run.cfg.data.target}); pass the "
                            "tissue classifier as --workdir and the filter as --filter")
    frun = None
    if filter_workdir is not None:
        frun = _load(filter_workdir, which, "--filter")
        check_same_data(run.cfg, frun.cfg, filter_workdir)
    ds = loop.load_dataset(run.cfg)
    splits = runs.run_splits(workdir, run.cfg, ds)
    if split not in splits:
        raise SequenceError(f"--split {split}: the run has splits {sorted(splits)}")
    if frun is not None:
        seen = np.intersect1d(runs.run_splits(filter_workdir, frun.cfg, ds)["train"], splits[split])
        if seen.size:
            raise SequenceError(f"--filter {filter_workdir} was trained on {seen.size} frames of the {split} split; "
                                "train it with the classifier's data.split_seed so the test patients are unseen")
    grouped_by = "sequence" if ds.sequence is not None else "patient"
    groups = sq.sequence_groups(ds.patients, ds.sequence, ds.frame)
    if max(len(g) for g in groups) < 2:
        raise SequenceError(f"the data of {workdir} have one frame per sequence: windows need sequences of frames "
                            "(the simulator's synthetic.images_per_patient > synthetic.sequences_per_patient, or "
                            "'sequence'/'frame' columns in the manifest)")
    in_ev = np.zeros(len(ds.labels), bool)
    in_ev[splits[split]] = True
    in_tr = np.zeros(len(ds.labels), bool)
    in_tr[splits["train"]] = True
    groups_ev = [g for g in groups if in_ev[g].all()]
    groups_tr = [g for g in groups if in_tr[g].all()]
    if not groups_ev:
        raise SequenceError(f"no whole sequence lies in the {split} split")
    idx = np.unique(np.concatenate(groups_ev + groups_tr))

    _say(f"predicting {len(idx)} frames with the classifier", progress)
    pr = runs.predict(run, ds, idx)
    n = len(ds.labels)
    c = len(run.class_names)
    frame = {"probs": np.full((n, c), np.nan), "z": np.zeros((n, pr["embedding"].shape[1]), np.float32),
             "label": np.asarray(ds.labels, np.int64), "p_diag": np.full(n, np.nan),
             "patients": np.asarray(ds.patients).astype(str)}
    frame["probs"][pr["index"]] = pr["probs"]
    frame["z"][pr["index"]] = pr["embedding"]
    ge = run.global_emb
    frame["scores"] = np.full((n, c), np.nan)
    frame["scores"][pr["index"]] = frame_scores(pr["probs"], pr["embedding"], None if ge is None else np.asarray(ge))
    if frun is not None:
        _say(f"predicting {len(idx)} frames with the filter", progress)
        fp = runs.predict(frun, ds, idx)
        frame["p_diag"][fp["index"]] = fp["probs"][:, 1]
    diag = None if ds.diagnostic is None else np.asarray(ds.diagnostic, bool)

    keeps: dict[str, np.ndarray] = {"all": np.ones(n, bool)}
    if frun is not None:
        keeps["filter"] = frame["p_diag"] >= threshold
    if diag is not None:
        keeps["oracle"] = diag.copy()

    ev = np.concatenate(groups_ev)
    pats = frame["patients"]
    lens = [len(g) for g in groups_ev]
    correct = (frame["probs"][ev].argmax(1) == frame["label"][ev]).astype(np.float64)
    summary: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "filter_workdir": None if frun is None else os.path.abspath(filter_workdir),
        "checkpoint": which, "split": split, "fps": fps, "window_s": window_s, "window_frames": window,
        "causal": causal, "threshold": threshold, "n_boot": n_boot, "seed": seed, "class_names": list(run.class_names),
        "scores": "gei_cosine" if ge is not None else "log_probs", "grouped_by": grouped_by,
        "grouping_note": ("frames grouped by (patient, sequence), ordered by frame index" if grouped_by == "sequence"
                          else "the data have no sequence ids: one sequence per patient, frames in record order"),
        "n_frames": int(len(ev)), "n_sequences": len(groups_ev), "n_patients": int(len(np.unique(pats[ev]))),
        "sequence_lengths": {"min": int(min(lens)), "median": float(np.median(lens)), "max": int(max(lens))},
        "interval": "patient bootstrap (hierarchical_bootstrap levels=patients), 95% percentile",
    }
    boot = lambda x, p: _interval(x, p, n_boot, seed)  # noqa: E731

    # --- filter and frame level
    if frun is not None and diag is not None:
        kept = keeps["filter"][ev]
        d = diag[ev]
        summary["filter"] = {
            **sq.filter_scores(frame["p_diag"][ev], d, threshold),
            "sensitivity_ci": boot(np.where(~d, (~kept).astype(float), np.nan), pats[ev]),
            "specificity_ci": boot(np.where(d, kept.astype(float), np.nan), pats[ev]),
            "kept_fraction_ci": boot(kept.astype(float), pats[ev]),
        }
    frame_acc = {"all": boot(correct, pats[ev])}
    if "filter" in keeps:
        frame_acc["filter_kept"] = boot(np.where(keeps["filter"][ev], correct, np.nan), pats[ev])
    if "oracle" in keeps:
        frame_acc["diagnostic_only"] = boot(np.where(keeps["oracle"][ev], correct, np.nan), pats[ev])
    summary["frame_accuracy"] = frame_acc

    # --- learned temporal model, one per keep rule
    out = os.path.abspath(out_dir or os.path.join(workdir, "sequences"))
    os.makedirs(out, exist_ok=True)
    temporal_probs: dict[str, list[np.ndarray]] = {}
    summary["temporal_model"] = {}
    if temporal_steps > 0 and groups_tr:
        for mode in [m for m in ("all", "filter") if m in keeps]:
            keep_tr = keeps[mode]  # with the filter: its own flags on the train frames
            _say(f"fitting the temporal model ({mode} frames, {temporal_steps} steps)", progress)
            path = os.path.join(out, f"temporal_{mode}.msgpack")
            temporal_probs[mode], info = _temporal(groups_tr, groups_ev, frame, keep_tr, keeps[mode], c, window,
                                                   causal, temporal_steps, seed, path)
            summary["temporal_model"][mode] = info

    # --- windows, sequences, stability
    _say("aggregating windows and sequences", progress)
    methods = list(sq.AGGREGATORS) + (["temporal"] if temporal_probs else [])
    win: dict[str, Any] = {}
    seqacc: dict[str, Any] = {}
    stab: dict[str, Any] = {}
    timelines: list[dict[str, Any]] = []
    for mode, keep in keeps.items():
        for how in methods:
            if how == "temporal" and mode not in temporal_probs:
                continue
            pos_out, pos_pat, und, seq_out, seq_pat = [], [], [], [], []
            st_grow, st_win, fin_grow = [], [], []
            for si, g in enumerate(groups_ev):
                y = frame["label"][g]
                k = keep[g]
                if how == "temporal":
                    tp = temporal_probs[mode][si]
                    preds = np.where(_no_kept_in_window(k, window, causal), -1, tp.argmax(1))
                    logp = np.log(np.clip(tp, 1e-12, None))
                    seq_dec = int(sq.decisions(sq.aggregate_window(logp, tp, k)))
                    online = None
                else:
                    preds, seq_dec, online = _method_outputs(how, frame["probs"][g], frame["scores"][g], k, window,
                                                             causal)
                pos_out.append((preds == y).astype(float))
                pos_pat.append(pats[g])
                und.append(preds < 0)
                seq_out.append(float(seq_dec == y[0]))
                seq_pat.append(pats[g[0]])
                st_win.append(sq.stable_decision_time(preds, fps))
                if online is not None:
                    st_grow.append(sq.stable_decision_time(online, fps))
                    fin_grow.append(float(online[-1] == y[0]))
                if mode == ("filter" if "filter" in keeps else "all") and how == "mean_score":
                    timelines.append({"g": g, "preds": preds})
            key = f"{how}/{mode}"
            po, pp = np.concatenate(pos_out), np.concatenate(pos_pat)
            win[key] = {**boot(po, pp), "undecided_fraction": float(np.concatenate(und).mean())}
            seqacc[key] = boot(np.asarray(seq_out), np.asarray(seq_pat))
            stab[key] = {"window": _stability(st_win, None, fps, seq_pat, boot)}
            if st_grow:
                stab[key]["growing"] = _stability(st_grow, np.asarray(fin_grow), fps, seq_pat, boot)
    summary["window_accuracy"] = win
    summary["sequence_accuracy"] = seqacc
    summary["stability"] = stab

    # --- accuracy vs window length (mean_score, the filter's keep rule if any)
    curve_mode = "filter" if "filter" in keeps else "all"
    curve = []
    for w_s in sorted(set(windows_s) | {window_s}):
        w = int(round(w_s * fps))
        if w < 1:
            continue
        row: dict[str, Any] = {"window_s": float(w_s), "window_frames": w}
        for how in sq.AGGREGATORS:
            po, pp = [], []
            for g in groups_ev:
                preds, _ = sq.window_predictions(frame["scores"][g], frame["probs"][g], keeps[curve_mode][g], w,
                                                 causal=causal, how=how)
                po.append((preds == frame["label"][g]).astype(float))
                pp.append(pats[g])
            row[how] = boot(np.concatenate(po), np.concatenate(pp))
        curve.append(row)
    summary["accuracy_vs_window"] = {"keep": curve_mode, "rows": curve}
    summary["seconds"] = round(time.time() - t0, 1)
    summary["out_dir"] = os.path.abspath(out)
    summary = _clean(summary)
    if figures:
        _say("drawing figures", progress)
        summary["figures"] = [
            _plot_accuracy_vs_window(summary, os.path.join(out, "accuracy_vs_window.png")),
            _plot_timelines(timelines, frame, keeps.get("filter"), run.class_names, fps, window,
                            os.path.join(out, "timelines.png")),
        ]
    with open(os.path.join(out, "sequences.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    with open(os.path.join(out, "sequences.md"), "w") as f:
        f.write(summary_table(summary) + "\n")
    _say(f"wrote {os.path.join(out, 'sequences.json')} ({summary['seconds']} s)", progress)
    return summary


def _fmt(r: dict[str, Any] | None) -> str:
    """``0.812 [0.700, 0.900]`` from an interval dict ("-" when undefined)."""
    if not r or r.get("estimate") is None:
        return "-"
    if r.get("ci_low") is None:
        return f"{r['estimate']:.3f}"
    return f"{r['estimate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def summary_table(summary: dict[str, Any]) -> str:
    """A Markdown table of a :func:`evaluate_sequences` summary: filter, frame, window and sequence accuracy."""
    lines = [f"# Sequences: {summary['split']} split, {summary['n_sequences']} sequences of "
             f"{summary['n_patients']} patients ({summary['n_frames']} frames; grouped by {summary['grouped_by']})",
             "",
             f"Window {summary['window_s']:g} s = {summary['window_frames']} frames at {summary['fps']:g} frames/s, "
             f"{'causal (online)' if summary['causal'] else 'centred'}; 95% patient-bootstrap intervals.", ""]
    f = summary.get("filter")
    if f:
        lines += [f"Filter at P(diagnostic) >= {f['threshold']:g}: sensitivity (non-diagnostic rejected) "
                  f"{_fmt(f['sensitivity_ci'])}, specificity (diagnostic kept) {_fmt(f['specificity_ci'])}, "
                  f"kept {_fmt(f['kept_fraction_ci'])}", ""]
    fa = summary["frame_accuracy"]
    lines += ["| frames | accuracy |", "|---|---|", f"| all | {_fmt(fa.get('all'))} |"]
    if "filter_kept" in fa:
        lines.append(f"| kept by the filter | {_fmt(fa['filter_kept'])} |")
    if "diagnostic_only" in fa:
        lines.append(f"| truly diagnostic (oracle) | {_fmt(fa['diagnostic_only'])} |")
    lines += ["", "| method / frames used | window accuracy | undecided | sequence accuracy | stable after (median, "
              "p90 s) |", "|---|---|---|---|---|"]
    for key, w in summary["window_accuracy"].items():
        st = summary["stability"][key].get("growing") or summary["stability"][key]["window"]
        med = "-" if st["median_s"] is None else f"{st['median_s']:.2f}, {st['p90_s']:.2f}"
        lines.append(f"| {key} | {_fmt(w)} | {w['undecided_fraction']:.3f} | "
                     f"{_fmt(summary['sequence_accuracy'][key])} | {med} |")
    return "\n".join(lines)


def _stability(times: list, final_correct: np.ndarray | None, fps: float, seq_pat: list, boot) -> dict[str, Any]:
    """Median / 90th percentile of the seconds to a stable decision, never-stable fraction, final accuracy."""
    t = np.array([np.nan if x is None else x for x in times], np.float64)
    ok = np.isfinite(t)
    res = {"median_s": float(np.median(t[ok])) if ok.any() else None,
           "p90_s": float(np.quantile(t[ok], 0.9)) if ok.any() else None,
           "undecided_fraction": float((~ok).mean())}
    if final_correct is not None:
        res["final_accuracy"] = boot(final_correct, np.asarray(seq_pat))
    return res


def _plot_accuracy_vs_window(summary: dict[str, Any], path: str) -> str:
    """Frame / window / sequence accuracy vs window seconds with interval bands -> ``path``."""
    from matplotlib.figure import Figure

    rows = summary["accuracy_vs_window"]["rows"]
    mode = summary["accuracy_vs_window"]["keep"]
    xs = np.array([r["window_s"] for r in rows])
    fig = Figure(figsize=(9.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"mean_score": "tab:blue", "vote": "tab:orange"}
    styles = {"mean_score": "o-", "vote": "s--"}
    for how in sq.AGGREGATORS:
        est = np.array([np.nan if r[how]["estimate"] is None else r[how]["estimate"] for r in rows], float)
        lo = np.array([np.nan if r[how]["ci_low"] is None else r[how]["ci_low"] for r in rows], float)
        hi = np.array([np.nan if r[how]["ci_high"] is None else r[how]["ci_high"] for r in rows], float)
        ax.plot(xs, est, styles[how], color=colors[how], ms=7 if how == "mean_score" else 5, label=f"window ({how})")
        ax.fill_between(xs, lo, hi, color=colors[how], alpha=0.12, label=f"95% interval ({how})")
    flat = [("frame (every frame)", summary["frame_accuracy"]["all"], "tab:gray", "--"),
            ("sequence (mean_score)", summary["sequence_accuracy"].get(f"mean_score/{mode}"), "tab:green", ":")]
    for name, r, col, ls in flat:
        if r and r["estimate"] is not None:
            ax.axhline(r["estimate"], color=col, ls=ls, label=f"{name}: {r['estimate']:.3f}")
            if r["ci_low"] is not None:
                ax.axhspan(r["ci_low"], r["ci_high"], color=col, alpha=0.05)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel(f"window length (s) at {summary['fps']:g} frames/s ({'causal' if summary['causal'] else 'centred'})")
    ax.set_ylabel("accuracy (95% patient-bootstrap band)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['split']} split, {summary['n_sequences']} sequences, {summary['n_patients']} patients; "
                 f"frames kept: {mode}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _plot_timelines(timelines: list[dict[str, Any]], frame: dict[str, np.ndarray], filt_keep: np.ndarray | None,
                    class_names, fps: float, window: int, path: str) -> str:
    """A few sequences: P(true class) per frame, the filter's rejections shaded, the windowed decision -> ``path``."""
    from matplotlib.figure import Figure

    pick = np.unique(np.linspace(0, len(timelines) - 1, min(4, len(timelines))).round().astype(int))
    timelines = [timelines[i] for i in pick]  # spread over patients (groups come patient by patient)
    k = max(len(timelines), 1)
    fig = Figure(figsize=(8.0, 1.9 * k + 0.6))
    for i, tl in enumerate(timelines):
        ax = fig.add_subplot(k, 1, i + 1)
        g = tl["g"]
        y = int(frame["label"][g[0]])
        t = np.arange(len(g)) / fps
        ax.plot(t, frame["probs"][g, y], "o-", ms=3, color="tab:blue", label="P(true class) per frame")
        right, undecided = tl["preds"] == y, tl["preds"] < 0
        wrong = ~right & ~undecided
        ax.scatter(t[right], np.full(right.sum(), 1.06), marker="s", s=14, color="tab:green",
                   label="window decision right")
        ax.scatter(t[wrong], np.full(wrong.sum(), 1.06), marker="x", s=18, color="tab:red",
                   label="window decision wrong")
        ax.scatter(t[undecided], np.full(undecided.sum(), 1.06), marker="o", s=14, facecolors="none",
                   edgecolors="0.3", label="undecided (no kept frame)")
        if filt_keep is not None:
            for j in np.flatnonzero(~filt_keep[g]):
                ax.axvspan(t[j] - 0.5 / fps, t[j] + 0.5 / fps, color="0.6", alpha=0.35,
                           label="rejected by the filter" if j == np.flatnonzero(~filt_keep[g])[0] else None)
        ax.set_ylim(-0.05, 1.15)
        ax.set_ylabel("P(true class)")
        ax.set_title(f"patient {frame['patients'][g[0]]}, true class {class_names[y]}, "
                     f"{len(g)} frames, window {window} frames", fontsize=9)
        if i == 0:
            ax.legend(loc="lower left", fontsize=7, ncol=2)
        if i == k - 1:
            ax.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path
