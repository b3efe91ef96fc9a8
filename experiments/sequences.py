"""Frames -> procedures: a frame filter and a tissue classifier on simulated pCLE videos, evaluated per frame,
per sliding window and per sequence (held-out patients, patient-bootstrap intervals).

    python experiments/sequences.py --out experiments/results/sequences            # ~15 CPU minutes
    python experiments/sequences.py --out /tmp/seq --quick                         # ~1 minute smoke run

Everything goes through the ``lclsc`` command (``cli.main``, in this process so compilations are shared):
  1. ``lclsc train --config demo`` a tissue classifier on the simulator with longer probe passes
     (``synthetic.images_per_patient=60 synthetic.sequences_per_patient=3``: 20 frames a sequence) and
     ``synthetic.nondiagnostic_fraction=0.2`` (a fifth of the frames out of contact, saturated or smeared);
  2. ``lclsc train`` a frame filter on the same data and split (``data.target=diagnostic loss.name=ce``);
  3. ``protocols.sequences.evaluate_sequences`` on the test patients: the filter's sensitivity/specificity,
     frame / window / sequence accuracy for each aggregator and the temporal model, with and without the
     filter, accuracy vs window length, and the seconds a stable online decision needs.
Writes ``OUT/summary.json`` (the whole evaluation plus the settings), ``OUT/summary.md`` (the tables),
``OUT/accuracy_vs_window.png`` and ``OUT/timelines.png``. Existing trained runs under OUT are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lclsc_jax import cli


def _run(*argv: str) -> None:
    """``lclsc ARGV``; raise on a non-zero exit."""
    code = cli.main(list(argv))
    if code:
        raise SystemExit(f"lclsc {' '.join(argv)} exited with {code}")


def data_settings(args: argparse.Namespace) -> list[str]:
    """The data settings the classifier and the filter share (same simulated videos, same patient split)."""
    return [f"synthetic.num_patients={args.patients}", f"synthetic.images_per_patient={args.frames}",
            f"synthetic.sequences_per_patient={args.sequences}",
            f"synthetic.nondiagnostic_fraction={args.nondiagnostic}", f"data.cache_dir={args.cache}"]


def train(args: argparse.Namespace, name: str, steps: int, extra: list[str]) -> str:
    """Train one run under OUT/NAME unless it already has a checkpoint; returns the workdir."""
    work = os.path.join(args.out, name)
    if os.path.isdir(os.path.join(work, "checkpoints")) and os.path.exists(os.path.join(work, "splits.json")):
        return work
    every = max(1, steps // 4)
    _run("train", "--workdir", work, "--config", args.config, "--no-progress", "--set", *data_settings(args),
         f"train.steps={steps}", f"train.eval_every={every}", f"train.checkpoint_every={every}", *extra)
    return work


def main(argv: list[str] | None = None) -> dict:
    """Train both stages, evaluate sequences, write the summary; returns it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/sequences")
    ap.add_argument("--steps", type=int, default=1000, help="classifier steps (default 1000)")
    ap.add_argument("--filter-steps", type=int, default=400, help="filter steps (default 400)")
    ap.add_argument("--quick", action="store_true", help="a 1-minute smoke version (tiny config, few steps)")
    ap.add_argument("--fps", type=float, default=12.0)
    ap.add_argument("--window", type=float, default=1.0, help="window seconds (default 1.0)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--temporal-steps", type=int, default=300)
    ap.add_argument("--cache", default="", help="data cache folder (default OUT/cache)")
    ap.add_argument("--checkpoint", default="latest",
                    help="classifier checkpoint (default latest: a validation split of 3 patients cannot pick one, "
                         "RESULTS.md, the demo)")
    args = ap.parse_args(argv)
    args.config, args.patients, args.frames, args.sequences, args.nondiagnostic = "demo", 24, 60, 3, 0.2
    if args.quick:
        args.config, args.patients, args.frames, args.sequences = "tiny", 9, 16, 2
        args.steps, args.filter_steps, args.n_boot, args.temporal_steps = 30, 20, 100, 50
    args.cache = args.cache or os.path.join(args.out, "cache")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    cls = train(args, "classifier", args.steps, [])
    filt = train(args, "filter", args.filter_steps, ["data.target=diagnostic", "loss.name=ce"])
    t_train = time.time() - t0

    from lclsc_jax.protocols import sequences

    summary = sequences.evaluate_sequences(cls, filt, fps=args.fps, window_s=args.window, n_boot=args.n_boot,
                                           temporal_steps=args.temporal_steps, out_dir=args.out,
                                           which=args.checkpoint)
    summary["experiment"] = {"config": args.config, "classifier_steps": args.steps, "checkpoint": args.checkpoint, "filter_steps": args.filter_steps,
                             "data": data_settings(args)[:-1], "quick": bool(args.quick),
                             "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = sequences.summary_table(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n\nSettings: " + " ".join(summary["experiment"]["data"]) +
                f"; {args.config} config, classifier {args.steps} steps, filter {args.filter_steps} steps.\n")
    print(table)
    print(f"written: {os.path.join(args.out, 'summary.json')}, {os.path.join(args.out, 'summary.md')}")
    return summary


if __name__ == "__main__":
    main()
