"""Protocols: procedures that load data or runs and drive ``evaluate`` (the layer above data/evaluate).

``audit`` (``lclsc audit-data``): can global image statistics predict the class, patient-wise, and
how well do class-blind maps localise the evidence? See ``docs/protocols.md``.
"""

from lclsc_jax.protocols.audit import CLASSIFIERS, audit_dataset, patient_folds

__all__ = ["CLASSIFIERS", "audit_dataset", "patient_folds"]
