"""What a run learns to predict: the tissue class (default) or the non-diagnostic flag (a frame filter).

``data.target=diagnostic`` turns any dataset whose frames carry a diagnostic flag (the simulator's,
or a manifest's ``diagnostic`` column) into a two-class problem with the classes
:data:`FILTER_CLASSES`, so the whole training machinery (splits, checkpoints, sharding, predict)
trains the first stage of a two-stage model. The patient-wise split stays the one the tissue
classifier draws with the same ``data.split_seed`` (it is stratified by the tissue class), so the
filter and the classifier never see each other's test patients.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lclsc_jax.data.cache import Dataset
from lclsc_jax.data.io import DataError

#: Targets a run may learn (``data.target``).
TARGETS = ("class", "diagnostic")
#: Class names of a frame filter run: index 1 is "diagnostic", so ``probs[:, 1]`` is P(diagnostic).
FILTER_CLASSES = ("non_diagnostic", "diagnostic")


class RelabelledSource:
    """A record source whose ``label`` is replaced by ``labels[i]``; everything else passes through."""

    def __init__(self, source, labels: np.ndarray):
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} records")
        self._src = source
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict:
        return {**self._src[i], "label": int(self._labels[int(i)])}

    def __getitems__(self, idx) -> list[dict]:
        """Batched read through the wrapped source's own batched read."""
        idx = [int(i) for i in idx]
        recs = self._src.__getitems__(idx) if hasattr(self._src, "__getitems__") else [self._src[i] for i in idx]
        return [{**r, "label": int(self._labels[i])} for r, i in zip(recs, idx)]

    def __repr__(self) -> str:
        return f"RelabelledSource({self._src!r})"


def with_target(ds: Dataset, target: str) -> Dataset:
    """``ds`` relabelled for ``target`` (``class``: unchanged; ``diagnostic``: :data:`FILTER_CLASSES`)."""
    if target not in TARGETS:
        raise ValueError(f"data.target must be one of {TARGETS}, got {target!r}")
    if target == "class":
        return ds
    if ds.diagnostic is None:
        raise DataError(f"data.target=diagnostic needs a diagnostic flag per frame, and {ds.path or 'the data'} has "
                        "none: use the simulator (data.source=synthetic) or add a 'diagnostic' column (1/0) to the "
                        "CSV manifest")
    flag = np.asarray(ds.diagnostic, bool)
    if flag.all() or not flag.any():
        raise DataError(f"data.target=diagnostic: every frame is {'diagnostic' if flag.all() else 'non-diagnostic'}, "
                        "so there is nothing to learn (the simulator's synthetic.nondiagnostic_fraction must be > 0)")
    labels = flag.astype(np.int32)
    return dataclasses.replace(ds, source=RelabelledSource(ds.source, labels), class_names=FILTER_CLASSES,
                               labels=labels, has_masks=False,
                               strata=ds.labels if ds.strata is None else ds.strata)
