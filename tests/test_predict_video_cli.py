"""``lclsc predict`` on a video file and on a folder of numbered frames, through the front door (subprocess)."""

import csv
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from lclsc_jax.data import video

pytestmark = pytest.mark.slow  # trains a tiny classifier and a tiny filter with the CLI


def _lclsc(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_video")
    common = ["--config", "tiny", "--no-progress", "--set", f"data.cache_dir={root / 'cache'}",
              "synthetic.nondiagnostic_fraction=0.3"]
    for name, extra in (("run", []), ("filter", ["data.target=diagnostic", "loss.name=ce"])):
        p = _lclsc("train", "--workdir", str(root / name), *common, *extra)
        assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def clip(runs_dir):
    """A 20-frame MP4 at 10 fps of simulator frames (test patients)."""
    from lclsc_jax.protocols import runs
    from lclsc_jax.train import loop

    run = runs.load_run(str(runs_dir / "run"), num_devices=1)
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(run.workdir, run.cfg, ds)["test"][:20]
    frames = [ds.source[int(i)]["image"][..., 0] for i in test]
    path = str(runs_dir / "clip.mp4")
    video.write_video(path, frames, fps=10)
    return path, len(frames), list(run.class_names)


def test_video_with_filter_writes_csv_json_and_overlay(runs_dir, clip, tmp_path):
    path, n, classes = clip
    out = tmp_path / "out"
    p = _lclsc("predict", "--workdir", str(runs_dir / "run"), path, "--filter", str(runs_dir / "filter"),
               "--overlay", str(out / "overlay.mp4"), "--csv", str(out / "p.csv"), "--json-out", str(out / "p.json"),
               "--window", "0.5", "--aggregate", "vote")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{n} frames at 10 fps" in p.stdout and "sequence decision:" in p.stdout and "p99" in p.stdout
    rows = _read_csv(out / "p.csv")
    assert len(rows) == n
    assert list(rows[0]) == (["frame", "name", "time_s", "diagnostic_prob", "kept", "class", "confidence"]
                             + [f"p_{c}" for c in classes] + ["window_class", "window_confidence", "latency_ms"])
    for r in rows:
        probs = np.array([float(r[f"p_{c}"]) for c in classes])
        assert abs(probs.sum() - 1) < 1e-4 and r["class"] == classes[int(probs.argmax())]
        assert (r["kept"] == "True") == (float(r["diagnostic_prob"]) >= 0.5)
    assert [float(r["time_s"]) for r in rows] == pytest.approx(np.arange(n) / 10, abs=1e-5)
    res = json.loads((out / "p.json").read_text())
    assert res["fps"] == 10 and res["window"] == {"seconds": 0.5, "frames": 5, "aggregate": "vote", "threshold": 0.5}
    assert res["classes"] == classes and len(res["frames"]) == n
    s = res["summary"]
    assert s["frames"] == n and s["kept"] == sum(r["kept"] == "True" for r in rows)
    assert s["latency_ms_p50"] <= s["latency_ms_p99"] <= s["latency_ms_max"]
    with av.open(str(out / "overlay.mp4")) as c:  # the overlay keeps the input's rate and frame count
        st = c.streams.video[0]
        assert float(st.average_rate) == pytest.approx(10.0)
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
    assert len(decoded) == n and decoded[0].shape[0] == 32 * 8  # 32 px frames drawn 8x


def test_numbered_png_folder_of_real_images(runs_dir, tmp_path):
    from skimage import data as skdata

    cam = skdata.camera()  # 512x512 grey photograph
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(12):  # a probe sweeping over the scene: shifted crops, numbered without zero padding
        Image.fromarray(cam[40 + 6 * k:40 + 6 * k + 256, 100 + 9 * k:100 + 9 * k + 256]).save(folder / f"f{k + 1}.png")
    out = tmp_path / "preds"
    p = _lclsc("predict", "--workdir", str(runs_dir / "run"), str(folder), "--fps", "6", "--saliency", "none",
               "--csv", str(out / "p.csv"), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _read_csv(out / "p.csv")
    assert [r["name"] for r in rows] == [f"f{k + 1}.png" for k in range(12)]  # f2 before f10
    assert [float(r["time_s"]) for r in rows] == pytest.approx(np.arange(12) / 6, abs=1e-5)
    assert all(r["diagnostic_prob"] == "" and r["kept"] == "True" for r in rows)  # no filter: every frame kept
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 12 and lines[3]["name"] == "f4.png"


def test_image_files_keep_the_old_behaviour_and_bad_inputs_are_clear(runs_dir, tmp_path):
    img = tmp_path / "one.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(img)
    p = _lclsc("predict", "--workdir", str(runs_dir / "run"), str(img))
    assert p.returncode == 0 and p.stdout.startswith(str(img) + "\t"), p.stderr[-2000:]
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing.mp4")], "missing.mp4: no such video file"),
        ([str(fake)], "fake.mp4: not a readable video"),
        ([str(empty)], "empty: no frames"),
        ([str(empty), str(img)], "must be the only input"),
        ([str(img), "--overlay", str(tmp_path / "o.mp4")], "--overlay apply to a video"),
    ]
    for args, msg in cases:
        p = _lclsc("predict", "--workdir", str(runs_dir / "run"), *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
