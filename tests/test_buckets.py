"""Data and runs in buckets, for real against local object stores that the tests start.

S3: moto's ``ThreadedMotoServer`` (an S3-compatible HTTP server) on a free loopback port, found
through ``AWS_ENDPOINT_URL`` as by any S3-compatible store. GCS: ``gcp-storage-emulator``
(``STORAGE_EMULATOR_HOST`` for gcsfs, ``TENSORSTORE_GCS_HTTP_URL`` for Orbax's TensorStore);
its tests are skipped where it is not installed. What the code wrote is checked with boto3 (or
the emulator's own client), not with the code under test. The end-to-end tests train through
the ``lclsc`` command in subprocesses on real PNG images (crops of scikit-image's texture
photographs) stored in the bucket: a run on ``s3://`` that stops and resumes ends with the same
parameters as the same two commands on local disk.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lclsc_jax.data import storage

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "lclsc-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with bucket ``BUCKET``; the AWS_* environment points at it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"client": client, "env": env, "endpoint": endpoint}
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (boto3, independent of the code under test)."""
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def _get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _put(client, key: str, body: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=body)


# ---------------------------------------------------------------------------------------------
# storage: the path helpers
# ---------------------------------------------------------------------------------------------

def test_storage_round_trip_on_s3(s3):
    client, base = s3["client"], f"s3://{BUCKET}/rt"
    assert storage.is_url(base) and not storage.is_url("/tmp/x") and not storage.is_url("runs/s3:/x")
    assert storage.join(base + "/", "a", "/b.json") == f"s3://{BUCKET}/rt/a/b.json"
    assert storage.parent(f"{base}/m.csv") == base and storage.parent(f"s3://{BUCKET}/m.csv") == f"s3://{BUCKET}"
    assert not storage.exists(f"{base}/a/b.json") and storage.listdir(base) == []
    storage.write_text(f"{base}/a/b.json", '{"x": 1}')
    assert _get(client, "rt/a/b.json") == b'{"x": 1}'  # one object, read back with boto3
    _put(client, "rt/c.txt", "héllo".encode())
    assert storage.read_text(f"{base}/c.txt") == "héllo"
    assert storage.exists(f"{base}/a/b.json") and storage.isdir(f"{base}/a") and not storage.isdir(f"{base}/c.txt")
    assert storage.isfile(f"{base}/c.txt") and not storage.isfile(f"{base}/a")
    assert storage.listdir(base) == ["a", "c.txt"]
    assert storage.create_exclusive(f"{base}/lock", "mine")
    assert not storage.create_exclusive(f"{base}/lock", "theirs")  # a conditional put: the first one stays
    assert _get(client, "rt/lock") == b"mine"
    with storage.open_file(f"{base}/w.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert _get(client, "rt/w.bin") == b"\x00\x01"
    storage.remove(f"{base}/c.txt")
    storage.remove(f"{base}/c.txt")  # absent: no error
    storage.remove_tree(f"{base}/a")
    assert _keys(client, "rt/") == ["rt/lock", "rt/w.bin"]


def test_storage_errors_name_the_url(s3):
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing/here.txt"):
        storage.read_text(f"s3://{BUCKET}/nothing/here.txt")
    with pytest.raises(FileNotFoundError, match="bucket s3://no-such-bucket does not exist"):
        storage.check_bucket("s3://no-such-bucket/runs/r")
    with pytest.raises(ValueError, match="needs a bucket name"):
        storage.exists("s3:///runs/r")


def test_local_paths_behave_as_os(tmp_path):
    p = str(tmp_path / "d" / "f.json")
    assert storage.join(str(tmp_path), "d", "f.json") == os.path.join(str(tmp_path), "d", "f.json")
    assert storage.absolute("rel/x") == os.path.abspath("rel/x")
    storage.write_text(p, "1")  # creates the folder, writes by rename
    assert open(p).read() == "1" and sorted(os.listdir(tmp_path / "d")) == ["f.json"]
    assert storage.listdir(str(tmp_path / "d")) == ["f.json"] and storage.listdir(str(tmp_path / "none")) == []
    lock = str(tmp_path / "lock")
    assert storage.create_exclusive(lock, "a") and not storage.create_exclusive(lock, "b")
    assert open(tmp_path / "lock").read() == "a"
    storage.remove(p)
    storage.remove(p)
    assert not os.path.exists(p)


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_local_mirror_fetches_new_and_changed_objects_only(s3, tmp_path):
    client = s3["client"]
    for name, v in [("a/p1/f0.png", 10), ("a/p1/f1.png", 20), ("b/p2/f0.png", 30)]:
        _put(client, f"mir/{name}", _png(v))
    local = storage.local_mirror(f"s3://{BUCKET}/mir/", str(tmp_path))
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert files == ["a/p1/f0.png", "a/p1/f1.png", "b/p2/f0.png"]
    assert (Path(local) / "a/p1/f1.png").read_bytes() == _get(client, "mir/a/p1/f1.png")
    before = {f: os.stat(Path(local) / f).st_mtime_ns for f in files}
    _put(client, "mir/a/p1/f1.png", _png(99))  # changed
    client.delete_object(Bucket=BUCKET, Key="mir/b/p2/f0.png")  # gone
    _put(client, "mir/b/p2/f1.png", _png(40))  # new
    assert storage.local_mirror(f"s3://{BUCKET}/mir", str(tmp_path)) == local  # same URL, same copy
    assert os.stat(Path(local) / "a/p1/f0.png").st_mtime_ns == before["a/p1/f0.png"]  # unchanged: not fetched
    assert (Path(local) / "a/p1/f1.png").read_bytes() == _png(99)
    assert not (Path(local) / "b/p2/f0.png").exists() and (Path(local) / "b/p2/f1.png").read_bytes() == _png(40)


def test_local_mirror_of_a_manifest_fetches_what_it_names(s3, tmp_path):
    client = s3["client"]
    _put(client, "man/img/x.png", _png(1))
    _put(client, "man/img/y.png", _png(2))
    _put(client, "man/other/big.bin", b"not named by the manifest")
    _put(client, "man/list.csv", b"path,label,patient\nimg/x.png,a,p1\n./img/y.png,b,p2\n")
    local = storage.local_mirror(f"s3://{BUCKET}/man/list.csv", str(tmp_path))
    root = Path(local).parent
    assert Path(local).name == "list.csv" and Path(local).read_bytes() == _get(client, "man/list.csv")
    assert (root / "img/y.png").read_bytes() == _png(2) and not (root / "other").exists()
    _put(client, "man/bad.csv", b"path,label,patient\nimg/x.png,a,p1\n../up.png,b,p2\n")
    from lclsc_jax.data import DataError

    with pytest.raises(DataError, match=rf"s3://{BUCKET}/man/bad.csv line 3: '../up.png' is outside"):
        storage.local_mirror(f"s3://{BUCKET}/man/bad.csv", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="manifest does not exist"):
        storage.local_mirror(f"s3://{BUCKET}/man/missing.csv", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Checkpoints, the lock and the metric files in a bucket
# ---------------------------------------------------------------------------------------------

def test_checkpoints_in_s3_keep_policy_best_step_and_restore(s3):
    import grain
    import jax
    import jax.numpy as jnp

    from lclsc_jax.train.checkpoint import Checkpointer, saved_steps

    client, url = s3["client"], f"s3://{BUCKET}/ck/checkpoints"
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    c = Checkpointer(url, keep_last=2, best_metric="val_accuracy")
    assert c.remote == url
    for step, acc in [(10, 0.5), (20, 0.9), (30, 0.6), (40, None), (50, 0.7)]:
        next(it)
        c.save(step, {"w": jnp.full(3, float(step))}, it, metrics=None if acc is None else {"val_accuracy": acc})
    c.close()
    keys = _keys(client, "ck/checkpoints/")
    steps = sorted({int(k.split("/")[2]) for k in keys})
    assert steps == [20, 40, 50]  # best + the last two; the others were deleted from the bucket
    assert all(f"ck/checkpoints/{s}/commit_success.txt" in keys for s in steps)
    assert any(k.startswith("ck/checkpoints/50/state/") for k in keys)
    assert saved_steps(url) == [20, 40, 50]
    _put(client, "ck/checkpoints/60/state/_METADATA", b"{}")  # an upload cut off before its marker
    assert saved_steps(url) == [20, 40, 50]

    fresh_it = iter(grain.MapDataset.range(100).to_iter_dataset())
    reopened = Checkpointer(url, keep_last=2, best_metric="val_accuracy")
    assert reopened.latest_step() == 50 and reopened.best_step() == 20  # metadata fetched, arrays not yet
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    restored = reopened.restore(20, abstract, fresh_it)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 20.0, np.float32))
    assert next(fresh_it) == 2  # the iterator's position when step 20 was saved (2 items read)
    reopened.close()
    assert not os.path.exists(reopened._staging)  # the staging folder is gone


def test_lock_on_a_bucket_workdir(s3, capsys):
    from lclsc_jax.train import lock

    client, work = s3["client"], f"s3://{BUCKET}/locked"
    with lock.hold(work) as path:
        assert path == f"{work}/train.lock"
        held = json.loads(_get(client, "locked/train.lock"))
        assert held["pid"] == os.getpid() and lock.holder(work) == held
        with pytest.raises(lock.WorkdirLocked, match="is in use by process"):
            with lock.hold(work):
                pass
    assert _keys(client, "locked/") == []  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "start": "1", "since": "earlier"}
    _put(client, "locked/train.lock", json.dumps(stale).encode())
    with lock.hold(work):
        assert json.loads(_get(client, "locked/train.lock"))["pid"] == os.getpid()
    assert "taking over its stale lock" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with lock.hold("s3://no-such-bucket/r"):
            pass


def test_metric_writer_appends_across_runs_in_a_bucket(s3):
    from lclsc_jax.train.reporting import MetricWriter

    client, work = s3["client"], f"s3://{BUCKET}/mw"
    w = MetricWriter(work)
    w.write(1, {"loss": 2.0})
    w.close()
    w = MetricWriter(work)  # a resumed run appends
    w.write(2, {"loss": 1.5, "acc": np.float32(0.5)})
    w.close()
    lines = [json.loads(x) for x in _get(client, "mw/metrics.jsonl").decode().splitlines()]
    assert lines == [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "train", "loss": 1.5, "acc": 0.5}]
    assert sum(k.startswith("mw/tb/events.out.tfevents") for k in _keys(client, "mw/tb/")) == 2


# ---------------------------------------------------------------------------------------------
# The array_record cache: several shards, records in order
# ---------------------------------------------------------------------------------------------

def test_cache_is_written_in_shards_of_records_per_shard(tmp_path, monkeypatch):
    from lclsc_jax.data import builders, load_image_file

    assert builders.num_shards(1) == 1 and builders.num_shards(1000) == 1 and builders.num_shards(1001) == 2
    root = tmp_path / "frames"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for p in range(2):
            (root / c / f"{c}{p}").mkdir(parents=True)
            for f in range(3):  # 12 images
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / c / f"{c}{p}" / f"{f}.png")
    monkeypatch.setattr(builders, "RECORDS_PER_SHARD", 5)
    ds = builders.load(str(root), image_size=8, cache_dir=tmp_path / "cache")
    shards = sorted(Path(ds.path).rglob("*.array_record-*"))
    assert len(shards) == 3 and shards[-1].name.endswith("-00002-of-00003")  # ceil(12 / 5)
    index = json.loads((Path(ds.path) / builders.INDEX_FILE).read_text())
    for i, path in enumerate(index["files"]):  # record i is file i of the index, whichever shard holds it
        np.testing.assert_array_equal(ds.source[i]["image"], load_image_file(path, 8, 1))


# ---------------------------------------------------------------------------------------------
# GCS (native Orbax) against gcp-storage-emulator
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator on loopback with bucket ``BUCKET``; gcsfs and TensorStore point at it."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    if importlib.util.find_spec("gcsfs") is None:  # not imported here: it reads its settings on import
        pytest.skip("gcsfs is not installed")
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        # gcsfs's bucket-type probe goes to the real control API over gRPC: off for the emulator.
        for k, v in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
            mp.setenv(k, v)
        yield url
    server.stop()


def _gcs_objects(url: str, prefix: str) -> list[str]:
    """Object names under ``prefix``, from the emulator's JSON API (independent of fsspec)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}") as r:
        return sorted(o["name"] for o in json.load(r).get("items", []))


def test_gcs_storage_and_native_checkpoints(gcs, tmp_path):
    import jax
    import jax.numpy as jnp

    from lclsc_jax.train.checkpoint import Checkpointer, saved_steps

    base = f"gs://{BUCKET}/g"
    storage.write_text(f"{base}/a.json", "[1]")
    assert storage.read_text(f"{base}/a.json") == "[1]" and _gcs_objects(gcs, "g/") == ["g/a.json"]
    with storage.open_file(f"{base}/img/c/p/0.png", "wb") as f:
        f.write(_png(7))
    local = storage.local_mirror(f"{base}/img", str(tmp_path))
    assert (Path(local) / "c/p/0.png").read_bytes() == _png(7)
    c = Checkpointer(f"{base}/checkpoints", keep_last=1, best_metric=None, async_save=False)
    assert c.remote is None  # Orbax writes gs:// itself, nothing is staged
    for step in (1, 2):
        c.save(step, {"w": jnp.full(4, float(step))})
    c.close()
    names = _gcs_objects(gcs, "g/checkpoints/")
    assert "g/checkpoints/2/commit_success.txt" in names and not any(n.startswith("g/checkpoints/1/") for n in names)
    assert saved_steps(f"{base}/checkpoints") == [2]
    reopened = Checkpointer(f"{base}/checkpoints", keep_last=1, best_metric=None)
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    np.testing.assert_array_equal(np.asarray(reopened.restore(2, abstract)["w"]), np.full(4, 2.0, np.float32))
    reopened.close()


# ---------------------------------------------------------------------------------------------
# End to end: `lclsc train` / `evaluate` on s3:// through the command line
# ---------------------------------------------------------------------------------------------

CLASSES = ("brick", "grass", "gravel")
TRAIN_SET = ["data.image_size=32", "train.batch_size=8", "train.checkpoint_every=2", "train.eval_every=4",
             "train.log_every=2", "train.warmup_steps=1"]


def _write_images(root: Path) -> list[tuple[str, str, str]]:
    """PNG crops of scikit-image's texture photographs, one texture per class, 3 patients x 3 frames each."""
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    rows = []
    for cls in CLASSES:
        tex = np.asarray(getattr(skdata, cls)())
        for k in range(3):
            patient = f"{cls}{k}"
            for f in range(3):
                y, x = int(rng.integers(k * 170, k * 170 + 170 - 48)), int(rng.integers(0, tex.shape[1] - 48))
                rel = f"img/{cls}/{patient}_{f}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(tex[y:y + 48, x:x + 48]).save(root / rel)
                rows.append((rel, cls, patient))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient"])
        w.writerows(rows)
    return rows


def _lclsc(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def e2e(s3, tmp_path_factory):
    """The images on local disk and in ``s3://BUCKET/data/``; the environment of the ``lclsc`` subprocesses."""
    local = tmp_path_factory.mktemp("data")
    rows = _write_images(local)
    for rel, _, _ in rows:
        _put(s3["client"], f"data/{rel}", (local / rel).read_bytes())
    _put(s3["client"], "data/manifest.csv", (local / "manifest.csv").read_bytes())
    env = {**os.environ, **s3["env"], "LCLSC_DATA_DIR": str(tmp_path_factory.mktemp("cache")),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    return {"local": local, "env": env, "client": s3["client"]}


def _train_twice(env: dict, data: str, work: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """``lclsc train`` to step 4, then the same command with ``train.steps=8`` (a resume)."""
    args = ["train", "--config", "tiny", "--data", data, "--workdir", work, "--no-progress", "--set", *TRAIN_SET]
    return (_ok(_lclsc(env, *args, "train.steps=4")), _ok(_lclsc(env, *args, "train.steps=8")))


@pytest.fixture(scope="module")
def s3_run(e2e):
    work = f"s3://{BUCKET}/runs/r"
    first, second = _train_twice(e2e["env"], f"s3://{BUCKET}/data/manifest.csv", work)
    return {"work": work, "first": first, "second": second}


@pytest.mark.slow
def test_train_on_s3_writes_the_run_to_the_bucket_and_resumes(e2e, s3_run):
    client = e2e["client"]
    keys = _keys(client, "runs/r/")
    for name in ("config.json", "splits.json", "metrics.jsonl", "checkpoints/8/commit_success.txt"):
        assert f"runs/r/{name}" in keys, (name, keys)
    assert "runs/r/train.lock" not in keys  # released
    assert any(k.startswith("runs/r/tb/") for k in keys)
    steps = {int(k.split("/")[3]) for k in keys if k.startswith("runs/r/checkpoints/")}
    assert {6, 8} <= steps <= {4, 6, 8}  # the last two and the best validated (4 or 8); 2 deleted from the bucket
    cfg = json.loads(_get(client, "runs/r/config.json"))
    assert cfg["data"]["source"] == f"s3://{BUCKET}/data/manifest.csv" and cfg["train"]["steps"] == 8
    assert f"resuming {s3_run['work']} from its checkpoint at step 4" in s3_run["second"].stdout
    train_steps = [m["step"] for m in map(json.loads, _get(client, "runs/r/metrics.jsonl").decode().splitlines())
                   if m["split"] == "train"]
    assert train_steps == [2, 4, 6, 8]  # the first call's lines kept, the second's appended


@pytest.mark.slow
def test_s3_run_ends_with_the_parameters_of_the_same_run_on_local_disk(e2e, s3_run, tmp_path_factory):
    import jax

    from lclsc_jax.protocols import runs

    local_work = str(tmp_path_factory.mktemp("runs") / "local")
    _train_twice(e2e["env"], str(e2e["local"] / "manifest.csv"), local_work)
    a = runs.load_run(s3_run["work"], "latest", num_devices=1)
    b = runs.load_run(local_work, "latest", num_devices=1)
    assert a.step == b.step == 8
    for x, y in zip(jax.tree_util.tree_leaves(a.state.params), jax.tree_util.tree_leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_a_run_in_s3(e2e, s3_run):
    r = _ok(_lclsc(e2e["env"], "evaluate", "--workdir", s3_run["work"], "--split", "all"))
    metrics = json.loads(_get(e2e["client"], "runs/r/eval/metrics.json"))
    assert metrics["n"] == 27 and metrics["checkpoint_step"] == 8 and "accuracy" in metrics
    assert "runs/r/eval/confusion_matrix.png" in _keys(e2e["client"], "runs/r/eval/")
    assert f"s3://{BUCKET}/runs/r/eval/metrics.json" in r.stdout


@pytest.mark.parametrize("data, work, message", [
    ("s3://{b}/data/manifest.csv", "s3://no-such-bucket/r", "bucket s3://no-such-bucket does not exist"),
    ("s3://{b}/data/nothing.csv", "s3://{b}/runs/bad", "s3://{b}/data/nothing.csv: manifest does not exist"),
    ("s3://{b}/data/manifest.csv", "s3:///r", "a bucket URL needs a bucket name"),
])
def test_bad_bucket_urls_are_one_line_errors(s3, data, work, message, tmp_path, monkeypatch, capsys):
    from lclsc_jax import cli

    monkeypatch.setenv("LCLSC_DATA_DIR", str(tmp_path))
    code = cli.main(["train", "--config", "tiny", "--data", data.format(b=BUCKET), "--workdir", work.format(b=BUCKET),
                     "--no-progress", "--set", "train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lclsc train: error: ") and message.format(b=BUCKET) in last, err
    assert "Traceback" not in err
    assert not _keys(s3["client"], "runs/bad/")  # nothing left behind
