"""Does self-supervised pretraining save labels? Pretrain once, fine-tune with 1/10/100% of the patients' labels.

    python experiments/label_efficiency.py --out experiments/results/label_efficiency
    python experiments/label_efficiency.py --out /tmp/le --quick        # minutes: a smoke run of the pipeline

Everything goes through the ``lclsc`` command (``cli.main``, in this process so compilations are shared):
  1. ``lclsc pretrain`` (SimCLR by default) on the frames of the training patients of the synthetic pCLE
     benchmark, labels hidden; the k-NN / linear probes on the val patients are logged as it goes;
  2. for each seed and labelled fraction of the training patients (``data.label_fraction``: per class,
     rounded up, at least one patient), ``lclsc train`` from scratch and ``lclsc train --init-from`` the
     pretraining run, same steps and settings;
  3. ``lclsc evaluate --split test`` of each: held-out patients that pretraining never saw.
Writes ``summary.json``, ``summary.md`` (the table, with the per-seed paired differences) and
``label_efficiency.png`` (accuracy vs labelled fraction; the probe accuracy vs pretraining step).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from lclsc_jax import cli

FRACTIONS = (0.01, 0.1, 1.0)


def _sets(args: argparse.Namespace) -> list[str]:
    """The data settings pretraining and fine-tuning share (same benchmark, same patient-wise split)."""
    return [f"synthetic.num_patients={args.patients}", f"synthetic.images_per_patient={args.frames}",
            f"data.image_size={args.size}", f"model.arch={args.arch}", f"data.cache_dir={args.cache}"]


def _run(*argv: str) -> None:
    """``lclsc ARGV``; raise on a non-zero exit."""
    code = cli.main(list(argv))
    if code:
        raise SystemExit(f"lclsc {' '.join(argv)} exited with {code}")


def pretrain(args: argparse.Namespace) -> str:
    """Pretrain (resumes if already there); returns the workdir."""
    work = os.path.join(args.out, "pretrain")
    _run("pretrain", "--workdir", work, "--config", "pretrain", "--no-progress", "--set", *_sets(args),
         f"pretrain.objective={args.objective}", f"train.steps={args.pretrain_steps}",
         f"train.eval_every={max(1, args.pretrain_steps // 6)}",
         f"train.checkpoint_every={max(1, args.pretrain_steps // 6)}")
    return work


def finetune(args: argparse.Namespace, pre: str, frac: float, seed: int, init: str) -> dict:
    """Train one run and score it on the test patients; returns its metrics (cached in the workdir)."""
    work = os.path.join(args.out, "finetune", f"{init}_f{frac:g}_s{seed}")
    metrics_path = os.path.join(work, "eval", "metrics.json")
    if not os.path.exists(metrics_path):
        extra = ["--init-from", pre] if init == "pretrained" else []
        _run("train", "--workdir", work, "--config", "demo", "--no-progress", *extra, "--set", *_sets(args),
             f"data.label_fraction={frac}", f"seed={seed}", f"train.steps={args.steps}",
             f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", f"train.batch_size={args.batch}")
        _run("evaluate", "--workdir", work, "--split", "test")
    with open(metrics_path) as f:
        m = json.load(f)
    with open(os.path.join(work, "splits.json")) as f:
        s = json.load(f)
    m["train_patients"] = len(s["patients"]["train"])
    m["train_frames"] = s["counts"]["train"]
    return m


def frozen_probes(args: argparse.Namespace, pre: str) -> list[dict]:
    """k-NN and linear probes of frozen features: the pretrained encoder vs the same encoder at random init.

    For each seed and labelled fraction, the probes are fitted on the pooled features of the labelled
    training patients (``data.label_fraction``'s subset) and scored on the test patients.
    """
    import jax

    from lclsc_jax import data
    from lclsc_jax.evaluate import probes
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop
    from lclsc_jax.train import pretrain_state as ps

    cfg = ps.read_run_config(pre)
    ds = loop.load_dataset(cfg)
    splits = loop.make_splits(cfg, ds)
    trained, _ = ps.encoder_variables(pre)
    model = ps.build_encoder(cfg)
    shape = (1, cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    encoders = {"pretrained": trained}
    embed = jax.jit(lambda v, x: model.apply(v, x, train=False)["pooled"])

    def features(variables, idx):
        return np.concatenate([np.asarray(embed(variables, b["image"]))[np.asarray(b["valid"], bool)]
                               for b in data.eval_batches(ds, idx, 128)])

    rows = []
    for seed in args.seeds:
        encoders["random init"] = model.init(jax.random.PRNGKey(seed), np.zeros(shape, np.float32), train=False)
        for name, variables in encoders.items():
            test = features(variables, splits["test"])
            for frac in args.fractions:
                sub = loop.make_splits(C.override(cfg, {"data.label_fraction": frac, "seed": seed}), ds)["train"]
                train = features(variables, sub)
                knn = probes.knn_accuracy(train, ds.labels[sub], test, ds.labels[splits["test"]], ds.num_classes,
                                          k=min(20, len(sub)))
                lin = probes.linear_probe(train, ds.labels[sub], test, ds.labels[splits["test"]],
                                          train_groups=ds.patients[sub])
                rows.append({"encoder": name, "fraction": frac, "seed": seed, "knn_accuracy": knn,
                             "linear_accuracy": lin["accuracy"], "train_frames": int(len(sub))})
                print(f"frozen {name} fraction={frac:g} seed={seed}: k-NN {knn:.3f} linear {lin['accuracy']:.3f}",
                      flush=True)
    return rows


def probe_curve(pre: str) -> list[dict]:
    """The probes logged during pretraining: ``[{step, knn_accuracy, linear_accuracy, ...}]``."""
    rows = []
    with open(os.path.join(pre, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "probe":
                rows.append(r)
    return rows


def summarise(results: list[dict], curve: list[dict], args: argparse.Namespace) -> dict:
    """Mean, sd and per-seed paired differences (pretrained - scratch) of test accuracy per fraction."""
    table = []
    for frac in args.fractions:
        row: dict = {"fraction": frac}
        for init in ("scratch", "pretrained"):
            rs = [r for r in results if r["fraction"] == frac and r["init"] == init]
            acc = np.array([r["metrics"]["accuracy"] for r in rs])
            bal = np.array([r["metrics"]["balanced_accuracy"] for r in rs])
            sd = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
            row[init] = {"accuracy_mean": float(acc.mean()), "accuracy_sd": sd,
                         "balanced_accuracy_mean": float(bal.mean()), "per_seed": acc.tolist(),
                         "ci_per_seed": [r["metrics"].get("accuracy_ci") for r in rs],
                         "train_patients": rs[0]["metrics"]["train_patients"] if rs else None,
                         "train_frames": [r["metrics"]["train_frames"] for r in rs]}
        diff = np.array(row["pretrained"]["per_seed"]) - np.array(row["scratch"]["per_seed"])
        row["paired_difference"] = {"mean": float(diff.mean()), "per_seed": diff.tolist(),
                                    "wins": int((diff > 0).sum()), "seeds": len(diff)}
        table.append(row)
    return {"table": table, "probe_curve": curve, "settings": vars(args)}


def write_markdown(summary: dict, path: str) -> None:
    """The table as Markdown."""
    lines = ["| labelled fraction | train patients (frames) | scratch acc | pretrained acc | paired diff (wins) |",
             "|---|---|---|---|---|"]
    for r in summary["table"]:
        s, p, d = r["scratch"], r["pretrained"], r["paired_difference"]
        frames = "/".join(str(x) for x in s["train_frames"])
        lines.append(f"| {r['fraction']:g} | {s['train_patients']} ({frames}) | {s['accuracy_mean']:.3f} ± "
                     f"{s['accuracy_sd']:.3f} | {p['accuracy_mean']:.3f} ± {p['accuracy_sd']:.3f} | "
                     f"{d['mean']:+.3f} ({d['wins']}/{d['seeds']}) |")
    if summary.get("frozen"):
        lines += ["", "Frozen features (probes fitted on the labelled training patients, scored on the test "
                  "patients; mean ± sd over seeds):", "", "| labelled fraction | encoder | k-NN acc | linear acc |", "|---|---|---|---|"]
        for frac in sorted({r["fraction"] for r in summary["frozen"]}):
            for enc in ("random init", "pretrained"):
                rs = [r for r in summary["frozen"] if r["fraction"] == frac and r["encoder"] == enc]
                k, li = np.array([r["knn_accuracy"] for r in rs]), np.array([r["linear_accuracy"] for r in rs])
                lines.append(f"| {frac:g} | {enc} | {k.mean():.3f} ± {k.std(ddof=1) if len(k) > 1 else 0:.3f} | "
                             f"{li.mean():.3f} ± {li.std(ddof=1) if len(li) > 1 else 0:.3f} |")
    lines += ["", "Probe of the encoder on the val patients during pretraining:", "",
              "| step | k-NN acc | linear acc |", "|---|---|---|"]
    lines += [f"| {c['step']} | {c['knn_accuracy']:.3f} | {c['linear_accuracy']:.3f} |" for c in summary["probe_curve"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary: dict, path: str) -> None:
    """Accuracy vs labelled fraction (mean ± sd over seeds) and probe accuracy vs pretraining step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fr = [r["fraction"] for r in summary["table"]]
    for init, colour in (("scratch", "tab:grey"), ("pretrained", "tab:blue")):
        m = [r[init]["accuracy_mean"] for r in summary["table"]]
        sd = [r[init]["accuracy_sd"] for r in summary["table"]]
        a.errorbar(fr, m, yerr=sd, marker="o", capsize=4, color=colour, label=init)
        for f, r in zip(fr, summary["table"]):
            a.scatter([f] * len(r[init]["per_seed"]), r[init]["per_seed"], s=10, color=colour, alpha=0.5)
    a.set_xscale("log")
    a.set_xlabel("labelled fraction of training patients")
    a.set_ylabel("test accuracy (held-out patients)")
    a.axhline(1 / 3, ls=":", color="k", lw=1, label="chance")
    a.set_ylim(0, 1.02)
    a.legend()
    c = summary["probe_curve"]
    if c:
        b.plot([r["step"] for r in c], [r["knn_accuracy"] for r in c], marker="o", label="k-NN")
        b.plot([r["step"] for r in c], [r["linear_accuracy"] for r in c], marker="s", label="linear probe")
        b.axhline(1 / 3, ls=":", color="k", lw=1)
        b.set_ylim(0, 1.02)
        b.legend()
    b.set_xlabel("pretraining step")
    b.set_ylabel("val accuracy (frozen encoder)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run (or resume) the study and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few patients and steps, one seed")
    ap.add_argument("--objective", default="simclr", choices=("simclr", "dino"))
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=150)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--cache", default="", help="data cache folder (default: $LCLSC_DATA_DIR or ~/.cache)")
    ap.add_argument("--probes-only", action="store_true",
                    help="only the frozen-feature probes of an existing pretraining")
    args = ap.parse_args()
    if args.quick:
        args.patients, args.frames, args.pretrain_steps, args.steps, args.seeds = 30, 4, 30, 20, [0]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    pre = pretrain(args)
    if args.probes_only:
        for r in frozen_probes(args, pre):
            print(json.dumps(r))
        return
    results = []
    for seed in args.seeds:
        for frac in args.fractions:
            for init in ("scratch", "pretrained"):
                m = finetune(args, pre, frac, seed, init)
                results.append({"fraction": frac, "seed": seed, "init": init, "metrics": m})
                print(f"fraction={frac:g} seed={seed} {init}: test accuracy {m['accuracy']:.3f}", flush=True)
    summary = summarise(results, probe_curve(pre), args)
    summary["frozen"] = frozen_probes(args, pre)
    summary["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_markdown(summary, os.path.join(args.out, "summary.md"))
    plot(summary, os.path.join(args.out, "label_efficiency.png"))
    print(open(os.path.join(args.out, "summary.md")).read())


if __name__ == "__main__":
    main()
