"""Why do saliency maps look at the black corners outside pCLE's field of view? Padding vs corners.

    python experiments/fov_corners.py                  # 4 variants x 1 seed x 600 steps: ~15 min on 2 idle cores
    python experiments/fov_corners.py --seeds 0 1 2    # three seeds: ~45 min
    python experiments/fov_corners.py --steps 100 --variants baseline reflect
    python experiments/fov_corners.py --variants --demo runs/demo --out experiments/results/fov_corners_demo.json

Trains the ``demo`` preset (tiny CNN, 64 px, LCL-SC with lambda_sc=0.1, batch 64; ``--steps``,
default 600, instead of 1000: at 300 the held-out accuracy is still at chance) on the built-in
pCLE simulator, in a 2x2 design:

  ``baseline``     zero padding in every conv, black corners (standard training);
  ``fill``         zero padding, the corners filled at train *and* test time: every pixel outside the
                   field of view (the disc ``explain`` restricts maps to) takes the value of the tissue
                   mirrored radially about its edge, so no black-vs-tissue edge is left;
  ``reflect``      ``models.create(..., padding="reflect")`` (torch ``padding_mode="reflect"``), black corners;
  ``reflect_fill`` both.

Training is the trainer's own train step (``train.steps.make_train_step``), optimizer and
state (``train.state``) and input pipeline (``data.train_iterator``, augmentation on) in a
small loop here, because ``loop.train`` builds the model from the config, which has no padding
key. ``fill`` fills the records before augmentation, and after augmentation the few pixels the
affine transform brought in from outside the frame (black) get their nearest frame pixel.

Then, on the diagnostic frames of the held-out test patients (targets: the true labels, as
``benchmark-cams``), the maps as ``explain --no-fov`` computes them (``normalize=True``: ReLU,
min-max; not restricted to the field of view) of ``sc``, ``gradcam``, ``gradcam++``,
``layercam`` and ``eigencam`` at the last stage, and per map: the fraction of its energy
(sum of map values) outside the field of view (the inscribed disc: 21.2% of a 64 px frame), the
share of its peak (the pixels within 1e-6 of its maximum) outside, and the fraction of its energy
in the tissue next to the frame's edge (inside the disc, within one stage4 cell = 8 px of the
edge: 22.9% of the frame), which separates "the frame's border" from "the black corners". The
mean maps go to ``<out>_mean_maps.npz`` and ``<figure>_mean.png``. Reported per class group
(healthy / tumour = glioma and meningioma) and seed, plus held-out accuracy on all test frames
(GEI, as ``lclsc evaluate``).
Writes ``--out`` (JSON) and ``--figure`` (PNG), prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from lclsc_jax import data, explain, method, models
from lclsc_jax.evaluate import shortcuts
from lclsc_jax.explain.figures import overlay
from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import state as state_lib
from lclsc_jax.train import steps as steps_lib

VARIANTS = {  # name -> (conv padding, corners filled)
    "baseline": ("zeros", False),
    "fill": ("zeros", True),
    "reflect": ("reflect", False),
    "reflect_fill": ("reflect", True),
}
METHODS = ("sc", "gradcam", "gradcam++", "layercam", "eigencam")
SCORES = {"energy_corners": "corners", "peak_corners": "peak", "energy_edge": "edge"}  # table columns per method


# ------------------------------------------------------------------------------------ filling

def mirror_fill(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``x (N, H, W, C)``, every pixel outside the disc ``keep (H, W)`` replaced by the tissue mirrored about its edge.

    A pixel at distance ``d > r`` from the centre (``r``: the disc's radius, measured from
    ``keep``) takes the bilinear value at distance ``2 r - d`` on the same ray, so the filled
    region continues the tissue's texture and brightness without an edge at the disc.
    """
    h, w = keep.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    d = np.hypot(yy, xx)
    r = d[keep].max()
    out = np.array(x, dtype=np.float32, copy=True)
    sel = ~keep
    scale = (2 * r - d[sel]) / d[sel]
    coords = np.stack([cy + yy[sel] * scale, cx + xx[sel] * scale])
    for i in range(x.shape[0]):
        for c in range(x.shape[-1]):
            out[i, sel, c] = ndimage.map_coordinates(out[i, ..., c], coords, order=1, mode="nearest")
    return out


def fill_outside_frame(images: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Normalised ``images (B, H, W, C)``, the pixels where ``inside (B, H, W)`` is 0 set to the nearest inside one.

    ``inside`` is an all-ones mask carried through the augmentation: 0 where the affine
    transform sampled outside the frame (``ndimage.affine_transform`` fills those with black).
    """
    out = np.array(images, copy=True)
    for i in range(len(images)):
        hole = inside[i] == 0
        if hole.any() and not hole.all():
            idx = ndimage.distance_transform_edt(hole, return_distances=False, return_indices=True)
            out[i] = images[i][idx[0], idx[1]]
    return out


class ArraySource:
    """In-memory stand-in for ``data.RecordSource``: ``src[i] -> dict(image, label, patient, mask)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, patients: np.ndarray, masks: np.ndarray):
        self.images, self.labels, self.patients, self.masks = images, labels, patients, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"image": self.images[i], "label": int(self.labels[i]), "patient": str(self.patients[i]),
                "mask": self.masks[i]}

    def __getitems__(self, idx) -> list[dict]:
        return [self[i] for i in idx]


# ------------------------------------------------------------------------------------ training

def train_variant(cfg: C.Config, ds: Any, train_idx: np.ndarray, padding: str, filled: bool,
                  seed: int) -> tuple[Any, Any, dict]:
    """Train one variant; returns ``(model, state, timings)``."""
    cfg = C.override(cfg, {"seed": seed})
    model = models.create(cfg.model.arch, ds.num_classes, head="gei" if C.uses_gei(cfg) else "linear",
                          embed_dim=cfg.model.embed_dim, in_channels=cfg.data.channels,
                          projection_layers=cfg.model.projection_layers, padding=padding)
    tx = state_lib.make_optimizer(cfg)
    shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    state = jax.jit(lambda k: state_lib.create_state(model, tx, ds.num_classes, cfg.model.embed_dim, shape, k))(
        jax.random.PRNGKey(cfg.seed))
    step_fn = jax.jit(steps_lib.make_train_step(model, tx, cfg), donate_argnums=(0,))
    it = data.train_iterator(ds, train_idx, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                             augment=cfg.augment)
    t0, t_first, losses = time.perf_counter(), None, []
    for step in range(cfg.train.steps):
        b = next(it)
        image = fill_outside_frame(b["image"], b["mask"]) if filled else b["image"]
        state, metrics = step_fn(state, {"image": jnp.asarray(image), "label": jnp.asarray(b["label"])})
        if step == 0:
            jax.block_until_ready(state)
            t_first = time.perf_counter()
        if (step + 1) % 50 == 0 or step + 1 == cfg.train.steps:
            m = jax.device_get(metrics)
            if m["nonfinite"]:
                raise RuntimeError(f"training diverged at step {step + 1}")
            losses.append(round(float(m["loss"]), 4))
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    return model, state, {"train_s": round(t1 - t0, 1),
                          "steps_per_s": round((cfg.train.steps - 1) / max(t1 - t_first, 1e-9), 2),
                          "loss_every_50": losses}


# ------------------------------------------------------------------------------------ scoring

def predict(model: Any, state: Any, x: np.ndarray, tau: float, batch: int = 128) -> np.ndarray:
    """GEI class probabilities ``(N, C)`` of normalised images ``x``."""
    fn = jax.jit(lambda v, g, im: jax.nn.softmax(
        method.gei_logits(model.apply(v, im, train=False)["embedding"], g, tau=tau), axis=-1))
    return np.concatenate([np.asarray(fn(state.variables, state.global_emb, jnp.asarray(x[i:i + batch])))
                           for i in range(0, len(x), batch)])


def saliency_maps(model: Any, state: Any, x: np.ndarray, targets: np.ndarray, tau: float,
                  sc_maps: str = "cosine") -> dict[str, np.ndarray]:
    """``{method: (N, H, W)}`` maps in [0, 1] as ``explain --no-fov`` computes them, for the true classes.

    ``sc_maps``: the run's ``loss.sc_maps`` (which SC maps it trained), as ``TrainedRun.saliency_options``.
    """
    return {m: explain.saliency_batched(m, model, state.variables, x, targets, batch_size=32, stage="last",
                                        global_emb=state.global_emb, tau=tau,
                                        **({"maps": sc_maps} if m == "sc" else {}))
            for m in METHODS}


def regions(h: int, w: int, band: int) -> dict[str, np.ndarray]:
    """The scored regions ``(H, W)`` bool: ``corners`` (outside the inscribed disc, as ``benchmark-cams``
    scores) and ``edge`` (inside the disc, within ``band`` px of the frame's edge: where the disc
    touches the frame, the tissue next to the padding)."""
    corners = ~shortcuts.inscribed_disc(h, w)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    near = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx)) < band
    return {"corners": corners, "edge": near & ~corners}


def map_scores(maps: np.ndarray, where: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per map ``(N, H, W)``: the share of its energy (sum) in each region, and of its peak in the corners.

    The peak is every pixel within 1e-6 of the map's maximum: bilinear upsampling with edge
    clamping (the CAM pipeline's) turns a maximal border cell of the feature map into a plateau
    that reaches the frame's edge, so a single ``argmax`` (the first pixel in raster order) would
    land on the edge, outside the disc, more often than the map says.
    """
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    total = flat.sum(1)
    out = {}
    for name, region in where.items():
        out[f"energy_{name}"] = np.where(total > 0, flat[:, region.ravel()].sum(1) / np.maximum(total, 1e-12), np.nan)
    peak = flat >= flat.max(1, keepdims=True) - 1e-6
    out["peak_corners"] = (peak & where["corners"].ravel()).sum(1) / peak.sum(1)
    out["peak_corners"][total <= 0] = np.nan  # an all-zero map has no maximum
    return out


def summarise(scores: dict[str, np.ndarray], labels: np.ndarray, healthy: int) -> dict:
    """Mean of each score over the healthy and over the tumour frames."""
    res = {}
    for group, sel in (("healthy", labels == healthy), ("tumour", labels != healthy)):
        res[group] = {k: float(np.nanmean(v[sel])) for k, v in scores.items()} | {"n": int(sel.sum())}
    return res


# ------------------------------------------------------------------------------------ figure

def write_figure(path: str, shown: dict[str, dict], names: list[str], class_names: tuple[str, ...],
                 labels: np.ndarray) -> None:
    """Rows: frames; columns: per variant the input the model saw, Grad-CAM and the SC map (raw, no FOV restriction)."""
    from matplotlib.figure import Figure

    cols = [(v, kind) for v in shown for kind in ("image", "gradcam", "sc")]
    n = len(labels)
    fig = Figure(figsize=(1.45 * len(cols), 1.6 * n + 0.4))
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r in range(n):
        for c, (v, kind) in enumerate(cols):
            disp = data.denormalize_images(shown[v]["x"][r])
            heat = np.zeros(disp.shape[:2]) if kind == "image" else shown[v][kind][r]
            title = (f"{v}\n{kind}" if r == 0 else "") if kind != "image" else (
                f"{v}\n{class_names[labels[r]]}" if r == 0 else class_names[labels[r]])
            overlay(axes[r, c], disp, heat, title, alpha=0.0 if kind == "image" else 0.5)
            axes[r, c].title.set_fontsize(7)
    fig.suptitle("raw maps (explain --no-fov): " + ", ".join(names), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)


def write_mean_figure(path: str, mean_maps: dict[str, np.ndarray], variants: list[str]) -> None:
    """Mean map of healthy and of tumour frames, per variant (columns) and method (rows), with the disc drawn."""
    from matplotlib.figure import Figure

    rows = [(m, g) for m in ("gradcam", "sc", "layercam") for g in ("healthy", "tumour")]
    fig = Figure(figsize=(1.6 * len(variants) + 0.6, 1.6 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), len(variants), squeeze=False)
    for r, (m, g) in enumerate(rows):
        for c, v in enumerate(variants):
            ax = axes[r, c]
            mp = mean_maps[f"{v}/{m}/{g}"]
            ax.imshow(mp, cmap="jet", vmin=0.0, vmax=max(float(mp.max()), 1e-6))
            h = mp.shape[0]
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot((h - 1) / 2 + h / 2 * np.cos(t), (h - 1) / 2 + h / 2 * np.sin(t), "w-", lw=0.6)
            ax.set_title((f"{v}\n" if r == 0 else "") + f"{m}, {g}", fontsize=7)
            ax.axis("off")
    fig.suptitle("mean raw map over the diagnostic test frames, each panel scaled to its maximum "
                 "(white: the field of view)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ------------------------------------------------------------------------------------ main

def main() -> None:
    """Train the variants, score their maps, write the JSON and the figure, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="the variants to train (none: only --demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="experiments/results/fov_corners.json")
    ap.add_argument("--figure", default="docs/figures/fov_corners.png")
    ap.add_argument("--set", nargs="*", default=[], help="other config overrides KEY=VALUE on the demo preset")
    ap.add_argument("--demo", help="also score the latest checkpoint of this trained workdir (e.g. runs/demo)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg = C.load("demo", {"train.steps": args.steps, **dict(s.split("=", 1) for s in args.set)})
    ds = loop.load_dataset(cfg)
    splits = loop.make_splits(cfg, ds)
    n = len(ds)
    recs = [r for i in range(0, n, 256) for r in ds.source.__getitems__(list(range(i, min(n, i + 256))))]
    images = np.stack([r["image"] for r in recs])  # uint8 (N, H, W, 1)
    labels = np.asarray(ds.labels)
    h, w = images.shape[1:3]
    fov = shortcuts.estimate_fov(images)  # the disc `explain` restricts maps to (soft rim left out)
    keep = fov["valid"]
    where = regions(h, w, h // 8)  # the band: one cell of the last stage (stride 8)
    filled_u8 = np.clip(np.rint(mirror_fill(images.astype(np.float32), keep)), 0, 255).astype(np.uint8)
    ones = np.ones((n, h, w), np.uint8)  # carried through augmentation: 0 where the affine map left the frame
    sources = {False: ds, True: dataclasses.replace(ds, source=ArraySource(filled_u8, labels, ds.patients, ones))}
    test = np.asarray(splits["test"])
    diag = test[np.asarray(ds.diagnostic)[test]] if ds.diagnostic is not None else test
    healthy = ds.class_names.index("healthy")
    picks = [int(i) for c in range(ds.num_classes) for i in diag[labels[diag] == c][:2 if c == healthy else 1]]
    print(f"[fov_corners] {n} frames, {len(splits['train'])} train / {len(test)} test ({len(diag)} diagnostic); "
          f"field of view radius {fov['radius_px']} px, corners = {where['corners'].mean():.3f} of the frame, "
          f"edge band {where['edge'].mean():.3f}; "
          f"setup {time.perf_counter() - t_start:.0f} s", flush=True)

    results: dict[str, Any] = {
        "config": {"preset": "demo", "steps": args.steps, "seeds": args.seeds, "arch": cfg.model.arch,
                   "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size, "loss": cfg.loss.name,
                   "lambda_sc": cfg.loss.lambda_sc,
                   "patients": {k: len(set(ds.patients[v])) for k, v in splits.items()},
                   "test_frames": int(len(test)), "diagnostic_test_frames": int(len(diag)),
                   "area_fraction": {k: float(v.mean()) for k, v in where.items()}, "edge_band_px": h // 8,
                   "fov_radius_px": fov["radius_px"],
                   "methods": list(METHODS), "targets": "true labels"},
        "runs": []}
    shown: dict[str, dict] = {}
    mean_maps: dict[str, np.ndarray] = {}  # "variant/method/group" -> mean map over frames and seeds

    def score(model: Any, state: Any, run_cfg: C.Config, x_all: np.ndarray, run: dict,
              n_seeds: int) -> dict[str, np.ndarray]:
        """Accuracy and map scores of one trained model into ``run`` (appended to the results); its maps."""
        tau = run_cfg.loss.tau
        run["accuracy"] = float(np.mean(predict(model, state, x_all[test], tau).argmax(-1) == labels[test]))
        maps = saliency_maps(model, state, x_all[diag], labels[diag], tau, run_cfg.loss.sc_maps)
        run["methods"] = {}
        for m, mp in maps.items():
            run["methods"][m] = summarise(map_scores(mp, where), labels[diag], healthy)
            for group, sel in (("healthy", labels[diag] == healthy), ("tumour", labels[diag] != healthy)):
                key = f"{run['variant']}/{m}/{group}"
                mean_maps[key] = mean_maps.get(key, 0) + mp[sel].mean(0) / n_seeds
        results["runs"].append(run)
        print(f"[fov_corners] {run['variant']} seed {run['seed']}: accuracy {run['accuracy']:.3f}; "
              + "; ".join(f"{m} {g} " + "/".join(f"{r[g][k]:.2f}" for k in SCORES)
                          for m, r in run["methods"].items() for g in ("healthy", "tumour")), flush=True)
        return maps

    if args.demo:  # a trained run of the demo preset's data (e.g. `lclsc demo`'s), scored as it is
        from lclsc_jax.protocols import runs

        trained = runs.load_run(args.demo, "latest")
        if (trained.cfg.data.image_size, trained.class_names) != (cfg.data.image_size, ds.class_names):
            raise SystemExit(f"{args.demo} was not trained on the demo preset's data")
        score(trained.model, trained.state, trained.cfg, data.normalize_images(images),
              {"variant": f"demo run ({trained.cfg.train.steps} steps)", "padding": "zeros", "corners_filled": False,
               "seed": trained.cfg.seed, "workdir": args.demo, "step": trained.step}, 1)
    for variant in args.variants:
        padding, filled = VARIANTS[variant]
        x_all = data.normalize_images(filled_u8 if filled else images)
        for seed in args.seeds:
            model, state, timing = train_variant(cfg, sources[filled], splits["train"], padding, filled, seed)
            run = {"variant": variant, "padding": padding, "corners_filled": filled, "seed": seed, **timing}
            maps = score(model, state, cfg, x_all, run, len(args.seeds))
            if seed == args.seeds[0]:
                sel = [int(np.flatnonzero(diag == i)[0]) for i in picks]
                shown[variant] = {"x": x_all[picks], "gradcam": maps["gradcam"][sel], "sc": maps["sc"][sel]}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    loop.write_json(args.out, results)
    np.savez_compressed(os.path.splitext(args.out)[0] + "_mean_maps.npz", **mean_maps)
    if args.figure and shown:
        write_figure(args.figure, shown, [str(i) for i in picks], ds.class_names, labels[picks])
        write_mean_figure(os.path.splitext(args.figure)[0] + "_mean.png", mean_maps, args.variants)
    print(table(results))


def table(results: dict) -> str:
    """Markdown: per variant (mean over seeds) accuracy and, per method, the healthy / tumour scores."""
    runs = results["runs"]
    methods = results["config"]["methods"]
    area = results["config"]["area_fraction"]
    lines = [f"corners = share of the map's energy (sum) outside the field of view (its area: {area['corners']:.3f}); "
             "peak = share of the map's maximum (pixels within 1e-6 of it) outside; edge = share of the energy "
             f"inside the field of view within {results['config']['edge_band_px']} px of the frame's edge "
             f"(its area: {area['edge']:.3f}). Each cell: healthy / tumour frames.", "",
             "| variant | seeds | accuracy | " + " | ".join(f"{m} {SCORES[k]}" for m in methods for k in SCORES) + " |",
             "|---|---|---|" + "---|" * len(SCORES) * len(methods)]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        acc = [r["accuracy"] for r in rs]
        cells = [variant, ",".join(str(r["seed"]) for r in rs),
                 f"{np.mean(acc):.3f}" + (f" ({min(acc):.3f}-{max(acc):.3f})" if len(rs) > 1 else "")]
        for m in methods:
            for key in SCORES:
                hv = np.mean([r["methods"][m]["healthy"][key] for r in rs])
                tv = np.mean([r["methods"][m]["tumour"][key] for r in rs])
                cells.append(f"{hv:.2f} / {tv:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
