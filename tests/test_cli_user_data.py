"""Users' own data through the `lclsc` command, end to end: a folder and a CSV manifest of real images.

The images are crops of scikit-image's bundled photographs of three textures (brick, grass,
gravel), one texture per class, 3 patients per class (each patient its own region of the
photograph), 3-5 frames per patient: 8-bit grey PNGs plus one RGB PNG and one 16-bit TIFF (so
the conversion paths run), and one non-square frame. The same files are offered as a folder
``ROOT/<class>/<patient>/<frame>`` and as a CSV manifest (relative paths, a ``mask`` column).
One trained run per source is shared by the tests (module-scoped fixtures).
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
import tifffile
from PIL import Image

from lclsc_jax import cli

CLASSES = ("brick", "grass", "gravel")  # scikit-image texture photographs, 512x512 8-bit grey
PATIENTS_PER_CLASS = 3
CROP = 96  # raw crop size in pixels; the run converts to IMAGE_SIZE
IMAGE_SIZE = 32
STEPS = 48  # the tiny CNN separates the textures of unseen patients (test accuracy ~0.9, chance 1/3)
# Validate and checkpoint at half time and at the end (the manifest run stops at half time, then resumes).
TRAIN_SET = [f"train.steps={STEPS}", f"train.eval_every={STEPS // 2}", f"train.checkpoint_every={STEPS // 2}",
             "train.log_every=4", f"data.image_size={IMAGE_SIZE}"]


# ---------------------------------------------------------------------------------------------
# The dataset, written once per module
# ---------------------------------------------------------------------------------------------

def _texture(name: str) -> np.ndarray:
    """The bundled scikit-image photograph ``name`` as uint8 (H, W)."""
    from skimage import data as skdata

    img = np.asarray(getattr(skdata, name)())
    assert img.dtype == np.uint8 and img.ndim == 2, (name, img.shape, img.dtype)
    return img


def _write_dataset(root: Path) -> dict:
    """Write the images (and masks) under ``root``; return what the tests check against.

    Returns ``{"folder": ROOT/frames, "csv": ROOT/manifest.csv, "frames": {patient: n},
    "label": {patient: class}, "files": [(path, class, patient, mask path)], "rgb": path,
    "tif16": path}``. Patient ``k`` of a class takes its frames from its own horizontal band of
    the photograph (rows ``[k*170, k*170+170)``), so patients differ; frames are random crops
    within the band. Masks mark a random disc (PNG, 0/255, the image's own height and width).
    """
    rng = np.random.default_rng(0)
    frames_dir = root / "frames"
    mask_dir = root / "masks"
    mask_dir.mkdir(parents=True)
    info: dict = {"folder": frames_dir, "csv": root / "manifest.csv", "frames": {}, "label": {}, "files": []}
    pid = 0
    for ci, cls in enumerate(CLASSES):
        tex = _texture(cls)
        for k in range(PATIENTS_PER_CLASS):
            pid += 1
            patient = f"pt{pid:02d}"
            n = 3 + (ci + k) % 3  # 3, 4 or 5 frames: the test-set size says which patients were held out
            info["frames"][patient] = n
            info["label"][patient] = cls
            pdir = frames_dir / cls / patient
            pdir.mkdir(parents=True)
            for f in range(n):
                h, w = (CROP, CROP - 16) if (ci, k, f) == (2, 0, 1) else (CROP, CROP)  # one non-square frame
                y = int(rng.integers(k * 170, k * 170 + 170 - h))
                x = int(rng.integers(0, tex.shape[1] - w))
                crop = tex[y:y + h, x:x + w]
                if (ci, k, f) == (0, 1, 0):  # RGB PNG: a tinted colour version of the crop
                    path = pdir / f"f{f}.png"
                    rgb = np.stack([crop, np.clip(crop * 0.9, 0, 255), np.clip(crop * 0.8 + 20, 0, 255)], -1)
                    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(path)
                    info["rgb"] = path
                elif (ci, k, f) == (1, 2, 1):  # 16-bit TIFF
                    path = pdir / f"f{f}.tif"
                    tifffile.imwrite(path, crop.astype(np.uint16) * 257)
                    info["tif16"] = path
                else:
                    path = pdir / f"f{f}.png"
                    Image.fromarray(crop).save(path)
                yy, xx = np.mgrid[:h, :w]
                cy, cx, r = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.15, 0.3) * h
                mask_path = mask_dir / f"{patient}_f{f}.png"
                Image.fromarray((((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.uint8) * 255).save(mask_path)
                info["files"].append((path, cls, patient, mask_path))
    _write_manifest(info["csv"], info["files"])
    return info


def _write_manifest(csv_path: Path, files, masks: bool = True, extra_rows=()) -> Path:
    """A manifest ``path,label,patient[,mask]`` with paths relative to the CSV's folder."""
    base = csv_path.parent
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"] + (["mask"] if masks else []))
        for path, cls, patient, mask in files:
            row = [os.path.relpath(path, base), cls, patient]
            w.writerow(row + ([os.path.relpath(mask, base)] if masks else []))
        for row in extra_rows:
            w.writerow(row)
    return csv_path


# ---------------------------------------------------------------------------------------------
# Running the command
# ---------------------------------------------------------------------------------------------

def _lclsc(env: dict, *args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``lclsc ARGS`` as a user types it, in a fresh process with one CPU device."""
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lclsc_cache"))


@pytest.fixture(scope="module")
def env(cache, tmp_path_factory) -> dict:
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    e["LCLSC_DATA_DIR"] = cache  # the conversion cache, not ~/.cache
    # JAX's persistent compilation cache: the commands below compile the same steps again and
    # again (two runs of one config, cv folds, evaluate/predict/explain); it halves this file's time.
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return e


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return _write_dataset(tmp_path_factory.mktemp("user_data"))


@pytest.fixture(scope="module")
def folder_run(dataset, env, tmp_path_factory) -> Path:
    """A run trained on the folder, given relative to the working directory as a user would."""
    work = tmp_path_factory.mktemp("runs") / "folder"
    _ok(_lclsc(env, "train", "--workdir", work, "--config", "tiny", "--data", "frames", "--set", *TRAIN_SET,
               cwd=dataset["folder"].parent))
    return work


@pytest.fixture(scope="module")
def csv_run(dataset, env, tmp_path_factory) -> dict:
    """A run trained on the manifest in two calls: STEPS // 2 steps, then the same command with STEPS."""
    work = tmp_path_factory.mktemp("runs") / "csv"
    half = [s if not s.startswith("train.steps=") else f"train.steps={STEPS // 2}" for s in TRAIN_SET]
    args = ["train", "--workdir", work, "--config", "tiny", "--data", "manifest.csv", "--set"]
    first = _ok(_lclsc(env, *args, *half, cwd=dataset["csv"].parent))
    train_lines = _jsonl(work / "metrics.jsonl")
    second = _ok(_lclsc(env, *args, *TRAIN_SET, cwd=dataset["csv"].parent))
    return {"work": work, "first": first, "second": second, "after_first": train_lines}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=["folder", "csv"])
def run(request, folder_run, csv_run) -> tuple[str, Path]:
    return request.param, (folder_run if request.param == "folder" else csv_run["work"])


# ---------------------------------------------------------------------------------------------
# train / evaluate / predict / explain on both sources
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_saves_an_absolute_source_and_a_patient_wise_split(run, dataset):
    kind, work = run
    cfg = json.loads((work / "config.json").read_text())
    expected = dataset["folder"] if kind == "folder" else dataset["csv"]
    assert cfg["data"]["source"] == str(expected.resolve())  # usable from any working directory
    splits = json.loads((work / "splits.json").read_text())
    assert splits["class_names"] == list(CLASSES)
    pats = splits["patients"]
    assert set(pats["train"]).isdisjoint(pats["test"]) and set(pats["val"]).isdisjoint(pats["test"])
    assert set(pats["train"]) | set(pats["val"]) | set(pats["test"]) == set(dataset["frames"])
    assert sorted(dataset["label"][p] for p in pats["test"]) == sorted(CLASSES)  # one held-out patient per class
    for split, patients in pats.items():  # counts match the files written, computed independently
        assert splits["counts"][split] == sum(dataset["frames"][p] for p in patients), split
    assert any(d.isdigit() and int(d) == STEPS for d in os.listdir(work / "checkpoints"))


@pytest.mark.slow
def test_evaluate_scores_every_frame_of_the_held_out_patients(run, dataset, env, tmp_path):
    kind, work = run
    r = _ok(_lclsc(env, "evaluate", "--workdir", work, cwd=tmp_path))  # another working directory
    m = json.loads((work / "eval" / "metrics.json").read_text())
    test_patients = json.loads((work / "splits.json").read_text())["patients"]["test"]
    n_test = sum(dataset["frames"][p] for p in test_patients)
    assert m["split"] == "test" and m["n"] == n_test and f"({n_test} images" in r.stdout
    assert m["class_names"] == list(CLASSES)
    assert int(np.sum(m["confusion_matrix"])) == n_test
    assert {p: v["n"] for p, v in m["per_patient"].items()} == {p: dataset["frames"][p] for p in test_patients}
    assert {v["majority_label_name"] for v in m["per_patient"].values()} == set(CLASSES)
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["auroc"] <= 1
    assert m["accuracy"] > 0.5, m["accuracy"]  # chance is 1/3: the textures were learnt
    for fig in ("confusion_matrix.png", "roc.png", "confidence.png", "per_patient.png"):
        assert (work / "eval" / fig).stat().st_size > 1000, fig


def _probe_images(dataset) -> list[Path]:
    """One frame of a test-set-like mix: the RGB PNG, the 16-bit TIFF, and two 'f0.png' of different patients."""
    f0 = [p for p, _, _, _ in dataset["files"] if p.name == "f0.png"]
    return [dataset["rgb"], dataset["tif16"], f0[0], f0[-1]]


@pytest.mark.slow
def test_predict_table_and_json_agree(run, dataset, env):
    _, work = run
    images = _probe_images(dataset)
    table = _ok(_lclsc(env, "predict", "--workdir", work, *images)).stdout.strip().splitlines()
    rows = [json.loads(line) for line in _ok(_lclsc(env, "predict", "--workdir", work, *images, "--json"))
            .stdout.strip().splitlines()]
    assert len(table) == len(rows) == len(images)
    for line, row, path in zip(table, rows, images):
        cols = line.split("\t")
        assert cols[0] == row["path"] == str(path)
        assert cols[1] == row["class"] and row["class"] in CLASSES
        assert list(row["probabilities"]) == list(CLASSES)
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
        assert row["probability"] == max(row["probabilities"].values())
        assert abs(float(cols[2]) - row["probability"]) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradient"])  # a stage method and a stage-free (input) method
def test_explain_writes_maps_of_the_image_shape(run, dataset, env, tmp_path, method):
    _, work = run
    images = _probe_images(dataset)
    out = tmp_path / "maps"
    r = _ok(_lclsc(env, "explain", "--workdir", work, "--method", method, *images, "--out", out))
    npys = sorted(out.glob(f"*_{method}.npy"))
    pngs = sorted(out.glob(f"*_{method}.png"))
    assert len(npys) == len(pngs) == len(images), r.stdout  # the two 'f0.png' did not overwrite each other
    for p in npys:
        a = np.load(p)
        assert a.shape == (IMAGE_SIZE, IMAGE_SIZE) and a.dtype == np.float32, (p, a.shape)
        assert np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 1, p
    for p in pngs:
        assert p.stat().st_size > 1000 and str(p) in r.stdout


# ---------------------------------------------------------------------------------------------
# benchmark-cams on the manifest's masks, resuming, cross-validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_cams_uses_the_manifest_masks(csv_run, env, dataset):
    work = csv_run["work"]
    _ok(_lclsc(env, "benchmark-cams", "--workdir", work, "--methods", "gradcam", "--stages", "last"))
    bench = json.loads((work / "cam_benchmark" / "cam_benchmark.json").read_text())
    test_patients = json.loads((work / "splits.json").read_text())["patients"]["test"]
    assert bench["split"] == "test" and len(bench["indices"]) == sum(dataset["frames"][p] for p in test_patients)
    rows = [r for r in csv.DictReader(open(work / "cam_benchmark" / "cam_benchmark.csv")) if r["method"] == "gradcam"]
    assert len(rows) == 1 and not rows[0]["error"], rows
    assert int(rows[0]["n_images"]) == len(bench["indices"])
    assert 0 <= float(rows[0]["dice@otsu"]) <= 1 and 0 <= float(rows[0]["pointing_game"]) <= 1


@pytest.mark.slow
def test_rerun_with_more_steps_resumes_from_the_checkpoint(csv_run):
    half = STEPS // 2
    first = [r["step"] for r in csv_run["after_first"] if r["split"] == "train"]
    assert first and max(first) == half
    lines = _jsonl(csv_run["work"] / "metrics.jsonl")
    train_steps = [r["step"] for r in lines if r["split"] == "train"]
    # the second call appended steps after `half` only: it restored the checkpoint instead of starting over
    assert train_steps[:len(first)] == first and all(s > half for s in train_steps[len(first):])
    assert max(train_steps) == STEPS and len(train_steps) == len(set(train_steps))
    assert f"finished at step {half}" in csv_run["first"].stdout
    assert f"finished at step {STEPS}" in csv_run["second"].stdout


@pytest.mark.slow
def test_cv_on_a_manifest_tests_every_patient_once(dataset, env, tmp_path):
    work = tmp_path / "cv"
    r = _ok(_lclsc(env, "cv", "--workdir", work, "--config", "tiny", "--data", dataset["csv"], "--folds", "3",
                   "--no-progress", "--no-figures", "--set", "train.steps=4", f"data.image_size={IMAGE_SIZE}"))
    s = json.loads((work / "cv_summary.json").read_text())
    assert s["n_folds"] == 3 and s["class_names"] == list(CLASSES) and "3-fold CV" in r.stdout
    assert s["n_records"] == len(dataset["files"]) and s["n_patients"] == len(dataset["frames"])
    tested = [p for f in s["folds"] for p in f["test_patients"]]
    assert sorted(tested) == sorted(dataset["frames"])  # each patient held out exactly once
    for f in s["folds"]:
        assert f["n_test"] == sum(dataset["frames"][p] for p in f["test_patients"])
        assert sorted(dataset["label"][p] for p in f["test_patients"]) == sorted(CLASSES)  # stratified
    assert 0 <= s["pooled"]["accuracy"] <= 1


@pytest.mark.slow
def test_ablate_on_a_folder_without_masks(dataset, env, tmp_path):
    """A one-run sweep on the folder: trained and evaluated; the saliency benchmark is skipped (no masks)."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"variants": {"lcl_sc": {"loss.name": "lcl_sc"}}}))
    out = tmp_path / "ablation"
    _ok(_lclsc(env, "ablate", "--grid", grid, "--config", "tiny", "--seeds", "0", "--workers", "0",
               "--no-faithfulness", "--out", out, "--set", "data.source=frames", "train.steps=4",
               f"data.image_size={IMAGE_SIZE}", cwd=dataset["folder"].parent))
    (res_path,) = out.glob("runs/*/results.json")
    res = json.loads(res_path.read_text())
    assert 0 <= res["metrics"]["accuracy"] <= 1 and "no masks" in res["metrics"]["note"]
    assert "lcl_sc" in (out / "ablation.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2 and a message naming the file (and CSV line)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def user_cache(cache, monkeypatch):
    monkeypatch.setenv("LCLSC_DATA_DIR", cache)
    return cache


def _train_fails(capsys, tmp_path, data: Path) -> str:
    work = tmp_path / "run"
    code = cli.main(["train", "--workdir", str(work), "--config", "tiny", "--data", str(data), "--no-progress",
                     "--set", f"data.image_size={IMAGE_SIZE}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not work.exists(), "a rejected --data must not leave a run behind"
    return err


def test_manifest_row_pointing_nowhere(dataset, tmp_path, capsys, user_cache):
    bad = _write_manifest(dataset["csv"].parent / "nowhere.csv", dataset["files"][:6], masks=False,
                          extra_rows=[["frames/brick/pt01/f9.png", "brick", "pt01"]])
    err = _train_fails(capsys, tmp_path, bad)
    assert f"{bad} line 8" in err and "f9.png" in err and "does not exist" in err


def test_truncated_image_in_a_manifest(dataset, tmp_path, capsys, user_cache):
    broken = dataset["csv"].parent / "broken" / "broken.png"  # outside the class folders the runs use
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(Path(dataset["files"][0][0]).read_bytes()[:200])
    bad = _write_manifest(dataset["csv"].parent / "truncated.csv", dataset["files"][:3], masks=False,
                          extra_rows=[["broken/broken.png", "grass", "pt77"]])
    err = _train_fails(capsys, tmp_path, bad)
    assert f"{bad} line 5" in err and str(broken) in err and "truncated" in err


def test_empty_class_folder(dataset, tmp_path, capsys, user_cache):
    import shutil

    root = tmp_path / "frames"
    shutil.copytree(dataset["folder"], root)
    (root / "marble" / "pt99").mkdir(parents=True)  # a class folder with a patient but no frames
    err = _train_fails(capsys, tmp_path, root)
    assert str(root / "marble") in err and "no images" in err


def test_label_without_training_rows_in_a_split_manifest(dataset, tmp_path, capsys, user_cache):
    """A ``split`` column that puts every 'gravel' patient in val/test: the model could never learn 'gravel'."""
    split_of = {"pt01": "train", "pt02": "val", "pt03": "test", "pt04": "train", "pt05": "val", "pt06": "test",
                "pt07": "val", "pt08": "test", "pt09": "test"}
    bad = dataset["csv"].parent / "split.csv"
    with open(bad, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient", "split"])
        for path, cls, patient, _ in dataset["files"]:
            w.writerow([os.path.relpath(path, bad.parent), cls, patient, split_of[patient]])
    line = 2 + [cls for _, cls, _, _ in dataset["files"]].index("gravel")
    err = _train_fails(capsys, tmp_path, bad)
    assert f"{bad} line {line}" in err and "'gravel'" in err and "no training rows" in err


@pytest.mark.slow
def test_evaluate_other_data_unknown_label_and_class_subset(folder_run, dataset, tmp_path, capsys, user_cache):
    """``evaluate --data``: a label the run does not know names its CSV line; a subset of the classes is scored."""
    files = [f for f in dataset["files"] if f[1] != "gravel"]
    here = Path(files[0][0]).parents[3]  # manifests live above the frames (paths may not leave their folder)
    bad = _write_manifest(here / "other.csv", files[:5], masks=False,
                          extra_rows=[[os.path.relpath(files[5][0], here), "marble", "pt50"]])
    assert cli.main(["evaluate", "--workdir", str(folder_run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 7" in err and "unknown label 'marble'" in err

    subset = _write_manifest(here / "subset.csv", files, masks=False)  # brick and grass only
    out = tmp_path / "eval_subset"
    assert cli.main(["evaluate", "--workdir", str(folder_run), "--data", str(subset), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "all" and m["n"] == len(files) and m["class_names"] == list(CLASSES)
    assert {v["majority_label_name"] for v in m["per_patient"].values()} == {"brick", "grass"}


def test_explain_output_names_do_not_collide():
    names = cli._output_names(["/d/a/p1/0001.png", "/d/b/p2/0001.png", "/d/b/p2/0002.tif"])
    assert names == ["a_p1_0001.png", "b_p2_0001.png", "b_p2_0002.tif"]
    assert cli._output_names(["x/1.png", "y/2.png"]) == ["1.png", "2.png"]
    assert len({os.path.splitext(n)[0] for n in cli._output_names(["x/1.png", "x/1.tif"])}) == 2
