"""Protocols: procedures that load data or trained runs and drive ``evaluate`` (above ``train``).

``inference`` (load a run, its splits, predict, evaluate), ``cross_validation`` (patient-wise k-fold /
LOPO), ``cam_benchmark`` (saliency methods x stages vs masks), ``ablation`` (sweeps) and ``audit``
(``lclsc audit-data``: shortcuts in global statistics, class-blind maps). See ``docs/protocols.md``.
"""

from lclsc_jax.protocols.ablation import ABLATION_GRIDS, ablation_table, expand_grid, run_ablation, write_slurm_script
from lclsc_jax.protocols.audit import CLASSIFIERS, audit_dataset, patient_folds
from lclsc_jax.protocols.cam_benchmark import benchmark_cams
from lclsc_jax.protocols.cross_validation import cross_validate, cv_folds

__all__ = ["ABLATION_GRIDS", "CLASSIFIERS", "ablation_table", "audit_dataset", "benchmark_cams", "cross_validate",
           "cv_folds", "expand_grid", "patient_folds", "run_ablation", "write_slurm_script"]
