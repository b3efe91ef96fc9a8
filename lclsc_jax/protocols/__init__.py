"""Protocols: procedures that load data or trained runs and drive ``evaluate`` (above ``train``).

``runs`` (load a run, its splits, predict, evaluate), ``cross_validation`` (patient-wise k-fold /
LOPO), ``cam_benchmark`` (saliency methods x stages vs masks), ``ablation`` (sweeps; the named grids
in ``grids``), ``audit`` (``lclsc audit-data``: shortcuts in global statistics, class-blind maps) and
``sanity`` (``lclsc sanity``: model and label randomisation checks of saliency maps).
See ``docs/protocols.md``. Names load on first use, so ``lclsc --help`` does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ABLATION_GRIDS": "grids", "ablation_table": "ablation", "expand_grid": "ablation", "run_ablation": "ablation",
    "write_slurm_script": "ablation", "CLASSIFIERS": "audit", "audit_dataset": "audit", "patient_folds": "audit",
    "benchmark_cams": "cam_benchmark", "cross_validate": "cross_validation", "cv_folds": "cross_validation",
    "evaluate_robustness": "robustness",
    "sanity_checks": "sanity", "shuffled_label_dataset": "sanity",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'lclsc_jax.protocols' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lclsc_jax.protocols.{_HOME[name]}"), name)
