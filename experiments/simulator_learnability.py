"""Can the demo model learn a simulator design? Train on held-out-patient splits and report test accuracy.

    python experiments/simulator_learnability.py ce_default --set loss.name=ce train.steps=1000
    python experiments/simulator_learnability.py sc_wide --synth "lesion_extent=(0.1,0.3)" --set loss.lambda_sc=0.1
    python experiments/simulator_learnability.py whorl --arrangement meningioma=whorl --set loss.name=ce

Trains the ``demo`` preset (with ``--set`` overrides) on the synthetic benchmark (with ``--synth``
simulator overrides, Python literals) through ``loop.train``, then predicts the test patients with the
latest checkpoint. Prints one JSON line: generation and training seconds, accuracy on all test frames and
on the diagnostic ones, and the confusion matrix (rows: true class). Used to choose the simulator's
defaults (experiments/RESULTS.md, "The pCLE benchmark").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
import time

import numpy as np

from lclsc_jax import data
from lclsc_jax.data import tissue
from lclsc_jax.train import config as C
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop


def main() -> None:
    """Parse the options, train, predict the test patients, print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tag", help="a name for the run (the workdir is /tmp/learnability_<tag>)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    ap.add_argument("--synth", nargs="*", default=[], help="SyntheticConfig overrides KEY=PYTHON_LITERAL")
    ap.add_argument("--arrangement", nargs="*", default=[], help="CLASS=parallel|crossing|whorl")
    ap.add_argument("--cache", default="/tmp/lclsc_learnability_cache")
    args = ap.parse_args()
    for item in args.arrangement:
        cls, arrangement = item.split("=", 1)
        tissue.ARRANGEMENTS[cls] = arrangement  # not part of the config: the cache key does not see it
    cfg = C.load("demo", dict(s.split("=", 1) for s in args.set))
    synth = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.synth)}
    d = cfg.data
    sc = dataclasses.replace(C.synthetic_config(cfg), **synth)
    cache = args.cache + ("_" + "_".join(args.arrangement) if args.arrangement else "")
    t0 = time.time()
    ds = data.load("synthetic", image_size=d.image_size, synthetic=sc, cache_dir=cache)
    gen_s = time.time() - t0
    work = f"/tmp/learnability_{args.tag}"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    loop.train(cfg, work, dataset=ds, progress=False)
    train_s = time.time() - t0
    run = runs.load_run(work, "latest")
    res = runs.predict(run, ds, loop.make_splits(cfg, ds)["test"])
    pred, y = res["probs"].argmax(-1), res["label"]
    correct = pred == y
    cm = np.zeros((len(ds.class_names),) * 2, int)
    np.add.at(cm, (y, pred), 1)
    print(json.dumps({"tag": args.tag, "gen_s": round(gen_s, 1), "train_s": round(train_s, 1),
                      "accuracy": float(correct.mean()), "accuracy_diagnostic": float(correct[ds.diagnostic[res["index"]]].mean()),
                      "confusion": cm.tolist()}))


if __name__ == "__main__":
    main()
