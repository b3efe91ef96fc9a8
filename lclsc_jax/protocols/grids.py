"""The named ablation grids (pure data, no JAX: ``lclsc ablate --help`` lists them)."""

from __future__ import annotations

from typing import Any

#: Named grids. A grid is ``{"variants": {name: overrides}, "axes": {key: [values]}, "overrides": {...}}``
#: (variants x the cartesian product of axes), or a list of such grids run together.
ABLATION_GRIDS: dict[str, Any] = {
    # 2-core CPU: the demo preset (tiny CNN, 64x64) with fewer steps, ~40 min for 12 runs.
    "quick": {
        "base_config": "demo",
        "overrides": {"train.steps": 300, "train.eval_every": 100, "train.checkpoint_every": 100},
        "seeds": [0, 1, 2],
        "variants": {
            "ce": {"loss.name": "ce"},
            "lcl": {"loss.name": "lcl"},
            "lcl_sc": {"loss.name": "lcl_sc"},
            "lcl_sc_no_tkmmp": {"loss.name": "lcl_sc", "loss.k_max": 1.0, "loss.alpha": 0.0},
        },
    },
    # The full study (for a cluster; docs/protocols.md, "Ablations"): losses, pooling, EMA momentum, k, tau.
    "full": [
        {"variants": {
            "ce": {"loss.name": "ce"},
            "supcon": {"loss.name": "supcon"},
            "lcl": {"loss.name": "lcl"},
            "lcl_sc": {"loss.name": "lcl_sc"},
            "lcl_sc_no_tkmmp": {"loss.name": "lcl_sc", "loss.k_max": 1.0, "loss.alpha": 0.0},
            "lcl_sc_wildcat": {"loss.name": "lcl_sc", "loss.alpha": 1.0},
        }},
        {"variants": {"lcl_sc": {"loss.name": "lcl_sc"}}, "axes": {"loss.ema_momentum": [0.9, 0.999]}},
        {"variants": {"lcl_sc": {"loss.name": "lcl_sc"}}, "axes": {"loss.k_max": [0.05, 0.25],
                                                                   "loss.k_min": [0.05, 0.25]}},
        {"variants": {"lcl_sc": {"loss.name": "lcl_sc"}}, "axes": {"loss.tau": [0.05, 0.2]}},
    ],
}
