"""Streaming prediction: frames one at a time through filter, classifier and a saliency map, plus a causal window.

``StreamPredictor`` compiles ONE function per frame (batch 1, fixed shapes, compiled at construction):
frame filter forward -> P(diagnostic); classifier forward with the run's prediction policy (GEI
``cos(z, G_c)/tau``, or the linear head) -> probabilities and scores (GEI cosine scores, or
log-probabilities); the saliency map of the predicted class (``gradcam`` at the last stage, the run's
``sc`` maps, or none). A causal window of the last ``W`` frames is aggregated with
``evaluate.sequences.aggregate_window`` over the frames the filter keeps.

``predict_stream`` runs it over a video file or a folder of numbered frames and writes per-frame and
windowed predictions (CSV / JSON) and optionally the overlay video at the input's frame rate.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import explain
from lclsc_jax.data import FILTER_CLASSES, video
from lclsc_jax.data.augment import NORM_MEAN, NORM_STD
from lclsc_jax.evaluate import sequences, shortcuts
from lclsc_jax.explain import frame_overlay
from lclsc_jax.method.common import cosine_similarity
from lclsc_jax.train.config import Config, uses_gei

#: Saliency choices of the stream (``none``: no map).
STREAM_SALIENCY = ("gradcam", "sc", "none")
#: Frames used to measure the field of view of a stream (the first ones).
FOV_FRAMES = 8


def _dtype(cfg: Config) -> jnp.dtype:
    """The run's compute dtype."""
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def _normalize(x_u8: jax.Array) -> jax.Array:
    """uint8 ``(B, H, W, C)`` -> float32 model inputs, as ``data.normalize_images``."""
    x = x_u8.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
    return (x - jnp.float32(NORM_MEAN)) * jnp.float32(1.0 / NORM_STD)


def classify(model: Any, variables: Any, global_emb: jax.Array | None, cfg: Config,
             x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(probs (B, C), scores (B, C))`` of inputs ``x (B, H, W, C)`` with the run's policy.

    GEI (``config.uses_gei``): scores ``cos(z, G_c)``, probs ``softmax(scores / tau)``; linear head:
    probs ``softmax(logits)``, scores ``log(probs)``.
    """
    out = model.apply(variables, x.astype(_dtype(cfg)), train=False)
    if uses_gei(cfg):
        scores = cosine_similarity(out["embedding"].astype(jnp.float32), global_emb)
        return jax.nn.softmax(scores / cfg.loss.tau, axis=-1), scores
    logits = out["logits"].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1), jax.nn.log_softmax(logits, axis=-1)


class StreamPredictor:
    """Frame-by-frame prediction with a causal window; see the module docstring.

    Build with :meth:`from_runs` (a classifier run and an optional filter run) or directly from
    ``(model, variables, cfg, class_names)`` (e.g. untrained models for a latency benchmark).
    ``window``: frames in the causal window; ``aggregate``: ``mean_score`` or ``vote``;
    ``threshold``: a frame is kept when P(diagnostic) >= threshold (every frame without a filter).
    """

    def __init__(self, model: Any, variables: Any, cfg: Config, class_names: Sequence[str], *,
                 global_emb: Any = None, filter_model: Any = None, filter_variables: Any = None,
                 filter_cfg: Config | None = None, filter_global_emb: Any = None, saliency: str = "gradcam",
                 saliency_options: dict[str, Any] | None = None, window: int = 12, aggregate: str = "mean_score",
                 threshold: float = 0.5) -> None:
        if saliency not in STREAM_SALIENCY:
            raise ValueError(f"saliency must be one of {STREAM_SALIENCY}, got {saliency!r}")
        if aggregate not in sequences.AGGREGATORS:
            raise ValueError(f"aggregate must be one of {sequences.AGGREGATORS}, got {aggregate!r}")
        if window < 1:
            raise ValueError(f"the window needs at least 1 frame, got {window}")
        if uses_gei(cfg) and global_emb is None:
            raise ValueError("a GEI run (contrastive loss) needs its global class embeddings: pass global_emb=(C, D)")
        if (filter_model is None) != (filter_variables is None) or (filter_model is not None and filter_cfg is None):
            raise ValueError("a frame filter needs filter_model, filter_variables and filter_cfg together")
        if filter_cfg is not None:
            same = (filter_cfg.data.image_size, filter_cfg.data.channels) == (cfg.data.image_size, cfg.data.channels)
            if not same:
                raise ValueError(f"the filter takes {filter_cfg.data.image_size} px x {filter_cfg.data.channels} "
                                 f"channel(s), the classifier {cfg.data.image_size} px x {cfg.data.channels}: "
                                 "train them on the same image size and channels")
            if uses_gei(filter_cfg) and filter_global_emb is None:
                raise ValueError("a GEI filter run needs filter_global_emb")
        self.cfg, self.class_names = cfg, tuple(class_names)
        self.filter_cfg = filter_cfg
        self.has_filter = filter_model is not None
        self.saliency, self.window, self.aggregate, self.threshold = saliency, int(window), aggregate, float(threshold)
        self.image_shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
        opts = dict(saliency_options or ({"maps": cfg.loss.sc_maps} if saliency == "sc" else {}))
        dev = jax.devices()[0]  # batch 1: one device, not the whole (simulated) mesh
        self._args = jax.device_put((variables, global_emb, filter_variables, filter_global_emb), dev)
        self._fn = jax.jit(self._make_step(model, filter_model, opts))
        self.reset()
        self.step_raw(np.zeros(self.image_shape, np.uint8))  # compile now (warm-up), not on the first frame

    @classmethod
    def from_runs(cls, run: Any, filter_run: Any = None, **kwargs: Any) -> "StreamPredictor":
        """A predictor of a ``runs.TrainedRun`` and an optional filter run (``cfg.data.target == "diagnostic"``)."""
        if getattr(run.cfg.data, "target", "class") == "diagnostic":
            raise ValueError(f"{run.workdir} is a frame filter (data.target=diagnostic), not a tissue classifier")
        fkw: dict[str, Any] = {}
        if filter_run is not None:
            if getattr(filter_run.cfg.data, "target", "class") != "diagnostic" or \
                    tuple(filter_run.class_names) != tuple(FILTER_CLASSES):
                raise ValueError(f"{filter_run.workdir} is not a frame filter run (train one with "
                                 "--set data.target=diagnostic loss.name=ce)")
            fkw = {"filter_model": filter_run.model, "filter_variables": filter_run.variables,
                   "filter_cfg": filter_run.cfg, "filter_global_emb": filter_run.global_emb}
        method = kwargs.get("saliency", "gradcam")
        if method == "sc" and "saliency_options" not in kwargs:
            kwargs["saliency_options"] = run.saliency_options("sc")
        return cls(run.model, run.variables, run.cfg, run.class_names, global_emb=run.global_emb, **fkw, **kwargs)

    def _make_step(self, model: Any, filter_model: Any, opts: dict[str, Any]) -> Any:
        """The per-frame function ``(variables, G, filter variables, filter G, frame (1, H, W, C) uint8) -> dict``."""
        cfg, fcfg, method = self.cfg, self.filter_cfg, self.saliency

        def step(variables, global_emb, fvars, fg, frame_u8):
            x = _normalize(frame_u8)
            probs, scores = classify(model, variables, global_emb, cfg, x)
            out = {"probs": probs[0], "scores": scores[0]}
            if filter_model is not None:
                out["p_diagnostic"] = classify(filter_model, fvars, fg, fcfg, x)[0][0, 1]
            if method != "none":
                smap = explain.saliency(method, model, variables, x, None, "last", global_emb=global_emb,
                                        tau=cfg.loss.tau, jit=False, **opts)
                out["map"] = smap[0]
            return out

        return step

    def reset(self) -> None:
        """Forget the window and the history (a new sequence)."""
        self._recent: collections.deque = collections.deque(maxlen=self.window)
        self.history: dict[str, list] = {"scores": [], "probs": [], "keep": []}

    def step_raw(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        """The compiled per-frame outputs of one uint8 frame ``(H, W, C)``: host ``probs (C,)``, ``scores (C,)``,
        ``p_diagnostic ()`` (with a filter), ``map (H, W)`` (with saliency); no window update."""
        f = np.asarray(frame)
        if f.shape != self.image_shape or f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 {self.image_shape}, got {f.dtype} {f.shape}")
        out = self._fn(*self._args, f[None])
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def window_probs(self, agg: np.ndarray) -> np.ndarray:
        """Window scores ``(C,)`` -> window probabilities ``(C,)``: the vote itself, or the softmax of the mean score
        (``/ tau`` for GEI cosine scores; mean log-probabilities for a linear head); NaN when undecided."""
        if np.isnan(agg).all():
            return np.full_like(agg, np.nan)
        if self.aggregate == "vote":
            return agg
        z = agg / self.cfg.loss.tau if uses_gei(self.cfg) else agg
        e = np.exp(z - z.max())
        return e / e.sum()

    def __call__(self, frame: np.ndarray) -> dict[str, Any]:
        """Process one frame ``(H, W, C)`` uint8: its outputs (:meth:`step_raw`) plus ``kept``, ``window_scores (C,)``,
        ``window_decision`` (-1: no kept frame in the window), ``window_probs (C,)`` and ``latency_ms``."""
        t0 = time.perf_counter()
        out = self.step_raw(frame)
        kept = bool(out["p_diagnostic"] >= self.threshold) if self.has_filter else True
        self._recent.append((out["scores"], out["probs"], kept))
        s, p, k = (np.stack([r[i] for r in self._recent]) for i in range(3))
        agg = sequences.aggregate_window(s, p, k, how=self.aggregate)
        for key, v in (("scores", out["scores"]), ("probs", out["probs"]), ("keep", kept)):
            self.history[key].append(v)
        out.update(kept=kept, window_scores=agg, window_decision=int(sequences.decisions(agg)),
                   window_probs=self.window_probs(agg), latency_ms=1e3 * (time.perf_counter() - t0))
        return out

    def sequence_decision(self) -> tuple[int, np.ndarray]:
        """``(decision, probabilities (C,))`` over every kept frame so far (-1 and NaN when none was kept)."""
        if not self.history["keep"]:
            return -1, np.full(len(self.class_names), np.nan)
        agg = sequences.aggregate_window(np.stack(self.history["scores"]), np.stack(self.history["probs"]),
                                         np.asarray(self.history["keep"]), how=self.aggregate)
        return int(sequences.decisions(agg)), self.window_probs(agg)


def window_frames(window_s: float, fps: float) -> int:
    """Frames in a window of ``window_s`` seconds at ``fps``: ``max(1, round(window_s * fps))``."""
    if not window_s > 0:
        raise ValueError(f"the window must be > 0 s, got {window_s}")
    return max(1, int(round(window_s * fps)))


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the per-frame CSV of :func:`predict_stream`."""
    return (["frame", "name", "time_s", "diagnostic_prob", "kept", "class", "confidence"]
            + [f"p_{c}" for c in class_names] + ["window_class", "window_confidence", "latency_ms"])


def _row(k: int, name: str, fps: float, out: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """The per-frame record (JSON types; NaN as None)."""
    probs, wd = out["probs"], out["window_decision"]
    row: dict[str, Any] = {
        "frame": k, "name": name, "time_s": round(k / fps, 6),
        "diagnostic_prob": float(out["p_diagnostic"]) if "p_diagnostic" in out else None,
        "kept": bool(out["kept"]), "class": class_names[int(probs.argmax())], "confidence": float(probs.max())}
    row.update({f"p_{c}": float(v) for c, v in zip(class_names, probs)})
    row.update(window_class=class_names[wd] if wd >= 0 else None,
               window_confidence=float(out["window_probs"][wd]) if wd >= 0 else None,
               latency_ms=round(float(out["latency_ms"]), 3))
    return row


def _percentile(x: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else None


def _write_csv(path: str, rows: list[dict[str, Any]], class_names: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_columns(class_names))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def predict_stream(workdir: str, source: str, *, filter_workdir: str | None = None, window_s: float = 1.0,
                   fps: float | None = None, aggregate: str = "mean_score", threshold: float = 0.5,
                   saliency: str = "gradcam", out_csv: str | None = None, out_json: str | None = None,
                   overlay: str | None = None, progress: bool = True, which: str = "best",
                   overlay_scale: int | None = None) -> dict[str, Any]:
    """Per-frame and causal-window predictions of a run on a video file or a folder of numbered frames.

    Per frame a row ``{frame, name, time_s, diagnostic_prob, kept, class, confidence, p_<class>...,
    window_class, window_confidence, latency_ms}``; ``out_csv`` / ``out_json`` write them (the JSON also
    has ``fps``, ``window`` (seconds, frames, aggregate, threshold), ``classes`` and ``summary``: the
    sequence-level decision over all kept frames, the fraction kept and the latency p50/p99).
    ``overlay``: an MP4 of the frames with the saliency heat map inside the field of view, the class,
    the confidence, the windowed decision and the non-diagnostic flag, at the input's frame rate.
    Returns ``{"fps", "window", "classes", "frames": rows, "summary", "files"}``.
    """
    from lclsc_jax.protocols import runs

    if saliency not in STREAM_SALIENCY:
        raise ValueError(f"saliency must be one of {STREAM_SALIENCY}, got {saliency!r}")
    if overlay is not None and not video.is_video(overlay):
        raise ValueError(f"--overlay {overlay}: the overlay is a video file, name it .mp4")
    video.check_source(source)  # a bad input fails before any model loads
    run = runs.load_run(workdir, which)
    filter_run = runs.load_run(filter_workdir, which) if filter_workdir else None
    stream = video.read_frames(source, run.cfg.data.image_size, run.cfg.data.channels, fps=fps)
    n_window = window_frames(window_s, stream.fps)
    predictor = StreamPredictor.from_runs(run, filter_run, saliency=saliency, window=n_window,
                                          aggregate=aggregate, threshold=threshold)
    classes = run.class_names
    scale = overlay_scale or max(1, 256 // run.cfg.data.image_size)
    writer = video.VideoWriter(overlay, stream.fps) if overlay else None
    rows: list[dict[str, Any]] = []
    seen: list[np.ndarray] = []
    fov = None
    t_start = time.perf_counter()
    try:
        for k, frame in enumerate(stream):
            out = predictor(frame)
            name = os.path.basename(stream.names[k]) if k < len(stream.names) else f"frame_{k:06d}"
            row = _row(k, name, stream.fps, out, classes)
            rows.append(row)
            if writer is not None:
                if len(seen) < FOV_FRAMES:  # the field of view of the first frames, then fixed
                    seen.append(frame)
                    fov = shortcuts.fov_or_none(np.stack(seen))
                writer.write(frame_overlay.overlay_frame(
                    frame, out.get("map"), fov, label=row["class"], confidence=row["confidence"],
                    diagnostic=row["kept"] if predictor.has_filter else None, window_label=row["window_class"],
                    scale=scale, time_s=row["time_s"]))
            if progress and (k + 1) % max(1, int(round(stream.fps * 5))) == 0:
                total = f"/{stream.n_frames}" if stream.n_frames else ""
                print(f"[predict] frame {k + 1}{total}  {row['latency_ms']:.1f} ms/frame  window: "
                      f"{row['window_class'] or 'undecided'}", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()
    if not rows:
        raise video.DataError(f"{source}: no frames could be read")
    decision, seq_probs = predictor.sequence_decision()
    lat = [r["latency_ms"] for r in rows]
    kept = [r["kept"] for r in rows]
    summary = {
        "frames": len(rows), "kept": int(sum(kept)), "kept_fraction": float(np.mean(kept)),
        "decision": classes[decision] if decision >= 0 else None,
        "confidence": float(seq_probs[decision]) if decision >= 0 else None,
        "probabilities": {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, seq_probs)},
        "latency_ms_p50": _percentile(lat, 50), "latency_ms_p99": _percentile(lat, 99),
        "latency_ms_max": float(max(lat)), "wall_s": time.perf_counter() - t_start,
        "saliency": saliency, "filter": filter_workdir, "source": str(source), "workdir": workdir,
    }
    result = {"fps": stream.fps, "window": {"seconds": window_s, "frames": n_window, "aggregate": aggregate,
                                            "threshold": threshold if filter_run is not None else None},
              "classes": list(classes), "frames": rows, "summary": summary, "files": []}
    if out_csv:
        _write_csv(out_csv, rows, classes)
        result["files"].append(out_csv)
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "files"}, f, indent=1)
        result["files"].append(out_json)
    if overlay:
        result["files"].append(overlay)
    return result
