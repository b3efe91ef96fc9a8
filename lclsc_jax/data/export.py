"""Export the simulated pCLE benchmark as PNG frames, mask PNGs and a manifest CSV (``lclsc synth``).

Layout of ``OUT``::

    OUT/manifest.csv                      path,label,patient,mask,sequence,frame,diagnostic,kind
    OUT/images/<patient>/s<seq>_f<frame>.png   8-bit grayscale frame
    OUT/masks/<patient>/s<seq>_f<frame>.png    8-bit mask (255 = lesion evidence, 0 elsewhere)
    OUT/synth_config.json                 the SyntheticConfig that generated it

The manifest reads back with ``--data OUT/manifest.csv`` (paths are relative to it) and gives
exactly the same pixels, labels, patients and masks as ``--data synthetic`` with that config.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lclsc_jax.data.settings import SyntheticConfig
from lclsc_jax.data.synthetic import generate_patient, patient_ids

MANIFEST = "manifest.csv"
COLUMNS = ("path", "label", "patient", "mask", "sequence", "frame", "diagnostic", "kind")


def export_synthetic(config: SyntheticConfig, out_dir: str | os.PathLike,
                     progress: Callable[[int, int], None] | None = None) -> str:
    """Write every frame of ``config`` under ``out_dir``; returns the manifest path.

    ``progress(done, total)`` is called after each patient. Refuses a folder that already holds
    a manifest, so an earlier export is never mixed with a new one.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out / MANIFEST} exists; choose an empty --out folder or delete it")
    rows = []
    for p, pid in enumerate(patient_ids(config)):
        (out / "images" / pid).mkdir(parents=True, exist_ok=True)
        (out / "masks" / pid).mkdir(parents=True, exist_ok=True)
        for rec in generate_patient(config, p):
            stem = f"s{rec['sequence']}_f{rec['frame']:03d}.png"
            img_rel, mask_rel = f"images/{pid}/{stem}", f"masks/{pid}/{stem}"
            Image.fromarray(rec["image"][..., 0]).save(out / img_rel)
            Image.fromarray((rec["mask"] > 0).astype(np.uint8) * 255).save(out / mask_rel)
            rows.append({"path": img_rel, "label": config.classes[rec["label"]], "patient": pid, "mask": mask_rel,
                         "sequence": f"{pid}-s{rec['sequence']}", "frame": rec["frame"],
                         "diagnostic": int(rec["diagnostic"]), "kind": rec["kind"]})
        if progress is not None:
            progress(p + 1, config.num_patients)
    (out / "synth_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / MANIFEST)  # the manifest appears only once every file is written
    return str(out / MANIFEST)


VOLUME_COLUMNS = ("path", "label", "patient", "mask")


def export_volumes(config, out_dir: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> str:
    """Write the brain benchmark ``config`` (a ``BrainConfig``) as NIfTI files under ``out_dir``; returns the manifest.

    Layout: ``OUT/images/<subject>/v<k>.nii.gz`` (float32 (S, S, S, C), the raw generated
    intensities), ``OUT/masks/<subject>/v<k>.nii.gz`` (uint8 lesion mask), ``OUT/manifest.csv``
    (path,label,patient,mask) and ``OUT/brain_config.json``; all with ``brain3d.affine(config)``.
    ``--data OUT/manifest.csv`` at ``image_size = config.size`` reads back the same records as
    ``--data brain3d``. Refuses a folder that already holds a manifest.
    """
    from lclsc_jax.data import brain3d
    from lclsc_jax.data.volumes import write_nifti

    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out / MANIFEST} exists; choose an empty --out folder or delete it")
    aff = brain3d.affine(config)
    rows = []
    for s, sid in enumerate(brain3d.subject_ids(config)):
        for rec in brain3d.generate_subject(config, s):
            img_rel, mask_rel = f"images/{sid}/v{rec['volume']}.nii.gz", f"masks/{sid}/v{rec['volume']}.nii.gz"
            write_nifti(out / img_rel, rec["image"], aff)
            write_nifti(out / mask_rel, rec["mask"].astype(np.uint8), aff)
            rows.append({"path": img_rel, "label": config.classes[rec["label"]], "patient": sid, "mask": mask_rel})
        if progress is not None:
            progress(s + 1, config.n_subjects)
    out.mkdir(parents=True, exist_ok=True)
    (out / "brain_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(VOLUME_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / MANIFEST)
    return str(out / MANIFEST)
