"""Sanity checks for saliency maps (Adebayo et al. 2018) on a trained run: model and label randomisation.

A saliency method explains a model only if its maps depend on what the model learnt. Three tests:

* **Cascading model randomisation.** From the top (the heads: projection head, linear ``fc``, and
  for LCL-SC runs the GEI class embeddings ``global_emb``) down through the backbone's stages
  (``model.stage_names``, last to first), one more block of parameters is re-initialised at each
  step; every method's maps are recomputed on the same test images.
* **Independent model randomisation.** One block at a time is re-initialised, the rest trained.
* **Label randomisation** (optional: it trains a run). The same config trained on labels
  shuffled across the training frames; its maps are compared with the real model's.

Re-initialised parameters are drawn from the model's own initialisers (``model.init`` with
another key: fresh parameters of the same tree). A re-initialised block gets its **BatchNorm
running statistics reset** to their initial values (mean 0, variance 1) too: the trained
statistics describe the trained convolutions' outputs, and pairing them with random weights
would be neither the trained nor an untrained network. Trained blocks keep their statistics.
GEI class embeddings are re-drawn as random unit vectors (their initial value, zeros, is no
class embedding at all).

Each randomised map is compared with the original map of the same image by
``evaluate.similarity``: Spearman rank correlation of the absolute and of the signed raw maps
(``normalize=False``), SSIM and HOG similarity of the maps as shown (in [0, 1]); per image, then
mean and sd. Targets are the images' true labels, the same at every step. A method **passes** the
model-randomisation test when the mean Spearman(abs) after the full cascade is below
``threshold`` (0.5 by default): maps that stay similar once the whole network is random show the
image (edges), not the model. Writes ``sanity.json``, ``sanity.csv``, ``sanity.md``, one
``cascade_<method>.png`` per method and ``similarity.png``. See docs/sanity.md.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax import explain
from lclsc_jax.data import Dataset, normalize_images
from lclsc_jax.evaluate.similarity import SIMILARITIES, map_similarities, summarize
from lclsc_jax.explain import registry
from lclsc_jax.protocols import runs
from lclsc_jax.protocols.cam_benchmark import select_images
from lclsc_jax.train import loop
from lclsc_jax.train.reporting import log

__all__ = [
    "DEFAULT_THRESHOLD",
    "HEAD_BLOCK",
    "ShuffledLabelSource",
    "Variant",
    "default_methods",
    "fresh_variables",
    "model_variants",
    "parameter_blocks",
    "random_class_embeddings",
    "randomize_blocks",
    "sanity_checks",
    "shuffled_label_dataset",
]

#: Mean Spearman(abs) after the full cascade below which a method passes.
DEFAULT_THRESHOLD = 0.5
#: The top block: the heads (and the GEI class embeddings of LCL-SC runs).
HEAD_BLOCK = "head"
HEAD_MODULES = ("head", "fc")
LABEL_RUN = "label_randomization"
_INIT_SALT = 0x5A17
_GEI_SALT = 0x6E1
_LABEL_SALT = 0x1AB
_RESNET_LAYER = re.compile(r"layer(\d+)_\d+")
_RESNET_STEM = ("conv1", "bn1")


# ---- parameter blocks and randomised variables ----

def _module_block(name: str, stage_names: Sequence[str]) -> str:
    """The block of a top-level module: ``head`` for the heads, else the stage it belongs to."""
    if name in HEAD_MODULES:
        return HEAD_BLOCK
    for s in stage_names:
        if name == s or name.startswith(s + "_"):  # tiny: stem_conv, stage3_bn, ...
            return s
    m = _RESNET_LAYER.fullmatch(name)  # torchvision layout: layerK_j is stageK
    if m and f"stage{m.group(1)}" in stage_names:
        return f"stage{m.group(1)}"
    if name in _RESNET_STEM and "stem" in stage_names:
        return "stem"
    raise ValueError(f"cannot place the parameter module {name!r} in a block (heads {HEAD_MODULES} or stages "
                     f"{tuple(stage_names)})")


def parameter_blocks(model: Any, variables: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(block, top-level module names)]`` from the top: ``head``, then the stages last to first."""
    names = sorted(set().union(*(set(variables[c]) for c in variables)))
    stages = tuple(model.stage_names)
    members: dict[str, list[str]] = {HEAD_BLOCK: [], **{s: [] for s in stages}}
    for n in names:
        members[_module_block(n, stages)].append(n)
    order = [HEAD_BLOCK, *reversed(stages)]
    return [(b, tuple(members[b])) for b in order if members[b]]


def fresh_variables(model: Any, image_shape: Sequence[int], seed: int) -> dict[str, Any]:
    """Freshly initialised variables of ``model`` (its own initialisers, key from ``seed``), on the host."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _INIT_SALT)
    return jax.device_get(model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))


def random_class_embeddings(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors ``(C, D)`` float32: re-drawn GEI class embeddings."""
    g = np.random.default_rng([seed, _GEI_SALT]).standard_normal((num_classes, dim))
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def randomize_blocks(variables: Mapping[str, Any], fresh: Mapping[str, Any],
                     modules: Sequence[str]) -> dict[str, Any]:
    """``variables`` with the top-level ``modules`` of every collection (params and BN statistics) from ``fresh``."""
    chosen = set(modules)
    return {c: {k: (fresh[c][k] if k in chosen else v) for k, v in variables[c].items()} for c in variables}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the tests: ``test`` (original/cascade/independent), its ``block``, step and randomised blocks."""

    test: str
    block: str
    step: int
    randomized: tuple[str, ...]
    variables: dict[str, Any]
    global_emb: np.ndarray | None


def model_variants(model: Any, variables: Mapping[str, Any], global_emb: np.ndarray | None,
                   fresh: Mapping[str, Any], fresh_emb: np.ndarray | None) -> list[Variant]:
    """The original, every cascade step (top down, one more block each) and every block randomised alone."""
    blocks = parameter_blocks(model, variables)
    modules = dict(blocks)

    def make(test: str, block: str, step: int, randomized: tuple[str, ...]) -> Variant:
        mods = [m for b in randomized for m in modules[b]]
        emb = fresh_emb if (HEAD_BLOCK in randomized and global_emb is not None) else global_emb
        return Variant(test, block, step, randomized, randomize_blocks(variables, fresh, mods), emb)

    out = [make("original", "-", 0, ())]
    names = [b for b, _ in blocks]
    out += [make("cascade", b, i + 1, tuple(names[:i + 1])) for i, b in enumerate(names)]
    out += [make("independent", b, i + 1, (b,)) for i, b in enumerate(names)]
    return out


# ---- label randomisation ----

class ShuffledLabelSource:
    """A record source whose ``label`` fields come from ``labels (N,)``; images, masks, patients unchanged."""

    def __init__(self, source: Any, labels: np.ndarray):
        self._src = source
        self._labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self._src)

    def _relabel(self, i: int, ex: dict) -> dict:
        """Record ``ex`` of index ``i`` with its new label."""
        return {**ex, "label": int(self._labels[int(i)])}

    def __getitem__(self, i: int) -> dict:
        return self._relabel(i, self._src[int(i)])

    def __getitems__(self, idx: Sequence[int]) -> list[dict]:
        """Batched read, as the wrapped source's."""
        idx = [int(i) for i in idx]
        return [self._relabel(i, ex) for i, ex in zip(idx, self._src.__getitems__(idx))]

    def __repr__(self) -> str:
        return f"ShuffledLabelSource({self._src!r})"


def shuffled_label_dataset(ds: Dataset, train_indices: np.ndarray, seed: int) -> Dataset:
    """``ds`` with the labels of ``train_indices`` permuted among themselves (class counts kept); others unchanged."""
    labels = np.asarray(ds.labels).copy()
    idx = np.asarray(train_indices, np.int64)
    labels[idx] = labels[idx][np.random.default_rng([seed, _LABEL_SALT]).permutation(len(idx))]
    return dataclasses.replace(ds, source=ShuffledLabelSource(ds.source, labels), labels=labels.astype(np.int32))


# ---- maps ----

def default_methods(has_gei: bool) -> tuple[str, ...]:
    """``sc`` (contrastive runs only) and every CAM of the registry (``explain.STAGE_METHODS``)."""
    return (("sc",) if has_gei else ()) + tuple(registry.STAGE_METHODS)


def _maps(model: Any, variables: Any, global_emb: Any, tau: float, method: str, stage: str, x: np.ndarray,
          targets: np.ndarray, batch_size: int, normalize: bool, options: Mapping[str, Any]) -> np.ndarray:
    """Maps ``(N, H, W)`` of ``x (N, H, W, C)`` in fixed-size (padded) batches; ``normalize=False``: raw."""
    return explain.saliency_batched(method, model, variables, x, targets, batch_size=batch_size, stage=stage,
                                    normalize=normalize, global_emb=global_emb, tau=tau, **options)


def _stats(shown0: np.ndarray, raw0: np.ndarray, shown: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    """Mean/sd/n of every similarity of (shown, raw) against the original (shown0, raw0), plus flat-map count."""
    per = map_similarities(shown0, shown, raw0, raw)
    row: dict[str, Any] = {"n_images": int(len(shown)), "n_flat": int(np.sum(np.ptp(shown.reshape(len(shown), -1),
                                                                                  axis=1) == 0))}
    for k in SIMILARITIES:
        s = summarize(per[k])
        row[f"{k}_mean"], row[f"{k}_sd"] = s["mean"], s["sd"]
    row["per_image"] = {k: [float(v) for v in per[k]] for k in SIMILARITIES}
    return row


# ---- output ----

COLUMNS = ["method", "stage", "test", "step", "block", "randomized", "n_images", "n_flat",
           *[f"{k}_{s}" for k in SIMILARITIES for s in ("mean", "sd")]]
_LABELS = {"spearman_abs": "Spearman (abs)", "spearman_signed": "Spearman (signed)", "ssim": "SSIM", "hog": "HOG"}


def _file_stem(method: str) -> str:
    """A file-name-safe form of a method name (``gradcam++`` -> ``gradcam_pp``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", method.replace("++", "_pp").replace("+", "_p"))


def _cell(row: Mapping[str, Any], k: str) -> str:
    """A table cell ``mean ± sd`` of measure ``k``."""
    return f"{row[f'{k}_mean']:.3f} ± {row[f'{k}_sd']:.3f}"


def _verdicts(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], threshold: float) -> dict[str, Any]:
    """Per method: Spearman(abs) after the full cascade, the first step below ``threshold``, pass/fail."""
    out: dict[str, Any] = {}
    for m in methods:
        casc = sorted((r for r in rows if r["method"] == m and r["test"] == "cascade"), key=lambda r: r["step"])
        if not casc:
            continue
        below = [r for r in casc if r["spearman_abs_mean"] < threshold]
        full = casc[-1]["spearman_abs_mean"]
        lab = next((r for r in rows if r["method"] == m and r["test"] == LABEL_RUN), None)
        out[m] = {"spearman_abs_full_cascade": full, "passed": bool(full < threshold),
                  "first_step_below": below[0]["step"] if below else None,
                  "first_block_below": below[0]["block"] if below else None,
                  "label_randomization_spearman_abs": lab["spearman_abs_mean"] if lab else None,
                  "label_randomization_passed": bool(lab["spearman_abs_mean"] < threshold) if lab else None}
    return out


def _write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """``sanity.csv``: ``COLUMNS`` of every row (per-image values stay in the JSON)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "randomized": "+".join(r["randomized"])})


def _markdown(summary: Mapping[str, Any]) -> str:
    """The report: settings, verdicts, the cascade per method, independent blocks, label randomisation."""
    s, rows, t = summary, summary["rows"], summary["threshold"]
    metric_head = " | ".join(_LABELS[k] for k in SIMILARITIES)
    lines = [
        "# Saliency sanity checks (Adebayo et al. 2018)", "",
        f"Run `{s['workdir']}` (checkpoint step {s['checkpoint_step']}), {s['n_images']} images of split "
        f"`{s['split']}` explained for their true labels, stage `{s['stage']}`, randomisation seed {s['seed']}.",
        "Randomised blocks are re-drawn from the model's own initialisers; their BatchNorm running statistics are "
        "reset to the initial values (mean 0, variance 1); GEI class embeddings (part of the `head` block) are "
        "re-drawn as random unit vectors. Similarity to the original maps: Spearman rank correlation of the raw "
        "maps' absolute values and of the signed raw maps, SSIM and HOG similarity of the shown maps in [0, 1]; "
        "mean ± sd over images. `flat`: randomised maps with no variation (all zero); a flat map has "
        "similarity 0 with a varying one.", "",
        f"**Verdict:** a method passes when the mean Spearman (abs) after the full cascade is below {t}; maps "
        "that stay similar once the whole network is random show the image, not the model.", "",
        "## Verdicts", "",
        "| method | Spearman (abs), full cascade | first step below threshold | model randomisation |"
        + (" label randomisation Spearman (abs) |" if s.get("label_randomization") else ""),
        "|---|---|---|---|" + ("---|" if s.get("label_randomization") else "")]
    for m, v in s["verdicts"].items():
        first = f"{v['first_step_below']} (+{v['first_block_below']})" if v["first_step_below"] else "never"
        line = (f"| {m} | {v['spearman_abs_full_cascade']:.3f} | {first} | "
                f"{'**pass**' if v['passed'] else '**FAIL**'} |")
        if s.get("label_randomization"):
            lr = v["label_randomization_spearman_abs"]
            line += " – |" if lr is None else f" {lr:.3f} ({'pass' if v['label_randomization_passed'] else 'FAIL'}) |"
        lines.append(line)
    lines += ["", "## Cascading randomisation (top down)", ""]
    for m in s["methods"]:
        casc = [r for r in rows if r["method"] == m and r["test"] in ("original", "cascade")]
        if not casc:
            continue
        lines += [f"### {m} (stage {casc[0]['stage']})", "", f"| step | randomised | {metric_head} | flat |",
                  "|---|---|" + "---|" * len(SIMILARITIES) + "---|"]
        for r in casc:
            lines.append(f"| {r['step']} | {'+'.join(r['randomized']) or 'none (original)'} | "
                         + " | ".join(_cell(r, k) for k in SIMILARITIES) + f" | {r['n_flat']} |")
        lines.append("")
    lines += ["## Independent randomisation (one block at a time)", "",
              f"| method | block | {metric_head} | flat |", "|---|---|" + "---|" * len(SIMILARITIES) + "---|"]
    lines += [f"| {r['method']} | {r['block']} | " + " | ".join(_cell(r, k) for k in SIMILARITIES)
              + f" | {r['n_flat']} |" for r in rows if r["test"] == "independent"]
    lr = s.get("label_randomization")
    if lr:
        lines += ["", "## Label randomisation", "",
                  f"The run's config trained on labels shuffled across its {lr['n_train']} training frames "
                  f"(`{lr['workdir']}`, last checkpoint, step {lr['checkpoint_step']}).", "",
                  f"| model | accuracy on its training labels | held-out accuracy (`{lr['heldout_split']}`, "
                  "true labels) |",
                  "|---|---|---|",
                  f"| shuffled labels | {lr['train_accuracy_shuffled']:.3f} "
                  f"(true labels: {lr['train_accuracy_true']:.3f}) "
                  f"| {lr['heldout_accuracy']:.3f} |",
                  f"| real labels | {lr['original_train_accuracy']:.3f} | {lr['original_heldout_accuracy']:.3f} |", "",
                  f"Chance: {lr['chance_uniform']:.3f} (uniform), {lr['chance_majority']:.3f} (majority class of the "
                  "held-out frames). A model that did not fit its shuffled labels makes this test weak: its maps "
                  "then differ from the real model's for lack of training, not because of the labels.", "",
                  f"| method | {metric_head} | flat |", "|---|" + "---|" * len(SIMILARITIES) + "---|"]
        lines += [f"| {r['method']} | " + " | ".join(_cell(r, k) for k in SIMILARITIES) + f" | {r['n_flat']} |"
                  for r in rows if r["test"] == LABEL_RUN]
    if s.get("errors"):
        lines += ["", "## Errors", ""] + [f"- `{m}`: {e}" for m, e in s["errors"].items()]
    return "\n".join(lines) + "\n"


def _cascade_figure(display: np.ndarray, titles: Sequence[str], columns: Sequence[tuple[str, np.ndarray]],
                    method: str, path: str) -> str:
    """Rows = images, columns = the image, then the method's map at each cascade step (jet, [0, 1])."""
    n, ncol = len(display), 1 + len(columns)
    fig = Figure(figsize=(1.35 * ncol, 1.35 * n + 0.5))
    axes = fig.subplots(n, ncol, squeeze=False)
    for i in range(n):
        img = display[i, ..., 0] if display.shape[-1] == 1 else display[i, ..., :3]
        axes[i, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
        axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for j, (label, maps) in enumerate(columns, start=1):
            axes[i, j].imshow(maps[i], cmap="jet", vmin=0.0, vmax=1.0)
            if i == 0:
                axes[i, j].set_title(label, fontsize=7)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{method}: cascading randomisation, top down", fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


def _similarity_figure(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], threshold: float, path: str) -> str:
    """One panel per similarity: mean against the cascade step, one line per method (± sd band for <= 3 methods)."""
    fig = Figure(figsize=(9.0, 6.4))
    axes = fig.subplots(2, 2).ravel()
    colors = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    for ax, k in zip(axes, SIMILARITIES):
        ticks: list[str] = []
        for mi, m in enumerate(methods):
            casc = sorted((r for r in rows if r["method"] == m and r["test"] in ("original", "cascade")),
                          key=lambda r: r["step"])
            if not casc:
                continue
            steps = np.asarray([r["step"] for r in casc])
            mean = np.asarray([r[f"{k}_mean"] for r in casc])
            sd = np.asarray([r[f"{k}_sd"] for r in casc])
            color = colors[mi % len(colors)]
            ax.plot(steps, mean, marker="o", ms=3, lw=1.2, label=m, color=color)
            if len(methods) <= 3:  # sd bands only while they stay readable
                ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.12, lw=0)
            ticks = ["original" if r["step"] == 0 else f"+{r['block']}" for r in casc]
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30, fontsize=7)
        ax.set_title(_LABELS[k], fontsize=9)
        ax.axhline(0.0, color="grey", lw=0.6)
        if k == "spearman_abs":
            ax.axhline(threshold, color="red", lw=0.8, ls="--", label=f"threshold {threshold}")
        ax.set_ylim(-1.05, 1.05)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Similarity to the original maps under cascading randomisation", fontsize=10)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


# ---- the protocol ----

def _figure_picks(labels: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` positions for the figures: the first image of each class in turn, then evenly spaced others."""
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:k]
    rest = [i for i in range(len(labels)) if i not in first]
    step = max(1, len(rest) // max(1, k - len(first)))
    return np.asarray(sorted(first + rest[::step][:k - len(first)]), np.int64)


def _check_methods(methods: Sequence[str], has_gei: bool) -> list[str]:
    """Known, deduplicated method names; ``sc`` only on contrastive runs (one-line ``ValueError`` otherwise)."""
    out = []
    for m in dict.fromkeys(methods):
        registry.get(m)  # unknown name: ValueError with the closest names
        if m == "sc" and not has_gei:
            raise ValueError("method 'sc' needs a contrastive (GEI) run; this run has a linear head")
        out.append(m)
    if not out:
        raise ValueError("no saliency method given")
    return out


def _label_randomization(run: runs.TrainedRun, ds: Dataset, splits: Mapping[str, np.ndarray], workdir: str,
                         seed: int, progress: bool) -> tuple[runs.TrainedRun, dict[str, Any]]:
    """Train (or resume) the run's config on shuffled training labels in ``workdir``; its accuracies."""
    train_idx = np.asarray(splits["train"], np.int64)
    shuffled = shuffled_label_dataset(ds, train_idx, seed)
    log(f"[sanity] label randomisation: training {run.cfg.train.steps} steps on shuffled labels in {workdir}", progress)
    loop.train(run.cfg, workdir, dataset=shuffled, splits={k: np.asarray(v) for k, v in splits.items()},
               progress=progress)
    rr = runs.load_run(workdir, "latest")  # "best" would select by validation accuracy on the true labels
    held = "test" if len(splits.get("test", ())) else "val"
    held_idx = np.asarray(splits[held], np.int64)

    def acc(r: runs.TrainedRun, d: Dataset, idx: np.ndarray) -> float:
        p = runs.predict(r, d, idx)
        return float(np.mean(np.asarray(p["probs"]).argmax(-1) == np.asarray(p["label"])))

    y_held = np.asarray(ds.labels)[held_idx]
    info = {"workdir": workdir, "checkpoint_step": rr.step, "n_train": int(len(train_idx)),
            "fraction_relabelled": float(np.mean(np.asarray(shuffled.labels)[train_idx]
                                                 != np.asarray(ds.labels)[train_idx])),
            "train_accuracy_shuffled": acc(rr, shuffled, train_idx), "train_accuracy_true": acc(rr, ds, train_idx),
            "heldout_split": held, "heldout_accuracy": acc(rr, ds, held_idx),
            "original_train_accuracy": acc(run, ds, train_idx), "original_heldout_accuracy": acc(run, ds, held_idx),
            "chance_uniform": 1.0 / len(run.class_names),
            "chance_majority": float(np.bincount(y_held).max() / len(y_held))}
    log(f"[sanity] shuffled-label model: accuracy {info['train_accuracy_shuffled']:.3f} on its training labels, "
        f"{info['heldout_accuracy']:.3f} held out (chance {info['chance_uniform']:.3f})", progress)
    return rr, info


def sanity_checks(workdir: str, methods: Sequence[str] | None = None, stage: str = "last", split: str = "test",
                  max_images: int = 16, out_dir: str | None = None, *, which: str = "best", seed: int = 0,
                  label_randomization: bool = False, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16,
                  figure_images: int = 4, progress: bool = True) -> dict[str, Any]:
    """Model (cascading, independent) and optionally label randomisation tests of a run; returns the summary.

    ``methods`` default: ``sc`` (contrastive runs) and every CAM of the registry; ``stage``: a stage
    name or ``last`` (``sc`` is always at the last stage, input-level methods ignore it). Up to
    ``max_images`` images of ``split`` (evenly spaced) are explained for their true labels.
    ``seed`` draws the fresh parameters, GEI embeddings and the label permutation. Writes
    ``sanity.json``, ``.csv``, ``.md``, ``cascade_<method>.png`` and ``similarity.png`` into
    ``out_dir`` (default ``WORKDIR/sanity``); the label-randomised run trains in ``OUT/label_randomization``.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if methods is not None:
        for m in methods:
            registry.get(m)  # a typo fails before the run is loaded
    run = runs.load_run(workdir, which)
    model = run.model
    stage = model.last_stage if stage == "last" else stage
    if stage not in model.stage_names:
        raise ValueError(f"unknown stage {stage!r}; this model has {tuple(model.stage_names)} (or 'last')")
    has_gei = run.global_emb is not None
    methods = _check_methods(list(methods) if methods else default_methods(has_gei), has_gei)
    ds = loop.load_dataset(run.cfg)
    splits = runs.run_splits(workdir, run.cfg, ds)
    indices = runs.split_indices(split, splits, len(ds.labels))
    idx = select_images(indices, max_images)
    recs = [ds.source[int(i)] for i in idx]
    images = np.stack([r["image"] for r in recs])
    targets = np.asarray([int(r["label"]) for r in recs], np.int32)
    x = normalize_images(images)
    bs = min(batch_size, len(x))
    out_dir = out_dir or os.path.join(workdir, "sanity")
    os.makedirs(out_dir, exist_ok=True)

    variables = jax.device_get(run.variables)
    emb = None if not has_gei else np.asarray(jax.device_get(run.global_emb), np.float32)
    fresh = fresh_variables(model, x.shape[1:], seed)
    fresh_emb = None if emb is None else random_class_embeddings(*emb.shape, seed=seed)
    variants = model_variants(model, variables, emb, fresh, fresh_emb)
    blocks = parameter_blocks(model, variables)
    label_variant = None
    label_info = None
    if label_randomization:
        rr, label_info = _label_randomization(run, ds, splits, os.path.join(out_dir, LABEL_RUN), seed, progress)
        label_variant = Variant(LABEL_RUN, "-", 0, (), jax.device_get(rr.variables),
                                None if rr.global_emb is None else np.asarray(jax.device_get(rr.global_emb)))

    picks = _figure_picks(targets, figure_images)
    display = images[picks].astype(np.float32) / 255.0
    titles = [f"{ds.patients[idx[p]]} {run.class_names[targets[p]]}" for p in picks]
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    figures: list[str] = []
    for m in methods:
        m_stage = model.last_stage if m == "sc" else ("input" if m in registry.INPUT_METHODS else stage)
        options = run.saliency_options(m)  # the run's own SC maps (loss.sc_maps)
        t0 = time.time()
        try:
            cache: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

            def maps_of(v: Variant) -> tuple[np.ndarray, np.ndarray]:
                key = (v.test,) if v.test == LABEL_RUN else v.randomized
                if key not in cache:
                    cache[key] = tuple(_maps(model, v.variables, v.global_emb, run.cfg.loss.tau, m,
                                             model.last_stage if m_stage == "input" else m_stage, x, targets, bs, nz,
                                             options)
                                       for nz in (True, False))
                return cache[key]

            shown0, raw0 = maps_of(variants[0])
            fig_cols = [("original", shown0[picks])]
            for v in variants + ([label_variant] if label_variant is not None else []):
                shown, raw = maps_of(v)
                rows.append({"method": m, "stage": m_stage, "test": v.test, "step": v.step, "block": v.block,
                             "randomized": list(v.randomized), **_stats(shown0, raw0, shown, raw)})
                if v.test == "cascade":
                    fig_cols.append((f"+{v.block}", shown[picks]))
            casc = [r for r in rows if r["method"] == m and r["test"] == "cascade"]
            log(f"[sanity] {m:<20} {m_stage:<7} Spearman(abs) by cascade step: "
                + " ".join(f"{r['spearman_abs_mean']:.2f}" for r in casc) + f"  ({time.time() - t0:.1f} s)", progress)
            if len(picks):
                figures.append(_cascade_figure(display, titles, fig_cols, m,
                                               os.path.join(out_dir, f"cascade_{_file_stem(m)}.png")))
        except Exception as e:  # noqa: BLE001 - a failing method is a report entry, not a crash
            msg = str(e).strip().splitlines()
            errors[m] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
            log(f"[sanity] {m:<20} ERROR {errors[m]}", progress)
    done = [m for m in methods if m not in errors]
    if done:
        figures.append(_similarity_figure(rows, done, threshold, os.path.join(out_dir, "similarity.png")))
    summary = {"workdir": workdir, "checkpoint_step": run.step, "split": split, "indices": idx.tolist(),
               "n_images": int(len(idx)), "stage": stage, "methods": done, "seed": seed, "threshold": threshold,
               "targets": "true labels",
               "batch_norm_statistics": "reset to initial values (mean 0, variance 1) in randomised blocks",
               "blocks": [{"block": b, "modules": list(mods)} for b, mods in blocks],
               "gei_in_head_block": has_gei, "verdicts": _verdicts(rows, done, threshold),
               "label_randomization": label_info, "errors": errors, "rows": rows,
               "figures": [os.path.basename(p) for p in figures]}
    loop.write_json(os.path.join(out_dir, "sanity.json"), summary)
    _write_csv(rows, os.path.join(out_dir, "sanity.csv"))
    with open(os.path.join(out_dir, "sanity.md"), "w") as f:
        f.write(_markdown(summary))
    return summary
