"""The named ablation grids (pure data, no JAX: ``lclsc ablate --help`` lists them)."""

from __future__ import annotations

from typing import Any

#: The paper study's data and schedule (both of its sub-grids): see the "paper" grid below.
_PAPER_DATA: dict[str, Any] = {
    "synthetic.num_patients": 24, "synthetic.images_per_patient": 16, "synthetic.lesion_extent": [0.3, 0.5],
    "train.steps": 400, "train.batch_size": 32, "train.warmup_steps": 20,
    "train.eval_every": 400, "train.checkpoint_every": 200, "train.log_every": 50}

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
    # The paper study (issue 15; docs/protocols.md, "Ablations", "The paper preset"): a replicate is one
    # (split seed, training seed) pair, each a 5-fold patient-wise CV, every test frame scored (saliency,
    # class specificity, ROAD), paired comparisons with a hierarchical bootstrap over patients and frames.
    # Shrunk to a 2-core CPU: the demo's tiny CNN at 64x64 (the lesion fibres' 12-16 um period needs >= 3 px
    # of the 240 um field), 24 patients of 16 frames (8 per class: every fold tests patients of each class;
    # more patients, fewer frames: the patients are the unit of the bootstrap), 400 steps of batch 32, ROAD
    # at 3 percentages, and lesions of 0.3-0.5 of the field: at the demo's 0.1-0.3, 400 steps left CE and
    # LCL-SC at chance (0.30 on held-out patients; 0.55/0.56 with the larger lesions; docs/protocols.md).
    # On a cluster, the same preset with more: --split-seeds 0 1 2 --seeds 0 1 2 3 4 and
    # --set train.steps=1000 synthetic.images_per_patient=40 synthetic.lesion_extent=0.1,0.3 (the demo's data).
    "paper": [
        {"base_config": "demo", "overrides": _PAPER_DATA, "seeds": [0, 1, 2], "split_seeds": [0], "folds": 5,
         "saliency_images": 0,  # every test frame of every fold
         "road_percentages": [20, 50, 80],
         "variants": {
             # Objectives: CE (linear head), SupCon, LCL (GEI, no SC), LCL-SC.
             "ce": {"loss.name": "ce"},
             "supcon": {"loss.name": "supcon"},
             "lcl": {"loss.name": "lcl"},
             "lcl_sc": {"loss.name": "lcl_sc"},  # alpha = -1 (top - bottom, the default), k_max = k_min = 0.10
         }},
        # The SC ablations, one training seed each on the 2-core machine (the same 5-fold CV, paired with
        # ce's seed-0 replicate); --seeds 0 1 2 gives them three like the objectives.
        {"overrides": _PAPER_DATA, "seeds": [0],
         "variants": {
             # TK-MMP pooling: top-k only (alpha = 0), WILDCAT (alpha = +1).
             "lcl_sc_topk": {"loss.name": "lcl_sc", "loss.alpha": 0.0},
             "lcl_sc_wildcat": {"loss.name": "lcl_sc", "loss.alpha": 1.0},
             # k sweep, k_max = k_min (fractions of the 8x8 map: 1, 3, 6, 16 cells); k = 0.10 is lcl_sc itself.
             "lcl_sc_k0.01": {"loss.name": "lcl_sc", "loss.k_max": 0.01, "loss.k_min": 0.01},
             "lcl_sc_k0.05": {"loss.name": "lcl_sc", "loss.k_max": 0.05, "loss.k_min": 0.05},
             "lcl_sc_k0.25": {"loss.name": "lcl_sc", "loss.k_max": 0.25, "loss.k_min": 0.25},
             # SC tied to the decision (docs/method.md): the KL consistency term, and maps that decompose
             # the GEI cosine exactly (a linear projection head).
             "lcl_sc_consistency": {"loss.name": "lcl_sc", "loss.w_consistency": 1.0},
             "lcl_sc_decomposed": {"loss.name": "lcl_sc", "loss.sc_maps": "decomposed",
                                   "model.projection_layers": 1},
         }},
    ],
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
