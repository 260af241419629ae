"""One writer per store: a lease file ``<store>.lock`` beside the store, on local paths and fsspec URLs alike.

The lease records who writes (pid, host, start time) and when it last said it is alive; a background thread renews
it.  A lease is stale — and taken over — when its holder's pid is dead on this host, or when it was not renewed for
``LEASE_SECONDS`` (a writer killed on another machine, or on a host that rebooted).  So a killed build never leaves a
lock behind for ever, and two builds started on one store cannot both run: the second is refused with one line.

The lease lives *beside* the store, not inside it: creating a store (Zarr ``mode="w"``) empties its folder.
Local files are created with ``O_EXCL``; on S3 a new lease is a conditional put (``If-None-Match: *``, s3fs's
mode ``"xb"``), so of two takers that both found no lease exactly one creates it.  Then (and on other object
stores, and when a stale lease is taken over, which is an overwrite) the taker waits a moment and reads the lease
back: the last writer wins and every other taker sees a foreign token — this also covers S3-compatible stores that
ignore the condition.  Two takers of one *stale* lease on an object store can still both win if one's read-back
comes before the other's write (a window of ``SETTLE_SECONDS``).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import fsspec

from shared.errors import CitUserError
from shared.io import is_local, local_path

LEASE_SECONDS = 120.0
RENEW_SECONDS = 30.0
SETTLE_SECONDS = 0.2


class StoreLockedError(CitUserError):
    """Another process is writing this store; the message names it (pid, host, since when)."""


@dataclass
class Lease:
    pid: int
    host: str
    started: float
    renewed: float
    token: str
    command: str = ""

    def holder(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (since {since})"

    def stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not pid_alive(self.pid):
            return True
        return now - self.renewed > LEASE_SECONDS


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (one owned by another user counts)."""
    if pid <= 0:                 # os.kill(0, 0) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by someone else
        return True
    return True


def lock_url(store_url: str) -> str:
    return store_url.rstrip("/") + ".lock"


def read_lease(store_url: str, storage_options: dict | None = None) -> Lease | None:
    """The current lease of ``store_url`` (None when there is none, or it is unreadable)."""
    url = lock_url(store_url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        with fs.open(path, "rb") as f:
            return Lease(**json.loads(f.read()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def active_lease(store_url: str, storage_options: dict | None = None) -> Lease | None:
    """The lease of a live writer of ``store_url``, else None (stale leases do not count)."""
    try:
        lease = read_lease(store_url, storage_options)
    except OSError:
        return None
    return lease if lease is not None and not lease.stale() else None


class StoreLock:
    """``with StoreLock(url):`` — hold the store's lease while writing it (see the module doc)."""

    def __init__(self, store_url: str, storage_options: dict | None = None, command: str = ""):
        self.url = lock_url(store_url)
        self.store_url = store_url
        self.options = storage_options or {}
        self.lease = Lease(os.getpid(), socket.gethostname(), time.time(), time.time(), uuid.uuid4().hex, command)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back
    def acquire(self) -> "StoreLock":
        current = read_lease(self.store_url, self.options)
        if current is not None and not current.stale():
            raise self._refusal(current)
        if is_local(self.url):
            self._acquire_local(current)
        else:
            if current is not None or not self._exclusive_create():   # a takeover, or no conditional put
                self._write(self.lease)
            time.sleep(SETTLE_SECONDS)
            now = read_lease(self.store_url, self.options)
            if now is None or now.token != self.lease.token:
                raise self._refusal(now)
        self._thread = threading.Thread(target=self._renew, name="cit-store-lease", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self, current: Lease | None) -> None:
        path = local_path(self.url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if current is not None:          # stale: take it over (a racing taker gets O_EXCL's refusal below)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            raise self._refusal(read_lease(self.store_url, self.options)) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.lease)))

    def _exclusive_create(self) -> bool:
        """Create the lease object only if there is none (S3 conditional put); False: this store has no such put.
        Raises the refusal when another taker created it first."""
        fs, path = fsspec.core.url_to_fs(self.url, **self.options)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & {"s3", "s3a"}:
            return False
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(asdict(self.lease)).encode())
        except FileExistsError:
            raise self._refusal(read_lease(self.store_url, self.options)) from None
        return True

    def _refusal(self, holder: Lease | None) -> StoreLockedError:
        who = holder.holder() if holder is not None else "another process"
        return StoreLockedError(f"{self.store_url} is being built by {who}; wait for it to finish (a killed "
                                f"writer's lock expires by itself: at once on its host, after {LEASE_SECONDS:.0f} s "
                                f"elsewhere; or delete {self.url})")

    def _write(self, lease: Lease) -> None:
        data = json.dumps(asdict(lease)).encode()
        if is_local(self.url):
            path = local_path(self.url)
            tmp = f"{path}.{lease.token}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs, path = fsspec.core.url_to_fs(self.url, **self.options)
            with fs.open(path, "wb") as f:
                f.write(data)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            self.lease.renewed = time.time()
            try:
                self._write(self.lease)
            except Exception:   # noqa: BLE001 — a missed renewal only shortens the lease; the build goes on
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = read_lease(self.store_url, self.options)
            if current is not None and current.token == self.lease.token:
                fs, path = fsspec.core.url_to_fs(self.url, **self.options)
                fs.rm(path)
        except Exception:   # noqa: BLE001 — an unremovable lease expires by itself
            pass

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
