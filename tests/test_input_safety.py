"""User input that must not lose or mix up a run: --set, folder/CSV sources, splits, weights, intervals, explain outputs.

The images are crops of scikit-image's bundled brick photograph (8-bit grey), written as PNGs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lclsc_jax import cli, data
from lclsc_jax.data import io as data_io
from lclsc_jax.data import splits as data_splits
from lclsc_jax.evaluate.metrics import aggregate_folds, classification_metrics
from lclsc_jax.train import config as C

SET_COMMANDS = [["train", "--workdir", "w"], ["cv", "--workdir", "w"], ["audit-data", "--data", "x"],
                ["ablate", "--out", "o"], ["demo"], ["config"]]


def _png(path: Path, size: int = 24, seed: int = 0) -> Path:
    """A ``size`` x ``size`` crop of scikit-image's brick photograph, saved as an 8-bit PNG at ``path``."""
    from skimage import data as skdata

    img = np.asarray(skdata.brick())
    r, c = np.random.default_rng(seed).integers(0, img.shape[0] - size, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[r:r + size, c:c + size]).save(path)
    return path


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Write a ``path,label,patient`` CSV manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------ --set


@pytest.mark.parametrize("command", SET_COMMANDS, ids=lambda c: c[0])
def test_repeated_set_accumulates_in_every_subcommand(command):
    args = cli.build_parser().parse_args(command + ["--set", "a=1", "--set", "b=2", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]


def test_repeated_set_reaches_the_config(capsys):
    argv = ["config", "--set", "model.arch=tiny", "--set", "data.image_size=64", "--set", "train.steps=120"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert '"arch": "tiny"' in out and '"image_size": 64' in out and '"steps": 120' in out


def test_a_key_set_twice_to_different_values_is_an_error(capsys):
    assert cli.main(["config", "--set", "train.steps=5", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "'train.steps'" in err and "'5'" in err and "'6'" in err
    assert C.parse_overrides(["train.steps=5", "train.steps = 5"]) == {"train.steps": "5"}  # the same value: fine


# ------------------------------------------------------------------------------ folder sources


def test_patient_under_two_class_folders_is_an_error(tmp_path):
    _png(tmp_path / "benign" / "p1" / "a.png")
    _png(tmp_path / "malign" / "p1" / "b.png", seed=1)
    with pytest.raises(data.DataError, match="patient 'p1'") as e:
        data.scan_folder(tmp_path)
    assert str(tmp_path / "benign" / "p1") in str(e.value) and str(tmp_path / "malign" / "p1") in str(e.value)


def test_hidden_files_are_skipped_with_a_notice(tmp_path):
    root = tmp_path / "frames"
    for k, (cls, pat) in enumerate([("benign", "p1"), ("malign", "p2")]):
        _png(root / cls / pat / "f0.png", seed=k)
        (root / cls / pat / "._f0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with pytest.warns(UserWarning, match=r"skipped 3 hidden") as rec:
        ds = data.load(str(root), image_size=16, cache_dir=tmp_path / "cache")
    notice = next(r for r in rec if "hidden" in str(r.message))
    assert issubclass(notice.category, data_io.DataWarning)
    assert "._f0.png" in str(notice.message) and ".DS_Store" in str(notice.message)
    assert len(ds) == 2 and ds.class_names == ("benign", "malign")


def test_a_tiny_image_is_an_error_naming_it(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(tiny)
    with pytest.raises(data.DataError, match=r"tiny\.png: image is 1x1 px, below the minimum of 4 px"):
        data.load_image_file(tiny, 16)
    assert data.load_image_file(_png(tmp_path / "ok.png", size=4), 16).shape == (16, 16, 1)


# ------------------------------------------------------------------------------ CSV paths


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_paths_outside_its_folder_need_allow_outside_root(tmp_path, where):
    outside = _png(tmp_path / "elsewhere" / "x.png")
    inside = _png(tmp_path / "m" / "imgs" / "y.png", seed=1)
    ref = "../elsewhere/x.png" if where == "parent" else str(outside)
    csv_path = _manifest(tmp_path / "m" / "manifest.csv", [("imgs/y.png", "a", "p1"), (ref, "b", "p2")])
    with pytest.raises(data.DataError, match=r"manifest\.csv line 3: .*outside the manifest's folder") as e:
        data.load(str(csv_path), image_size=16, cache_dir=tmp_path / "cache")
    assert "data.allow_outside_root=true" in str(e.value)
    ds = data.load(str(csv_path), image_size=16, cache_dir=tmp_path / "cache", allow_outside_root=True)
    assert len(ds) == 2
    assert C.load("default", ["data.allow_outside_root=true"]).data.allow_outside_root is True
    assert C.load("default").data.allow_outside_root is False


# ------------------------------------------------------------------------------ splits and metrics


def test_a_class_with_one_patient_warns_at_split_time():
    patients = np.array(["a1", "a1", "a2", "a3", "a4", "a5", "b1", "b1"])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.warns(data_splits.SplitWarning) as rec:
        s = data.patient_split(patients, labels, 0.2, 0.2, seed=0, class_names=("healthy", "glioma"))
    messages = [str(r.message) for r in rec]
    assert any("'glioma'" in m and "no val records" in m for m in messages)
    assert any("'glioma'" in m and "no test records" in m for m in messages)
    assert not any("'healthy'" in m for m in messages)
    assert set(labels[s["test"]].tolist()) == {0}


def test_metrics_name_the_classes_absent_from_the_split():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    m = classification_metrics([0, 1, 0], probs, class_names=["healthy", "glioma", "meningioma"])
    assert m["absent_classes"] == ["meningioma"]
    assert classification_metrics([0, 1, 2], probs, class_names=["x", "y", "z"])["absent_classes"] == []


def test_intervals_of_rates_are_clipped_to_the_unit_interval():
    folds = [{"accuracy": 0.0, "auroc": 1.0, "loss": 0.0, "per_class": {"a": {"recall": 0.0, "support": 3}}},
             {"accuracy": 0.05, "auroc": 0.99, "loss": 0.05, "per_class": {"a": {"recall": 0.6, "support": 3}}},
             {"accuracy": 0.6, "auroc": 0.7, "loss": 0.6, "per_class": {"a": {"recall": 0.0, "support": 3}}}]
    agg = aggregate_folds(folds)["metrics"]
    assert agg["accuracy"]["ci_low"] == 0.0 and 0.0 < agg["accuracy"]["ci_high"] <= 1.0
    assert agg["auroc"]["ci_high"] == 1.0 and 0.0 <= agg["auroc"]["ci_low"] < 1.0
    assert agg["per_class.a.recall"]["ci_low"] == 0.0
    assert agg["loss"]["ci_low"] < 0.0  # not a rate: unchanged
    signed = aggregate_folds(folds, clip_rates=False)["metrics"]  # e.g. paired differences
    assert signed["accuracy"]["ci_low"] < 0.0


# ------------------------------------------------------------------------------ pickled weights


class _Opaque:
    """A Python object in a checkpoint: loading it would need the pickle to run code."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.torch
def test_refusing_a_pickled_pth_explains_how_to_convert_it(tmp_path):
    torch = pytest.importorskip("torch")
    from lclsc_jax import interop

    path = tmp_path / "model.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra": _Opaque()}, path)
    with pytest.raises(interop.UnsafeCheckpointError, match="refusing to load") as e:
        interop.read_state_dict(path)
    msg = str(e.value)
    assert "weights_only" not in msg and "can still be loaded" not in msg and "\x1b[" not in msg
    assert "torch.save(model.state_dict()" in msg and "safetensors.torch.save_file" in msg
    assert "_Opaque" in msg  # what made it unsafe


# ------------------------------------------------------------------------------ explain outputs


def test_explain_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    img = _png(tmp_path / "in" / "f0.png")
    out = tmp_path / "maps"
    out.mkdir()
    (out / "f0_sc.png").write_bytes(b"an earlier overlay")
    argv = ["explain", "--workdir", str(tmp_path / "run"), str(img), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out / "f0_sc.png") in err and "--overwrite" in err
    assert (out / "f0_sc.png").read_bytes() == b"an earlier overlay"
    parser = cli.build_parser()
    cli._refuse_overwrite(parser.parse_args(argv + ["--overwrite"]))  # allowed
    cli._refuse_overwrite(parser.parse_args(argv + ["--method", "gradcam"]))  # other files: nothing to refuse
    (out / "f0_gradcam.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="f0_gradcam.npy exists"):
        cli._refuse_overwrite(parser.parse_args(argv + ["--method", "all"]))
    with pytest.raises(ValueError, match="f0_gradcam.npy exists"):
        cli._refuse_overwrite(parser.parse_args(["explain", "--torch-weights", "w.pth", "--arch", "resnet18",
                                                 str(img), "--out", str(out)]))


def test_cli_prints_the_projects_warnings_as_one_line():
    from lclsc_jax import cli
    from lclsc_jax.data import splits as data_splits

    text = cli._format_warning("a class has no val records", data_splits.SplitWarning, "/x/splits.py", 145)
    assert text == "warning: a class has no val records\n"
    other = cli._format_warning("legend", UserWarning, "/x/plots.py", 106)  # not ours: Python's format
    assert other.startswith("/x/plots.py:106: UserWarning: legend")


# ------------------------------------------------------------------------------ one label per patient (CSV)


def _two_label_manifest(tmp_path: Path) -> Path:
    """A manifest whose patient 'p1' is 'benign' on line 2 and 'malign' on line 4 (line 3: another patient)."""
    for k, name in enumerate(["a.png", "b.png", "c.png"]):
        _png(tmp_path / "m" / name, seed=k)
    return _manifest(tmp_path / "m" / "manifest.csv",
                     [("a.png", "benign", "p1"), ("b.png", "malign", "p2"), ("c.png", "malign", "p1")])


def test_a_patient_with_two_labels_in_a_manifest_is_an_error(tmp_path):
    csv_path = _two_label_manifest(tmp_path)
    with pytest.raises(data.DataError, match="patient 'p1'") as e:
        data.read_manifest(csv_path)
    msg = str(e.value)
    assert f"{csv_path} line 4" in msg and f"{csv_path} line 2" in msg
    assert "'benign'" in msg and "'malign'" in msg
    with pytest.raises(data.DataError, match="patient 'p1'"):
        data.load(str(csv_path), image_size=16, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    ok = _manifest(tmp_path / "m" / "ok.csv",  # the same patient on several rows with one label: fine
                   [("a.png", "benign", "p1"), ("b.png", "malign", "p2"), ("c.png", "benign", "p1")])
    assert [r.patient for r in data.read_manifest(ok)[1]] == ["p1", "p2", "p1"]


def test_cli_train_refuses_a_patient_with_two_labels(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LCLSC_DATA_DIR", str(tmp_path / "cache"))
    csv_path = _two_label_manifest(tmp_path)
    work = tmp_path / "run"
    code = cli.main(["train", "--workdir", str(work), "--config", "tiny", "--data", str(csv_path), "--no-progress",
                     "--set", "data.image_size=16"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lclsc train: error: ")
    assert f"{csv_path} line 4" in err and f"{csv_path} line 2" in err and "'benign'" in err and "'malign'" in err
    assert not work.exists(), "a rejected --data must not leave a run behind"
