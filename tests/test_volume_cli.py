"""The whole 3D path through the `lclsc` command, as a user types it (issue 18).

generate (``synth --volumes``) -> train (on the exported NIfTI manifest) -> explain (NIfTI maps
aligned with the input, PNG figures) -> ``relevance train`` -> ``explain --method
perturbation_generator`` -> ``benchmark-cams`` (Dice/IoU/HD95 against the masks) -> ``verify``
(a MONAI 3D ResNet's weights). Plus a real scan: nibabel's bundled ``anatomical.nii`` (a
33x41x25 T1 MRI, big-endian int16, 2 mm voxels, a flipped x axis) goes through the same data
path, and the written map must sit on the same world coordinates as the scan (checked from the
two affines in closed form). Bad input gets a clear error naming the file.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

SIZE = 16
SUBJECTS = 12
TRAIN = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2",
         f"data.image_size={SIZE}"]


def _lclsc(env: dict, *args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``lclsc ARGS`` in a fresh process with one CPU device."""
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e["LCLSC_DATA_DIR"] = str(tmp_path_factory.mktemp("cache3d"))
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache3d"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return e


@pytest.fixture(scope="module")
def exported(env, tmp_path_factory) -> Path:
    """``lclsc synth --volumes``: the benchmark as NIfTI files and a manifest."""
    out = tmp_path_factory.mktemp("synth3d") / "brain"
    r = _ok(_lclsc(env, "synth", "--volumes", "--out", out, "--size", 24, "--patients", SUBJECTS))
    assert "written:" in r.stdout
    return out


@pytest.fixture(scope="module")
def run(env, exported, tmp_path_factory) -> Path:
    """A tiny 3D classifier trained on the exported manifest, then its perturbation generator."""
    work = tmp_path_factory.mktemp("runs3d") / "r"
    _ok(_lclsc(env, "train", "--workdir", work, "--config", "tiny3d", "--data", exported / "manifest.csv",
               "--set", *TRAIN))
    r = _ok(_lclsc(env, "relevance", "train", "--workdir", work, "--steps", 3, "--batch-size", 2, "--log-every", 1))
    assert "generator at step 3" in r.stdout
    return work


def _manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_synth_volumes_writes_aligned_volumes_and_masks(exported):
    rows = _manifest(exported / "manifest.csv")
    assert len(rows) == SUBJECTS and {r["label"] for r in rows} == {"ring", "solid", "diffuse"}
    img = nib.load(exported / rows[0]["path"])
    mask = nib.load(exported / rows[0]["mask"])
    assert img.shape[:3] == (24, 24, 24) and mask.shape[:3] == (24, 24, 24)
    np.testing.assert_array_equal(img.affine, mask.affine)
    m = np.asarray(mask.dataobj)
    assert 0 < m.sum() < m.size / 4 and set(np.unique(m)) <= {0, 1}


@pytest.mark.slow
def test_train_on_volumes_records_a_3d_run(run, exported):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["arch"] == "tiny3d" and cfg["data"]["image_size"] == SIZE
    assert cfg["data"]["source"] == str((exported / "manifest.csv").resolve())
    splits = json.loads((run / "splits.json").read_text())
    pats = splits["patients"]
    assert set(pats["train"]).isdisjoint(pats["test"])
    assert sum(splits["counts"].values()) == SUBJECTS
    assert (run / "relevance").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "perturbation_generator"])
def test_explain_writes_nifti_maps_on_the_input_world_grid(env, run, exported, tmp_path, method):
    rows = _manifest(exported / "manifest.csv")
    vol = exported / rows[0]["path"]
    r = _ok(_lclsc(env, "explain", "--workdir", run, "--method", method, vol, "--out", tmp_path))
    nii = tmp_path / f"v0_{method}.nii.gz"
    assert str(nii) in r.stdout and (tmp_path / f"v0_{method}.png").stat().st_size > 10_000
    out = nib.load(nii)
    data = np.asarray(out.dataobj)
    assert data.shape == (SIZE,) * 3 and np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1 + 1e-6
    # The 24^3 input resampled to 16^3: the grid's centre and corners are the same world points.
    src = nib.load(vol).affine
    for corner_out, corner_in in (((SIZE - 1) / 2,) * 3, ((24 - 1) / 2,) * 3), ((-0.5,) * 3, (-0.5,) * 3):
        np.testing.assert_allclose(out.affine @ [*corner_out, 1], src @ [*corner_in, 1], atol=1e-4)


@pytest.mark.slow
def test_benchmark_cams_scores_volumes_against_masks(env, run, tmp_path):
    out = tmp_path / "bench"
    r = _ok(_lclsc(env, "benchmark-cams", "--workdir", run, "--methods", "gradcam", "perturbation_generator",
                   "--stages", "stage3", "--split", "all", "--max-images", 4, "--no-specificity", "--out", out))
    assert "hd95" in r.stdout.lower()
    rows = json.loads((out / "cam_benchmark.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    methods = {row["method"] for row in rows}
    assert {"gradcam", "perturbation_generator"} <= methods and any(m.startswith("blind:") for m in methods)
    for row in rows:
        assert not row.get("error"), row
        assert 0.0 <= row["dice@area"] <= 1.0


@pytest.mark.slow
@pytest.mark.torch
def test_verify_monai_resnet_weights(env, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    from lclsc_jax.interop import monai3d

    net = monai3d.random_monai_resnet("resnet18_3d", in_channels=1, num_classes=3, seed=1)
    path = tmp_path / "monai_r18.pt"
    torch.save(net.state_dict(), path)
    r = _ok(_lclsc(env, "verify", "--torch-weights", path, "--arch", "resnet18_3d", "--image-size", 32))
    assert "logits" in r.stdout


# ---------------------------------------------------------------------------------------------
# A real scan and bad input
# ---------------------------------------------------------------------------------------------

def _anatomical() -> Path:
    return Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory) -> Path:
    """Six "patients" cut from nibabel's real anatomical MRI (each its own sub-volume, its own affine), two classes.

    Class ``lesion`` gets a bright ball (the mask) and ``clean`` none; one volume is written as
    ``.npy`` (identity affine) to exercise that reader.
    """
    src = nib.load(_anatomical())
    arr = np.asarray(src.dataobj).astype(np.float32)  # (33, 41, 25) big-endian int16 on disk
    root = tmp_path_factory.mktemp("anat")
    rows = []
    for k in range(6):
        off = np.array([k % 3, k, k % 2])
        sub = arr[off[0]:off[0] + 30, off[1]:off[1] + 34, off[2]:off[2] + 22].copy()
        aff = src.affine.copy()
        aff[:3, 3] = src.affine[:3, :3] @ off + src.affine[:3, 3]  # the sub-volume's own world position
        mask = np.zeros(sub.shape, np.uint8)
        label = "lesion" if k % 2 == 0 else "clean"
        if label == "lesion":
            g = np.indices(sub.shape).transpose(1, 2, 3, 0) - np.array([15, 17, 11])
            mask[(g**2).sum(-1) <= 25] = 1
            sub[mask.astype(bool)] += sub.max()
        name = f"p{k}.npy" if k == 5 else f"p{k}.nii.gz"
        if k == 5:
            np.save(root / name, sub)
        else:
            nib.save(nib.Nifti1Image(sub, aff), root / name)
        nib.save(nib.Nifti1Image(mask, aff if k != 5 else np.eye(4)), root / f"m{k}.nii.gz")
        rows.append({"path": name, "label": label, "patient": f"P{k}", "mask": f"m{k}.nii.gz"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "patient", "mask"])
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.mark.slow
def test_real_mri_trains_and_maps_land_on_the_scan(env, real_manifest, tmp_path):
    work = tmp_path / "anat_run"
    _ok(_lclsc(env, "train", "--workdir", work, "--config", "tiny3d", "--data", real_manifest, "--set", *TRAIN,
               "data.val_fraction=0.34", "data.test_fraction=0.34", "train.batch_size=2"))
    scan = real_manifest.parent / "p0.nii.gz"
    _ok(_lclsc(env, "explain", "--workdir", work, "--method", "gradcam", scan, "--out", tmp_path / "maps"))
    out = nib.load(tmp_path / "maps" / "p0_gradcam.nii.gz")
    src = nib.load(scan)
    # Zoomed to 16^3: voxel centres map as x_in = (x_out + 1/2) * n_in / 16 - 1/2 per axis (closed form).
    n_in = np.array(src.shape[:3], float)
    for v_out in ((0, 0, 0), (15, 15, 15), (3, 9, 12)):
        v_in = (np.array(v_out) + 0.5) * n_in / SIZE - 0.5
        np.testing.assert_allclose(out.affine @ [*v_out, 1], src.affine @ [*v_in, 1], atol=1e-4)


@pytest.mark.slow
def test_bad_volume_input_names_the_file(env, real_manifest, tmp_path):
    bad = real_manifest.parent / "bad.csv"  # next to the volumes: its relative paths resolve there
    rows = _manifest(real_manifest)
    rows[2]["path"] = str(real_manifest.parent / "missing.nii.gz")
    with open(bad, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = _lclsc(env, "train", "--workdir", tmp_path / "w", "--config", "tiny3d", "--data", bad, "--set", *TRAIN)
    assert r.returncode == 2 and "missing.nii.gz" in r.stderr, r.stderr[-2000:]
    # A 2D arch on volumes, and a 3D arch on the pCLE simulator: one clear line each.
    r = _lclsc(env, "train", "--workdir", tmp_path / "w2", "--config", "tiny", "--data", real_manifest)
    assert r.returncode == 2 and "3D arch" in r.stderr, r.stderr[-2000:]
    r = _lclsc(env, "train", "--workdir", tmp_path / "w3", "--config", "tiny3d", "--set", "data.source=synthetic")
    assert r.returncode == 2 and "brain3d" in r.stderr, r.stderr[-2000:]
