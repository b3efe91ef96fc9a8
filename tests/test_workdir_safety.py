"""`lclsc train` never loses or mixes up a run: a workdir lock, a clean failed start, divergence,
Ctrl-C and write failures end in one line and a workdir that resumes (issue 14)."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib

from lclsc_jax import cli
from lclsc_jax.train import checkpoint as checkpoint_lib
from lclsc_jax.train import lock
from lclsc_jax.train.reporting import MetricWriter


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one config share a compiled train step (~20 s each on 2 loaded cores otherwise).

    JAX sets its persistent cache up once per process (and then sets the minimum entry size):
    ``reset_cache`` on both sides, so this module gets its cache and later modules none.
    """
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    compilation_cache_lib.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        yield
    finally:
        compilation_cache_lib.reset_cache()
        for k, v in old.items():
            jax.config.update(k, v)


def _args(cache, *sets):
    """A tiny 8-step run saving at step 4; ``sets`` adds or replaces ``--set`` values (the compiled step is
    shared by all runs of this file unless train.lr changes)."""
    keys = {"train.steps": 8, "train.checkpoint_every": 4, "train.eval_every": 8, "train.log_every": 1,
            "data.cache_dir": cache, **dict(s.split("=", 1) for s in sets)}
    return ["--config", "tiny", "--no-progress", "--set", *(f"{k}={v}" for k, v in keys.items())]


def _main(*argv):
    """``lclsc ARGV``'s exit code; a Ctrl-C escaping it (a traceback for the user) fails the test, not the session."""
    try:
        return cli.main(list(argv))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped `lclsc`")


def _one_line(err):
    """The one line a stopped command printed (the data cache's one-time build notice aside)."""
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("[data] building")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _steps(work):
    return [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "train"]


def test_a_second_train_is_refused_while_the_first_holds_the_workdir_and_a_stale_lock_is_taken_over(
        tmp_path, cache, capsys):
    work = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lclsc_jax.train import lock\n"
         "with lock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)", str(work)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["train", "--workdir", str(work), *_args(cache)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"process {holder.pid} on host {socket.gethostname()}" in line
        assert not (work / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock stays behind
        holder.wait()
    assert lock.holder(str(work))["pid"] == holder.pid
    assert cli.main(["train", "--workdir", str(work), *_args(cache)]) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and str(holder.pid) in err
    assert lock.holder(str(work)) is None  # released on exit
    assert _steps(work) == list(range(1, 9))  # each step logged once


def test_a_failed_start_leaves_nothing_that_refuses_the_retry(tmp_path, cache, capsys):
    assert cli.main(["train", "--workdir", str(tmp_path / "nodata"), *_args(cache),
                     "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "nodata").exists()  # neither a run nor a lock left behind

    work = tmp_path / "run"
    code = cli.main(["train", "--workdir", str(work), *_args(cache), "--init-from", str(tmp_path / "nope.pth")])
    assert code != 0 and "nope.pth" in _one_line(capsys.readouterr().err)
    assert not work.exists()  # no config.json (nor the lock's folder) is left to refuse another config
    assert cli.main(["train", "--workdir", str(work), *_args(cache, "seed=1")]) == 0
    assert json.loads((work / "config.json").read_text())["seed"] == 1


def test_a_workdir_with_a_config_but_no_checkpoint_takes_the_config_given(tmp_path, cache, capsys):
    # What a start that failed before this version (or stopped before its first save) leaves behind.
    from lclsc_jax.train import config as C

    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(C.to_dict(C.load("tiny", ["model.arch=resnet18", "seed=5"]))))
    assert _main("train", "--workdir", str(work), *_args(cache, "train.steps=4")) == 0
    assert "no checkpoint" in capsys.readouterr().out
    saved = json.loads((work / "config.json").read_text())
    assert saved["model"]["arch"] == "tiny" and saved["seed"] == 0
    # Once it has a checkpoint, another config is refused again.
    assert _main("train", "--workdir", str(work), *_args(cache, "seed=2")) == 2
    assert "different config" in _one_line(capsys.readouterr().err)


def test_divergence_is_one_line_saying_what_is_on_disk_and_resumes_with_another_lr(
        tmp_path, cache, capsys, monkeypatch):
    work = tmp_path / "no_ckpt"  # diverges at step 3 (step 1 runs at warmup lr 0), before the save at 4
    assert cli.main(["train", "--workdir", str(work), *_args(cache, "train.lr=1e9")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "diverged" in line and "at step 3" in line and "no checkpoint has been saved" in line
    assert "--set train.lr=" in line
    assert cli.main(["train", "--workdir", str(work)]) == 2  # a plain retry would diverge again: refused
    assert "train.lr" in _one_line(capsys.readouterr().err)

    work = tmp_path / "ckpt"  # a good run saved at step 4 (stopped at 5), resumed with lr=1e9
    monkeypatch.setattr(MetricWriter, "write", _raise_at(5, KeyboardInterrupt()))
    assert _main("train", "--workdir", str(work), *_args(cache)) == 130
    capsys.readouterr()
    monkeypatch.undo()
    assert cli.main(["train", "--workdir", str(work), "--no-progress", "--set", "train.lr=1e9"]) == 1
    line = _one_line(capsys.readouterr().err)  # the lr is resumable
    step = int(re.search(r"NaN/Inf at step (\d+)", line).group(1))
    assert step > 4 and "checkpoint, step 4, is intact" in line and "saved by this call" not in line
    assert cli.main(["train", "--workdir", str(work), "--no-progress"]) == 2  # the saved lr is the bad one
    assert f"diverged at step {step}" in _one_line(capsys.readouterr().err)
    assert cli.main(["train", "--workdir", str(work), "--no-progress", "--set", "train.lr=3e-3"]) == 0
    assert "from its checkpoint at step 4" in capsys.readouterr().out
    saved = json.loads((work / "config.json").read_text())
    assert saved["train"]["lr"] == 3e-3 and not (work / "diverged.json").exists()
    assert _steps(work)[-1] == 8


def _raise_at(step, exc):
    """A ``MetricWriter.write`` that raises ``exc`` when asked to record ``step``."""
    write = MetricWriter.write

    def patched(self, s, metrics, prefix="train"):
        if s == step:
            raise exc
        return write(self, s, metrics, prefix)
    return patched


def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes_saying_from_which_step(
        tmp_path, cache, capsys, monkeypatch):
    work = tmp_path / "run"
    monkeypatch.setattr(MetricWriter, "write", _raise_at(6, KeyboardInterrupt()))
    assert _main("train", "--workdir", str(work), *_args(cache)) == 130
    line = _one_line(capsys.readouterr().err)
    assert "interrupted at step 6" in line and "step 4" in line
    assert lock.holder(str(work)) is None
    monkeypatch.undo()
    assert cli.main(["train", "--workdir", str(work), "--no-progress"]) == 0
    assert "from its checkpoint at step 4" in capsys.readouterr().out
    assert _steps(work)[-1] == 8


def _full_disk_on_save(step):
    """Orbax's ``save`` failing like TensorStore on a full disk (a ``ValueError`` with the OS error code)."""
    save = checkpoint_lib.ocp.CheckpointManager.save

    def patched(self, s, *a, **kw):
        if s == step:
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in OCDBT database: Failed to write 881255 bytes "
                             f"to file 19: No space left on device [os_error_code='{errno.ENOSPC}']")
        return save(self, s, *a, **kw)
    return patched


@pytest.mark.parametrize("failure", ["full disk at a checkpoint", "read-only folder while logging"])
def test_a_failed_write_is_one_line_and_the_run_resumes(tmp_path, cache, capsys, monkeypatch, failure):
    work = tmp_path / "run"
    if failure.startswith("full disk"):
        monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", _full_disk_on_save(8))
        expected = os.strerror(errno.ENOSPC)
    else:
        monkeypatch.setattr(MetricWriter, "write", _raise_at(6, OSError(errno.EROFS, os.strerror(errno.EROFS),
                                                                        str(work / "metrics.jsonl"))))
        expected = os.strerror(errno.EROFS)
    assert cli.main(["train", "--workdir", str(work), *_args(cache)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert expected in line and "checkpoint, step 4, is intact" in line
    monkeypatch.undo()
    assert cli.main(["train", "--workdir", str(work), "--no-progress"]) == 0
    assert "from its checkpoint at step 4" in capsys.readouterr().out


def test_a_read_only_output_folder_at_start_is_one_line(tmp_path, cache, capsys, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    makedirs = os.makedirs

    def read_only(path, *a, **kw):  # root ignores chmod: fail as a read-only mount does
        if str(path).startswith(str(parent)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return makedirs(path, *a, **kw)
    monkeypatch.setattr(os, "makedirs", read_only)
    assert cli.main(["train", "--workdir", str(parent / "run"), *_args(cache)]) == 1
    assert os.strerror(errno.EROFS) in _one_line(capsys.readouterr().err)


def test_late_write_callbacks_of_a_failed_save_print_nothing(capsys):
    import asyncio

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)  # what TensorStore's callbacks hit after Orbax closed its loop
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    try:
        raise RuntimeError("something else")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "Event loop is closed" not in err and "something else" in err


def _sigterm_at(step):
    """``MetricWriter.write`` that sends this process SIGTERM at ``step`` (as ``kill`` or a cluster would)."""
    write = MetricWriter.write

    def patched(self, s, *a, **kw):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return write(self, s, *a, **kw)
    return patched


def test_sigterm_is_one_line_exit_143_and_the_run_resumes(tmp_path, cache, capsys, monkeypatch):
    work = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(MetricWriter, "write", _sigterm_at(6))
    assert _main("train", "--workdir", str(work), *_args(cache)) == 128 + signal.SIGTERM
    line = _one_line(capsys.readouterr().err)
    assert "terminated (SIGTERM) at step 6" in line and "step 4" in line
    assert lock.holder(str(work)) is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the training's only
    monkeypatch.undo()
    assert cli.main(["train", "--workdir", str(work), "--no-progress"]) == 0
    assert "from its checkpoint at step 4" in capsys.readouterr().out
    assert _steps(work)[-1] == 8
