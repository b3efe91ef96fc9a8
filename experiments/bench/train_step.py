"""Train-step throughput and model FLOPs utilisation (MFU) on synthetic, device-resident batches.

    python experiments/bench/train_step.py --arch resnet50 --image-size 224 --dtype bfloat16 \
        --batch auto --losses ce,lcl_sc --out $OUT/train_step.json [--profile $OUT/trace]

No data pipeline: images and labels are random arrays placed on the devices once (batch-sharded
over a ``data`` mesh of all local devices), so the figure is the step alone. The step is the
project's own (``make_train_step`` + ``jit_train_step``: donated, replicated state). For
``lcl_sc`` the second view is made on device from ``image`` (as in ``lclsc train``).

* FLOPs per step: XLA's cost analysis of the *compiled* step (``compiled.cost_analysis()``),
  cross-checked against the cost analysis of the lowered, unoptimised HLO.
* step time: the median over ``--repeats`` windows of ``--steps`` steps; each window blocks
  once at its end (dispatch stays asynchronous, as in training).
* MFU = FLOPs per step / step time / peak FLOP/s of the device (dense, for the compute dtype);
  on CPU, and on devices missing from :data:`PEAK_FLOPS`, only the achieved FLOP/s is shown.
* images/s counts the primary images of the batch only (LCL-SC's second view is overhead).
* ``--batch auto``: the largest batch that fits, doubling from ``--batch-start`` and bisecting
  back after a RESOURCE_EXHAUSTED; probed with the heaviest loss and used for every loss, so
  the LCL-SC / CE ratio compares equal batches.

Runs unchanged on CPU, GPU and TPU (jax 0.10 - 0.11); prints a Markdown table, ``--out`` writes
JSON, ``--profile DIR`` writes a ``jax.profiler`` trace of a few steps per loss.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import models
from lclsc_jax.train import config as config_lib
from lclsc_jax.train import loop
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as steps_lib
from lclsc_jax.train.state import create_state, make_optimizer

# Dense peak FLOP/s per device by (device_kind substring, dtype); the first matching entry wins.
# Sources: NVIDIA H100/H200/A100 datasheets (SXM, without sparsity), Google Cloud TPU docs.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),  # SXM; float32 runs as TF32
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("GH200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v6", {"bfloat16": 918e12}),
]
NUM_CLASSES = 4


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of ``device_kind`` for ``dtype``; None when unknown (CPU)."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an accelerator out-of-memory error."""
    msg = str(err).lower()
    return "resource_exhausted" in msg or "out of memory" in msg or "resource exhausted" in msg


def flops_of(analysis: Any) -> float | None:
    """The ``flops`` entry of a cost analysis, which is a dict or a list of dicts by jax version."""
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):
        vals = [flops_of(a) for a in analysis]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None
    val = analysis.get("flops") if hasattr(analysis, "get") else None
    return float(val) if val is not None and val >= 0 else None


# ---------------------------------------------------------------------------------------------
# Building the step
# ---------------------------------------------------------------------------------------------


def make_config(arch: str, image_size: int, channels: int, dtype: str, loss: str,
                batch: int, extra: list[str] | None = None) -> config_lib.Config:
    """The run config of one benchmark cell (``extra``: more ``key=value`` overrides)."""
    return config_lib.load("default", [
        f"model.arch={arch}", f"model.dtype={dtype}", f"data.image_size={image_size}",
        f"data.channels={channels}", f"loss.name={loss}", f"train.batch_size={batch}",
        *(extra or [])])


def synthetic_batch(cfg: config_lib.Config, mesh: jax.sharding.Mesh, seed: int = 0) -> dict[str, jax.Array]:
    """A device-resident, batch-sharded ``{"image", "label"}`` with every class present."""
    b, s, c = cfg.train.batch_size, cfg.data.image_size, cfg.data.channels
    rng = np.random.default_rng(seed)
    host = {"image": rng.standard_normal((b, s, s, c), dtype=np.float32),
            "label": (np.arange(b) % NUM_CLASSES).astype(np.int32)}
    return shd.to_global(host, mesh, ("image", "label"))


class Bench:
    """One compiled train step (config, model, mesh, state factory, compiled step, batch)."""

    def __init__(self, cfg: config_lib.Config, mesh: jax.sharding.Mesh, donate: bool = True):
        self.cfg, self.mesh = cfg, mesh
        self.model = loop.build_model(cfg, NUM_CLASSES)
        self.tx = make_optimizer(cfg)
        shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
        self._init = jax.jit(
            lambda key: create_state(self.model, self.tx, NUM_CLASSES, cfg.model.embed_dim, shape, key),
            out_shardings=shd.replicated(mesh))
        self.jitted = steps_lib.jit_train_step(steps_lib.make_train_step(self.model, self.tx, cfg), mesh,
                                               donate=donate)
        self.batch = synthetic_batch(cfg, mesh)
        self.compiled = None
        self.compile_s = self.flops = self.flops_lowered = float("nan")

    def new_state(self) -> Any:
        """A fresh train state (the compiled step donates it)."""
        return self._init(jax.random.PRNGKey(self.cfg.seed))

    def compile(self) -> "Bench":
        """Lower and compile the step once; record compile time and FLOPs per step."""
        state = self.new_state()
        t0 = time.perf_counter()
        lowered = self.jitted.lower(state, self.batch)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = flops_of(self.compiled.cost_analysis())
        try:
            self.flops_lowered = flops_of(lowered.cost_analysis())
        except Exception:  # not every backend analyses unoptimised HLO
            self.flops_lowered = None
        return self

    def run(self, state: Any, n: int) -> tuple[Any, Any]:
        """``n`` steps from ``state``; blocks on the result."""
        metrics = None
        for _ in range(n):
            state, metrics = self.compiled(state, self.batch)
        jax.block_until_ready((state, metrics))
        return state, metrics

    def time(self, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
        """Median seconds per step over ``repeats`` windows of ``steps`` steps, after ``warmup``."""
        state, metrics = self.run(self.new_state(), warmup)
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, metrics = self.run(state, steps)
            windows.append((time.perf_counter() - t0) / steps)
        loss = float(jax.device_get(metrics["loss"]))
        del state
        return {"step_s": statistics.median(windows), "step_s_min": min(windows), "windows_s": windows,
                "final_loss": loss}

    def profile(self, logdir: str, steps: int = 3) -> None:
        """Write a ``jax.profiler`` trace of ``steps`` steps to ``logdir``."""
        state, _ = self.run(self.new_state(), 1)
        with jax.profiler.trace(logdir):
            for i in range(steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = self.compiled(state, self.batch)
            jax.block_until_ready((state, metrics))


def fits(cfg: config_lib.Config, mesh: jax.sharding.Mesh) -> bool:
    """Whether the step compiles and runs two steps at ``cfg.train.batch_size``."""
    bench = None
    try:
        bench = Bench(cfg, mesh).compile()
        bench.run(bench.new_state(), 2)
        return True
    except Exception as err:  # noqa: BLE001 - only OOM is an answer, anything else re-raises
        if not is_oom(err):
            raise
        return False
    finally:
        del bench
        gc.collect()
        jax.clear_caches()


def find_max_batch(make_cfg, mesh: jax.sharding.Mesh, start: int, max_batch: int, quantum: int,
                   log=print) -> int:
    """Largest batch (a multiple of ``quantum``) that fits: double from ``start``, then bisect."""
    good, bad = 0, None
    b = max(quantum, start // quantum * quantum)
    while b <= max_batch:
        ok = fits(make_cfg(b), mesh)
        log(f"  batch {b}: {'fits' if ok else 'RESOURCE_EXHAUSTED'}")
        if not ok:
            bad = b
            break
        good, b = b, b * 2
    if good == 0:
        raise RuntimeError(f"not even batch {b} fits on {jax.devices()[0].device_kind}")
    while bad is not None and bad - good > max(quantum, good // 8):
        mid = (good + bad) // 2 // quantum * quantum
        if mid <= good:
            break
        ok = fits(make_cfg(mid), mesh)
        log(f"  batch {mid}: {'fits' if ok else 'RESOURCE_EXHAUSTED'}")
        good, bad = (mid, bad) if ok else (good, mid)
    return good


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Device kind and count, host CPU, software versions, relevant env, load average."""
    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def result_row(bench: Bench, timing: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """One result: batch, times, images/s, FLOPs, achieved FLOP/s, MFU."""
    cfg = bench.cfg
    step_s = timing["step_s"]
    flops = bench.flops if bench.flops else bench.flops_lowered
    row = {"arch": cfg.model.arch, "image_size": cfg.data.image_size, "dtype": cfg.model.dtype,
           "loss": cfg.loss.name, "batch": cfg.train.batch_size, "compile_s": bench.compile_s,
           **timing, "images_per_s": cfg.train.batch_size / step_s,
           "flops_per_step": bench.flops, "flops_per_step_lowered": bench.flops_lowered,
           "achieved_flops_per_s": flops / step_s if flops else None,
           "mfu": flops / step_s / (peak * jax.device_count()) if flops and peak else None}
    if hasattr(os, "getloadavg"):
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return row


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The results as a Markdown table (plus the LCL-SC / CE ratio when both were run)."""
    head = ("| arch | size | dtype | loss | batch | compile s | step ms | images/s | GFLOP/step "
            "| achieved TFLOP/s | MFU | load |")
    lines = [f"device: {info['device_count']} x {info['device_kind']} ({info['platform']}), "
             f"jax {info['jax']}, host {info['cpu_count']} CPUs", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gflop = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        ach = f"{r['achieved_flops_per_s'] / 1e12:.3f}" if r["achieved_flops_per_s"] else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['arch']} | {r['image_size']} | {r['dtype']} | {r['loss']} | {r['batch']} "
                     f"| {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | {gflop} "
                     f"| {ach} | {mfu} | {r.get('loadavg_1m', 'n/a')} |")
    ratio = lcl_sc_ratio(rows)
    if ratio is not None:
        lines += ["", f"LCL-SC / CE step time: {ratio:.3f} (target <= 1.35)"]
    return "\n".join(lines)


def lcl_sc_ratio(rows: list[dict[str, Any]]) -> float | None:
    """Step-time ratio of the LCL-SC step to the CE step (same arch, size, batch), if both ran."""
    by_loss = {r["loss"]: r for r in rows}
    if "lcl_sc" in by_loss and "ce" in by_loss:
        return by_loss["lcl_sc"]["step_s"] / by_loss["ce"]["step_s"]
    return None


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", default="resnet50", choices=models.ARCHS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=1, help="input channels (pCLE frames are grey: 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", default="auto", help="global batch size, or 'auto' (largest that fits)")
    ap.add_argument("--batch-start", type=int, default=64, help="--batch auto: first batch tried")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="--batch auto: upper bound (default 4096 on accelerators, 64 on CPU)")
    ap.add_argument("--losses", default="ce,lcl_sc", help="comma-separated loss.name values")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per window")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--profile", default=None, metavar="DIR", help="write a jax.profiler trace here")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    info = machine_info()
    mesh = shd.make_mesh()
    n_dev = jax.device_count()

    def make_cfg(batch: int, loss: str = "lcl_sc" if "lcl_sc" in losses else losses[0]):
        return make_config(args.arch, args.image_size, args.channels, args.dtype, loss, batch, args.set)

    if args.batch == "auto":
        cpu = info["platform"] == "cpu"
        max_batch = args.max_batch or (64 if cpu else 4096)
        quantum = math.lcm(8 * n_dev, make_cfg(8).loss.eq_stride * n_dev)
        print(f"searching the largest batch (<= {max_batch}, multiple of {quantum}) with loss {make_cfg(8).loss.name}",
              file=sys.stderr)
        batch = find_max_batch(make_cfg, mesh, args.batch_start, max_batch, quantum,
                               log=lambda s: print(s, file=sys.stderr, flush=True))
    else:
        batch = int(args.batch)
    shd.check_batch_size(batch, mesh)

    peak = peak_flops(info["device_kind"], args.dtype)
    rows = []
    for loss in losses:
        bench = Bench(make_cfg(batch, loss), mesh).compile()
        if bench.flops and bench.flops_lowered and bench.flops < 0.5 * bench.flops_lowered:
            print(f"warning: compiled cost analysis counts {bench.flops:.3g} FLOPs, the unoptimised HLO "
                  f"{bench.flops_lowered:.3g}; custom calls may be uncounted", file=sys.stderr)
        timing = bench.time(args.steps, args.warmup, args.repeats)
        rows.append(result_row(bench, timing, peak))
        print(f"{loss}: {1e3 * timing['step_s']:.2f} ms/step, {rows[-1]['images_per_s']:.1f} images/s",
              file=sys.stderr, flush=True)
        if args.profile:
            bench.profile(os.path.join(args.profile, loss))
        del bench
        gc.collect()

    print(markdown(rows, info))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": info, "args": vars(args), "peak_flops_per_device": peak,
                       "lcl_sc_over_ce": lcl_sc_ratio(rows), "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
