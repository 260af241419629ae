"""Errors a user can act on: one line naming the culprit and what to do, exit code 2 (130 for Ctrl-C), no traceback
for a user's mistake — also when it happens in a DataLoader worker, on a full disk or a read-only folder — and
nothing that looks finished left behind.  Finished work is never overwritten without --resume / --force; one
writer per store."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from shared.cli import main as cit
from tests.cache_fixtures import ForkedCli
from tests.shard_fixtures import make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "student.options.embed_dim=32", "--set", "student.options.depth=1",
        "--set", "student.options.num_heads=2", "--set", "student.options.stem_width=32",
        "--set", "train.progress=false", "--set", "data.num_workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    train = make_shards(str(root / "train"), num_samples=40, shard_size=10, seed=0, prefix="tr")
    return {"root": root, "train": train.path, "manifest": train}


def train_args(shards, out, *extra: str) -> list[str]:
    return ["train", "--kd", "none", "--data", shards["train"], "--out", str(out), "--epochs", "1",
            "--batch-size", "10", *TINY, *extra]


def one_line_error(result, exit_code: int = 2) -> str:
    """The CLI failed with ``exit_code`` and printed exactly one ``Error:`` line and no traceback."""
    text = result.output if hasattr(result, "output") else result.stderr
    assert result.exit_code == exit_code if hasattr(result, "exit_code") else result.returncode == exit_code, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return errors[0]


def looks_finished(out) -> list[str]:
    return [n for n in ("run.json", "student.safetensors", "student.json") if os.path.exists(os.path.join(out, n))]


@contextlib.contextmanager
def tiny_filesystem(path, size: str = "64k", read_only: bool = False):
    """A real small tmpfs (root only); otherwise nothing is mounted and the caller's fallback applies."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


# -----------------------------------------------------------------------------------------------------------------
# --set checked against the field's type; one line, exit 2 (no torch work starts)

@pytest.mark.parametrize("item, words", [("train.lr=abc", "train.lr must be a number (float), got 'abc'"),
                                         ("train.epochs=two", "train.epochs must be an integer (int), got 'two'"),
                                         ("train.betas=[0.9]", "train.betas must be a list of 2 values"),
                                         ("augment.image_size=2.5", "augment.image_size must be an integer"),
                                         ("train.progress=1", "train.progress must be true or false")])
def test_set_values_are_checked_against_the_field_type(shards, tmp_path, item, words):
    result = CliRunner().invoke(cit, train_args(shards, tmp_path / "run", "--set", item))
    assert words in one_line_error(result)
    assert not os.path.exists(tmp_path / "run")


def test_set_values_convert_where_toml_is_loose():
    from trainer.train import load_run_config
    cfg = load_run_config(None, ["train.lr=1", "augment.rrc_scale=[0.3, 1]", "kd.mode=none"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.augment.rrc_scale == (0.3, 1.0)


# -----------------------------------------------------------------------------------------------------------------
# Finished work is never overwritten silently

def test_finished_run_and_teacher_are_not_overwritten_without_resume_or_force(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "student.safetensors").write_bytes(b"weights")
    result = CliRunner().invoke(cit, train_args(shards, run))
    line = one_line_error(result)
    assert "run.json is finished work" in line and "--force" in line
    assert (run / "student.safetensors").read_bytes() == b"weights"
    # an unfinished run: --resume or --force
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "state.safetensors").write_bytes(b"state")
    line = one_line_error(CliRunner().invoke(cit, train_args(shards, unfinished)))
    assert "unfinished run" in line and "--resume" in line and "--force" in line
    # a teacher checkpoint
    teacher = tmp_path / "conv.safetensors"
    teacher.write_bytes(b"teacher")
    result = CliRunner().invoke(cit, ["teacher", "train", "--arch", "test_resnet", "--kind", "conv", "--data",
                                      shards["train"], "--test-data", shards["train"], "--out", str(teacher)])
    assert "conv.safetensors is finished work" in one_line_error(result)
    assert teacher.read_bytes() == b"teacher"


def test_force_removes_the_old_outputs_first_and_resume_removes_temporaries(tmp_path):
    from trainer.engine import claim_out
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "student.safetensors", "student.json", "state.safetensors", "metrics.jsonl",
                 ".tmp-state.safetensorsk3j2", ".student.safetensors.abc.tmp", "notes.txt"):
        (run / name).write_text("x")
    outputs = [str(run / "run.json"), str(run / "student.safetensors")]
    claim_out(str(run), outputs, resume=True, force=False)         # resume: temporaries go, the run stays
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "notes.txt", "run.json", "state.safetensors",
                                       "student.json", "student.safetensors"]
    claim_out(str(run), outputs, resume=False, force=True)         # force: nothing that looks finished is left
    assert os.listdir(run) == ["notes.txt"]


def test_a_killed_checkpoint_write_is_cleaned_up_by_resume(shards, tmp_path):
    """A training killed while writing its state leaves ``.tmp-state*``; ``--resume`` removes it."""
    run = tmp_path / "run"
    assert CliRunner().invoke(cit, train_args(shards, run)).exit_code == 0
    (run / ".tmp-state.safetensorsq9x1").write_bytes(b"\0" * 4096)    # what a SIGKILL mid-write leaves
    result = CliRunner().invoke(cit, train_args(shards, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def test_checkpoints_respect_the_umask(shards, tmp_path):
    """Teacher and student checkpoints, their sidecars and the training state get the same usual mode."""
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert CliRunner().invoke(cit, train_args(shards, run)).exit_code == 0
    finally:
        os.umask(old)
    modes = {n: os.stat(run / n).st_mode & 0o777 for n in ("student.safetensors", "student.json",
                                                           "state.safetensors", "run.json")}
    assert set(modes.values()) == {0o644}, modes


def test_a_teacher_on_the_other_kinds_token_is_warned_about(caplog):
    from shared.cache_schema import TeacherRecord
    from trainer.train import KDConfig, warn_kind_mismatch
    records = {name: TeacherRecord(name, kind, "x", "", 10, [0.5], [0.5], None, {})
               for name, kind in (("rednet", "inv"), ("regnet", "conv"))}
    with caplog.at_level(logging.WARNING):
        warn_kind_mismatch(KDConfig(conv_teacher="rednet", inv_teacher="regnet"), records)
    assert "'rednet' is a inv teacher but feeds the conv token" in caplog.text
    assert "'regnet' is a conv teacher but feeds the inv token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_kind_mismatch(KDConfig(conv_teacher="regnet", inv_teacher="rednet"), records)
    assert caplog.text == ""


# -----------------------------------------------------------------------------------------------------------------
# Errors inside DataLoader workers: unwrapped to the worker's one line

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_shard_damaged_mid_run_is_one_line_from_the_worker(shards, tmp_path, monkeypatch, damage):
    import shutil

    from trainer import train as train_mod
    folder = tmp_path / "data"
    shutil.copytree(os.path.dirname(shards["train"]), folder)
    manifest = str(folder / os.path.basename(shards["train"]))
    victim = folder / "tr-0002.tar"
    original = train_mod.prepare

    def prepare_then_damage(cfg, runtime=None):   # every start-of-run check has passed: now the shard breaks
        prepared = original(cfg, runtime)
        if damage == "truncate":
            with open(victim, "r+b") as f:
                f.truncate(700)
        else:
            os.remove(victim)
        return prepared

    monkeypatch.setattr(train_mod, "prepare", prepare_then_damage)
    run = tmp_path / "run"
    args = train_args({"train": manifest}, run, "--set", "data.num_workers=1")
    line = one_line_error(CliRunner().invoke(cit, args))
    assert "tr-0002.tar" in line and "Caught" not in line and "worker process" not in line
    assert not looks_finished(run)


def test_worker_error_unwrapping():
    from shared.errors import user_message
    from shared.shards import ShardError
    text = ("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise ShardError(...)\n'
            "shared.shards.ShardError: unreadable shard /d/tr-0002.tar: unexpected end of data\n")
    assert user_message(ShardError(text)) == "unreadable shard /d/tr-0002.tar: unexpected end of data"
    # a type torch could not rebuild arrives as RuntimeError: the traceback's last line still names it
    assert user_message(RuntimeError(text.replace("ShardError(...)", "x"))) == \
        "unreadable shard /d/tr-0002.tar: unexpected end of data"
    bug = "Caught KeyError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\nKeyError: 'x'\n"
    assert user_message(RuntimeError(bug)) is None           # a bug keeps its traceback
    assert user_message(TypeError("bad")) is None and user_message(ValueError("plain")) is None
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    assert "pid 4242" in user_message(killed)


# -----------------------------------------------------------------------------------------------------------------
# The machine says no: a full disk, a read-only folder, a directory given as a file

def test_disk_full_says_the_run_is_resumable(shards, tmp_path, monkeypatch):
    run = tmp_path / "small"
    with tiny_filesystem(run, "64k") as mounted:
        if not mounted:   # not root: the same OSError a full disk raises, at the same place
            import shared.io

            def full(*_):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(shared.io.os, "fsync", full)
        line = one_line_error(CliRunner().invoke(cit, train_args(shards, run)))
        assert "state.safetensors: the disk is full" in line and "free some space" in line
        assert "continue with: cit train " in line and line.endswith("--resume")
        assert not looks_finished(run) and not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def test_read_only_output_folder_is_one_line(shards, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    with tiny_filesystem(out, "64k", read_only=True) as mounted:
        if not mounted:
            import shared.io

            def denied(*_, **__):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out / "run" / "x"))
            monkeypatch.setattr(shared.io.tempfile, "mkstemp", denied)
        line = one_line_error(CliRunner().invoke(cit, train_args(shards, out / "run")))
        assert str(out / "run") in line and ("read-only" in line or "permission denied" in line)
        assert "choose a folder you can write to" in line


def test_scanning_a_directory_is_one_line(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    line = one_line_error(CliRunner().invoke(cit, ["data", "prepare", "scan", str(folder)]))
    assert str(folder) in line and "directory" in line and "*.tar" in line


# -----------------------------------------------------------------------------------------------------------------
# Ctrl-C: a real SIGINT to a real `cit train`

def test_sigint_says_how_to_resume_and_exits_130(shards, tmp_path):
    run = tmp_path / "run"
    args = train_args(shards, run)
    args[args.index("--epochs") + 1] = "100000"       # never finishes before the signal, however late it comes
    # a forked `cit` (no fresh interpreter to pay for) with SIGINT as a terminal's Ctrl-C meets it (a
    # KeyboardInterrupt), also when the suite was started in the background (`cmd &`) with SIGINT ignored
    proc = ForkedCli(cit, args, str(tmp_path))
    try:
        deadline = time.time() + 120
        while not (run / "state.safetensors").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (run / "state.safetensors").exists(), proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    line = [s for s in stderr.splitlines() if s.startswith("Interrupted:")]
    assert len(line) == 1, stderr
    assert f"the last finished epoch in {run} is kept" in line[0]
    assert line[0].endswith(f"cit {' '.join(args)} --resume")
    assert not looks_finished(run)


# -----------------------------------------------------------------------------------------------------------------
# One writer per store

def test_store_lease_refuses_a_second_writer_and_expires_when_its_holder_is_gone(tmp_path):
    import json

    from shared import store_lock
    from shared.store_lock import StoreLock, StoreLockedError, read_lease
    url = str(tmp_path / "c.zarr")
    with StoreLock(url):
        with pytest.raises(StoreLockedError, match=rf"c.zarr is being built by pid {os.getpid()} on "):
            StoreLock(url).acquire()
    assert read_lease(url) is None                      # released
    # a killed writer on this host: its pid is dead, the lease is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time(), "renewed": time.time(),
             "token": "old"}
    (tmp_path / "c.zarr.lock").write_text(json.dumps(lease))
    with StoreLock(url) as lock:
        assert read_lease(url).token == lock.lease.token
    # a writer on another host: alive until its lease expires
    lease |= {"host": "elsewhere", "pid": 1}
    (tmp_path / "c.zarr.lock").write_text(json.dumps(lease))
    with pytest.raises(StoreLockedError, match="pid 1 on elsewhere"):
        StoreLock(url).acquire()
    lease["renewed"] = time.time() - store_lock.LEASE_SECONDS - 1
    (tmp_path / "c.zarr.lock").write_text(json.dumps(lease))
    StoreLock(url).acquire().release()


def test_store_lease_on_an_fsspec_store():
    from shared.store_lock import StoreLock, StoreLockedError, read_lease
    url = f"memory://leases/{os.getpid()}/c.zarr"
    with StoreLock(url):
        assert read_lease(url).pid == os.getpid()
        with pytest.raises(StoreLockedError, match="is being built by"):
            StoreLock(url).acquire()
    assert read_lease(url) is None


@pytest.fixture(scope="module")
def teachers(shards):
    from tests.cache_fixtures import make_teacher
    return [f"conv={make_teacher(str(shards['root'] / 'conv.safetensors'), 'conv')}"]


def build_args(shards, teachers, out, *extra) -> list[str]:
    return ["cache", "build", "--data", shards["train"], *[a for t in teachers for a in ("--teacher", t)],
            "--views", "1", "--topk", "3", "--out", str(out), "--threads", "1", "--workers", "0", "--no-progress",
            "--set", "augment.image_size=16", "--set", "augment.mean=[0.5]", "--set", "augment.std=[0.5]", *extra]


def test_second_build_on_one_store_is_refused_and_a_store_in_the_making_is_not_interrupted(shards, teachers, tmp_path):
    from shared.cache_schema import STATUS_CREATING, CacheAttrs, CacheError, LogitCache, TeacherRecord, open_root
    from shared.store_lock import StoreLock
    out = tmp_path / "c.zarr"
    with StoreLock(str(out)):                               # a build is running on this store
        line = one_line_error(CliRunner().invoke(cit, build_args(shards, teachers, out)))
        assert f"{out} is being built by pid {os.getpid()}" in line
        assert not out.exists()                             # the second build wrote nothing
        # what a reader sees of a store that build is creating: "being built", not "interrupted"
        m = shards["manifest"]
        attrs = CacheAttrs(m.fingerprint, m.num_samples, m.num_classes, 1, 3, 0, {}, 10,
                           [TeacherRecord("conv", "conv", "x", "", 10, [0.5], [0.5], None, {})],
                           status=STATUS_CREATING)
        open_root(str(out), "w").attrs.put(attrs.to_json_dict())
        with pytest.raises(CacheError, match=f"is being built by pid {os.getpid()}"):
            LogitCache.open(str(out))
    with pytest.raises(CacheError, match="interrupted while being created"):   # the builder is gone
        LogitCache.open(str(out))


def test_recompute_works_from_another_folder(shards, teachers, tmp_path, monkeypatch):
    """The cache records absolute checkpoint paths, so `verify --recompute` finds the teachers from anywhere."""
    import shutil
    here = tmp_path / "project"
    (here / "teachers").mkdir(parents=True)
    shutil.copy(shards["root"] / "conv.safetensors", here / "teachers" / "conv.safetensors")
    shutil.copy(shards["root"] / "conv.json", here / "teachers" / "conv.json")
    monkeypatch.chdir(here)
    out = here / "c.zarr"
    result = CliRunner().invoke(cit, build_args(shards, ["conv=teachers/conv.safetensors"], out))
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cit, ["cache", "verify", str(out), "--data", shards["train"], "--recompute", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output


def _moto(monkeypatch):
    from tests.cache_fixtures import start_moto
    server, port = start_moto()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    return server, port


def test_missing_bucket_is_found_before_anything_is_written(shards, teachers, monkeypatch):
    pytest.importorskip("s3fs")
    server, port = _moto(monkeypatch)
    try:
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("there")
        out = "s3://nowhere/caches/c.zarr"
        line = one_line_error(CliRunner().invoke(cit, build_args(shards, teachers, out)))
        assert "bucket 'nowhere' does not exist" in line
        assert fs.ls("there") == [] and not fs.exists("nowhere")
    finally:
        server.stop()


def test_unreachable_endpoint_is_one_line_that_says_the_build_is_resumable(shards, teachers, tmp_path):
    from tests.cache_fixtures import free_port
    port = free_port()                                      # nothing listens there
    out = "s3://bucket/caches/c.zarr"
    result = CliRunner().invoke(cit, build_args(
        shards, teachers, out, "--storage-option", f"endpoint_url=http://127.0.0.1:{port}",
        "--storage-option", "key=k", "--storage-option", "secret=s",
        "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1}'))
    line = one_line_error(result)
    assert "storage endpoint" in line and "rerun the same command to resume" in line


@pytest.mark.parametrize("failure, words, code", [
    (KeyboardInterrupt(), "Interrupted: finished units in {out} are kept: rerun the same command", 130),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "{out}/conv/values/c/0/0/0"),
     "Error: cannot write {out}/conv/values/c/0/0/0: the disk is full; free some space (or choose another --out); "
     "then finished units in {out} are kept: rerun the same command to resume the build", 2),
])
def test_an_interrupted_or_full_build_says_rerun_the_same_command(shards, teachers, tmp_path, monkeypatch,
                                                                  failure, words, code):
    import cache_builder.build
    out = str(tmp_path / "c.zarr")
    if isinstance(failure, OSError):
        failure.filename = failure.filename.format(out=out)

    def fails(*_, **__):
        raise failure
    monkeypatch.setattr(cache_builder.build, "build_cache", fails)
    result = CliRunner().invoke(cit, build_args(shards, teachers, out))
    assert result.exit_code == code and "Traceback" not in result.output and "Aborted" not in result.output
    assert words.format(out=out) in result.output


def test_a_bug_keeps_its_traceback(shards, tmp_path, monkeypatch):
    """Not a user's mistake: the exception leaves the CLI as it is (click then prints its traceback)."""
    from trainer import train as train_mod

    def bug(*_, **__):
        raise KeyError("a bug")
    monkeypatch.setattr(train_mod, "train", bug)
    result = CliRunner().invoke(cit, train_args(shards, tmp_path / "run"))
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    env = dict(os.environ, PYTHONPATH=REPO, CIT_DEBUG="1")   # CIT_DEBUG: a traceback for user errors too
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "data", "info", str(tmp_path / "missing.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ManifestError" in proc.stderr


def test_endpoint_lost_mid_build_is_one_line_that_says_rerun(shards, teachers, monkeypatch):
    """The S3 server goes away after the first unit was written: one line, and the build is resumable."""
    pytest.importorskip("s3fs")
    import cache_builder.runner as runner_mod
    server, port = _moto(monkeypatch)
    stopped = []
    original = runner_mod._write

    def write_then_lose_the_endpoint(*args, **kwargs):
        if not stopped:
            original(*args, **kwargs)
            server.stop()
            stopped.append(True)
            return None
        return original(*args, **kwargs)

    try:
        import s3fs
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bucket")
        monkeypatch.setattr(runner_mod, "_write", write_then_lose_the_endpoint)
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)    # not 5 tries with back-off to a stopped server
        args = build_args(shards, teachers, "s3://bucket/c.zarr", "--chunk-rows", "10", "--storage-option",
                          'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1}')
        line = one_line_error(CliRunner().invoke(cit, args))
        assert stopped and "storage endpoint" in line and "rerun the same command to resume the build" in line
    finally:
        if not stopped:
            server.stop()
