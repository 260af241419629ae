"""Helpers for the cache-builder tests: tiny real teachers (``create_model`` + ``save_checkpoint``), array
comparison, free ports, the CLI as a subprocess."""
from __future__ import annotations

import os
import signal
import time
import socket
import subprocess
import sys

import numpy as np
import torch
import zarr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_teacher(path: str, kind: str = "conv", num_classes: int = 10, in_chans: int = 1, seed: int = 0,
                 nan: bool = False, mean=(0.5,), std=(0.5,)) -> str:
    """A tiny untrained RedNet teacher saved as a real checkpoint: ``kind="inv"`` with involutions, ``"conv"`` its
    conv twin (3x3 convs in place of the involutions).  ``nan``: the classifier bias is NaN."""
    from shared.checkpoint import save_checkpoint
    from shared.models import create_model
    torch.manual_seed(seed)
    model = create_model("rednet_small", num_classes=num_classes, in_chans=in_chans, base_width=4, stem_width=8,
                         group_channels=4, mixer="involution" if kind == "inv" else "conv").eval()
    if nan:
        with torch.no_grad():
            model.fc.bias.fill_(float("nan"))
    save_checkpoint(model, path, {"kind": kind, "mean": list(mean), "std": list(std)})
    return path


def store_arrays(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every array of a Zarr group, by path (plain zarr: no cit code involved)."""
    kwargs = {"storage_options": storage_options} if storage_options else {}
    root = zarr.open_group(url, mode="r", **kwargs)
    out = {}

    def walk(group, prefix):
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                walk(node, prefix + name + "/")
            else:
                out[prefix + name] = np.asarray(node[...])
    walk(root, "")
    return out


def assert_bit_identical(a: str, b: str, b_options: dict | None = None) -> None:
    x, y = store_arrays(a), store_arrays(b, b_options)
    assert sorted(x) == sorted(y)
    for path in x:
        u, v = x[path], y[path]
        assert u.dtype == v.dtype and u.shape == v.shape, path
        assert np.array_equal(u.view(f"u{u.itemsize}"), v.view(f"u{v.itemsize}")), f"{path} differs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """A moto S3 server on 127.0.0.1 at a port the kernel picks when the server binds (no window in which a
    parallel test worker could take the same port); returns the server and its port."""
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)      # not a log record per request: it runs in here
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cache_builder.cli", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """``run_cli`` in this process (click's runner, the real command group, its exit code and both streams): for
    checks where no process is killed or interrupted, without a second interpreter importing torch again."""
    import logging

    from click.testing import CliRunner

    from cache_builder.cli import cache
    handlers = logging.root.handlers[:]       # the group's logging.basicConfig must not keep the runner's stream
    try:
        result = CliRunner().invoke(cache, list(args))
    finally:
        logging.root.handlers[:] = handlers
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(cli_command(*args), result.exit_code, result.stdout, result.stderr)


class ForkedCli:
    """``python -m <group's module> ARGS`` as a child forked from this process: a real process that can be killed
    (-9) or interrupted (SIGINT) mid-run, without a fresh interpreter importing torch and timm again (~4.5 CPU-s).
    Its stdout and stderr go to files in ``folder``; the methods are ``subprocess.Popen``'s, as far as the tests
    use them.  The caller runs single-threaded (OpenMP is not fork-safe), as the suite does."""

    def __init__(self, group, args: list[str], folder: str):
        import multiprocessing
        import tempfile
        fd, self.stdout_path = tempfile.mkstemp(".out", "cli-", folder)
        os.close(fd)
        self.stderr_path = self.stdout_path[:-4] + ".err"
        sys.stdout.flush()
        sys.stderr.flush()
        self._child = multiprocessing.get_context("fork").Process(
            target=_forked_main, args=(group, list(args), self.stdout_path, self.stderr_path))
        self._child.start()
        self.pid = self._child.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or minus the signal that ended it (None while it runs)."""
        return self._child.exitcode

    def poll(self) -> int | None:
        return self._child.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(["fork", self.pid], timeout)
        return self._child.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        with open(self.stdout_path) as out, open(self.stderr_path) as err:
            return out.read(), err.read()

    def run_until(self, reached, what: str, timeout: float = 90) -> None:
        """Poll (every 2 ms) until ``reached()`` holds, then fail if the child has ended: ``what`` (the command)
        finished before it could be stopped."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.poll() is None and not reached():
            time.sleep(0.002)
        assert self.poll() is None, f"{what} finished before it could be killed: {self.communicate()}"

    def kill9(self) -> None:
        """SIGKILL, and wait for the child to be gone."""
        self.kill()
        self.wait()


def count_written(folder: str) -> int:
    """Files written under ``folder`` (done flags, growth marks), not Zarr's temporary ``*.partial`` files; 0 while it
    does not exist."""
    return sum(len([f for f in files if not f.endswith(".partial")]) for _, _, files in os.walk(folder))


def _forked_main(group, args: list[str], stdout_path: str, stderr_path: str) -> None:
    """In the child: file descriptors 1 and 2 on the files, SIGINT as a fresh interpreter in a terminal has it (a
    KeyboardInterrupt), logging set up anew by the group, then the group as its ``__main__`` runs it."""
    import logging
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.root.handlers[:] = []
    group.main(args, prog_name="cit")

