"""Export a trained run for systems without JAX (``lclsc export``): ONNX, or PyTorch-named safetensors.

``onnx``: the run's whole classifier as one ONNX graph, uint8 frames ``(B, H, W, C)`` in and
``probs (B, K)`` (GEI cosine softmax or the linear head, as ``runs.predict``) and ``embedding
(B, D)`` out, the input normalisation inside the graph (``interop.onnx_export``). ``--check``
runs it in ONNX Runtime on the run's own test frames and compares with ``runs.predict``.
``safetensors``: the weights in torchvision naming (``interop.export_torch_weights``), with a
``.json`` beside them holding what the weights alone do not say (classes, head, GEI class
embeddings, ``tau``, input normalisation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import interop
from lclsc_jax.data.augment import NORM_MEAN, NORM_STD
from lclsc_jax.interop.onnx_export import jax_to_onnx
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train import steps as steps_lib

__all__ = ["FORMATS", "check_onnx", "classifier_fn", "export_run"]

FORMATS = ("onnx", "safetensors")


def classifier_fn(run: runs.TrainedRun) -> Any:
    """``uint8 (B, H, W, C) -> {"embedding", "probs"}``: normalisation and the run's eval step, weights closed over."""
    state = jax.device_get(run.state)
    step = steps_lib.make_eval_step(run.model, run.cfg)

    def fn(images: jax.Array) -> dict[str, jax.Array]:
        x = (images.astype(jnp.float32) * (1.0 / 255.0) - NORM_MEAN) * (1.0 / NORM_STD)
        return step(state, {"image": x})

    return fn


def _meta(run: runs.TrainedRun) -> dict[str, Any]:
    """What a consumer needs besides the weights."""
    gei = run.global_emb
    return {"arch": run.cfg.model.arch, "class_names": list(run.class_names), "checkpoint_step": run.step,
            "head": "gei" if gei is not None else "linear", "tau": run.cfg.loss.tau,
            "global_emb": None if gei is None else np.asarray(jax.device_get(gei)).tolist(),
            "image_size": run.cfg.data.image_size, "channels": run.cfg.data.channels,
            "input": f"uint8 frames (B, H, W, C); normalised as (x / 255 - {NORM_MEAN}) / {NORM_STD}",
            "prediction": ("softmax(cosine(embedding, global_emb) / tau)" if gei is not None
                           else "softmax(fc(pooled features))")}


def check_onnx(run: runs.TrainedRun, path: str | Path, max_images: int = 32) -> dict[str, Any]:
    """Max |difference| of the ONNX model (ONNX Runtime) and ``runs.predict`` on the run's test frames."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("--check needs onnxruntime: pip install 'lclsc_jax[onnx]'") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = int(sess.get_inputs()[0].shape[0])
    ds = loop.load_dataset(run.cfg)
    idx = runs.split_indices("test", runs.run_splits(run.workdir, run.cfg, ds), len(ds.labels))[:max_images]
    images = np.stack([np.asarray(ds.source[int(i)]["image"], np.uint8) for i in idx])
    want = runs.predict(run, images)
    got: dict[str, list[np.ndarray]] = {"probs": [], "embedding": []}
    names = [o.name for o in sess.get_outputs()]
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]) if len(chunk) < batch else chunk
        for n, v in zip(names, sess.run(None, {"images": pad})):
            got[n].append(v[:len(chunk)])
    probs = np.concatenate(got["probs"])
    return {"n_images": int(len(images)), "max_abs_probs": float(np.abs(probs - want["probs"]).max()),
            "max_abs_embedding": float(np.abs(np.concatenate(got["embedding"]) - want["embedding"]).max()),
            "same_predictions": bool((probs.argmax(1) == want["probs"].argmax(1)).all())}


def export_run(workdir: str, out: str, fmt: str = "onnx", *, which: str = "best", batch_size: int = 1,
               check: bool = False) -> dict[str, Any]:
    """Export ``workdir``'s checkpoint ``which`` as ``fmt`` to ``out``; returns ``{path, meta[, check]}``.

    ``onnx``: the traced batch size is ``batch_size`` (ONNX shapes are static here; 1 suits a stream
    of frames). ``safetensors``: ``out`` must end in ``.safetensors``; ``<out>.json`` gets the metadata.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if fmt == "safetensors" and not out.endswith(".safetensors"):
        raise ValueError(f"--format safetensors writes a .safetensors file, got {out!r}")
    run = runs.load_run(workdir, which)
    meta = _meta(run)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result: dict[str, Any] = {"path": out, "format": fmt}
    if fmt == "onnx":
        size, ch = run.cfg.data.image_size, run.cfg.data.channels
        example = np.zeros((batch_size, size, size, ch), np.uint8)
        jax_to_onnx(classifier_fn(run), example, out, output_names=["embedding", "probs"],
                    doc=json.dumps({k: v for k, v in meta.items() if k != "global_emb"}))
        if check:
            result["check"] = check_onnx(run, out)
    else:
        interop.export_torch_weights(jax.device_get(run.variables), run.cfg.model.arch, out)
        with open(out + ".json", "w") as f:
            json.dump(meta, f, indent=1)
    result["meta"] = {k: v for k, v in meta.items() if k != "global_emb"}
    return result
