"""What a user sees when something goes wrong: one line naming the culprit and what to do, never a traceback for
a user's mistake, and an exit code a script can test.

- ``CitUserError`` (a ``ValueError``, so ``except ValueError`` keeps working) is the base of every error about the
  user's input: ``ConfigError``, ``ManifestError``, ``ShardError``, ``CacheError``, ``BuildError``, ``DataError``,
  ``CheckpointError``, ``PrepareError``.  Their message is the whole story.  Exit code 2, like a usage error.
- The machine says no (any ``OSError``: disk full, permission denied, a read-only folder, a path that is a
  directory; an object store that cannot be reached): one line too, exit code 2, with how to resume where that
  applies.
- Ctrl-C: the work is resumable; the line says how.  Exit code 130 (128 + SIGINT), as shells report it.
- Anything else is a bug: the traceback is shown.  ``CIT_DEBUG=1`` shows it for every error.

Errors raised inside DataLoader workers reach the main process re-raised by torch with the worker's whole traceback
as their text; ``user_message`` unwraps them to the worker's own last line.
"""
from __future__ import annotations

import errno
import importlib
import os
import re
import shlex
import sys

import click

EXIT_USER = 2
EXIT_INTERRUPTED = 130
PROJECT_PACKAGES = ("shared", "cache_builder", "trainer")


class CitUserError(ValueError):
    """A mistake in the user's input: the message names the file, shard, key or option, and what to do."""


class CitError(click.ClickException):
    """How a user error leaves the CLI: ``Error: <one line>`` on stderr and exit code 2."""
    exit_code = EXIT_USER


class CitInterrupted(click.ClickException):
    """Ctrl-C: ``Interrupted: <how to resume>``, exit code 130."""
    exit_code = EXIT_INTERRUPTED

    def show(self, file=None) -> None:
        click.echo(f"Interrupted: {self.format_message()}", err=True)


# --------------------------------------------------------------------------------------------------------------
# How to resume: each command says it once, the handlers use it

_RESUME_HINT: list[str] = []


def set_resume_hint(hint: str) -> None:
    """What a user should do to continue this command's work after an interruption or a full disk."""
    _RESUME_HINT[:] = [hint]


def resume_hint() -> str:
    return _RESUME_HINT[0] if _RESUME_HINT else ""


def command_line(ctx: click.Context | None = None) -> list[str]:
    """The command as the user typed it, as ``cit ...`` (also when started as ``python -m trainer.cli ...``)."""
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    args = root.meta.get("cit.argv") if root is not None else None
    return ["cit", *(sys.argv[1:] if args is None else args)]


def with_resume_flag(ctx: click.Context | None = None) -> str:
    """The exact command to continue a training: the same one with ``--resume`` (unless it is already there)."""
    args = command_line(ctx)
    args = [a for a in args if a != "--force"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(args)


# --------------------------------------------------------------------------------------------------------------
# Classifying an exception

_WORKER = re.compile(r"^Caught (\w+) (in DataLoader worker process \d+|in pin memory thread.*?)\.\nOriginal ", re.S)
_LAST_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_MACHINE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "the file system is read-only", errno.EISDIR: "it is a directory, not a file",
                   errno.ENOTDIR: "a part of the path is not a directory", errno.ENOENT: "no such file or directory"}
_FREE_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _is_project_user_type(exc_type: type) -> bool:
    if issubclass(exc_type, CitUserError):
        return True
    return (issubclass(exc_type, ValueError) and exc_type is not ValueError
            and exc_type.__module__.split(".")[0] in PROJECT_PACKAGES)


def _type_named(qualname: str) -> type | None:
    """``shared.shards.ShardError`` -> the class, if it is importable (only project modules are tried)."""
    module, _, name = qualname.rpartition(".")
    if not module or module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:   # noqa: BLE001 — an unknown name is simply not ours
        return None


def _unwrap_worker(exc: BaseException) -> tuple[str, str] | None:
    """(type name, original message) of an error torch re-raised from a DataLoader worker, else None."""
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else ""
    match = _WORKER.match(text)
    if not match:
        return None
    for line in reversed(text.rstrip().splitlines()):
        last = _LAST_LINE.match(line)
        if last and last.group(1).rsplit(".", 1)[-1] == match.group(1):
            return last.group(1), last.group(2)
    return match.group(1), text.rstrip().splitlines()[-1]


def _machine_message(exc: OSError) -> str:
    what = _MACHINE_ERRNOS.get(exc.errno or -1, exc.strerror or " ".join(str(exc).split()))
    target = exc.filename if exc.filename is not None else ""
    line = f"cannot write {target}: {what}" if exc.errno in _FREE_SPACE else f"{target}: {what}" if target else what
    if exc.errno in _FREE_SPACE:
        line += "; free some space (or choose another --out)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        line += "; choose a folder you can write to (--out) or fix its permissions"
    elif exc.errno == errno.EISDIR:
        line += f"; give files (for shards e.g. {os.path.join(str(target), '*.tar')})"
    hint = resume_hint()
    if hint and exc.errno not in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
        line += f"; then {hint}"
    return line


def _remote_message(exc: BaseException) -> str | None:
    """An object store that cannot be reached (s3fs / botocore / aiohttp): one line, the work is resumable."""
    names = {type(e).__name__ for e in _chain(exc)}
    connection = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                  "ServerDisconnectedError", "ConnectionClosedError", "ConnectionRefusedError"}
    if not names & connection:
        return None
    line = f"lost the connection to the storage endpoint ({' '.join(str(exc).split())[:200]})"
    hint = resume_hint()
    return line + (f"; the work done so far is kept: {hint}" if hint else "")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_message(exc: BaseException) -> str | None:
    """The one line to show for ``exc`` if it is a user's or the machine's problem; None for a bug."""
    wrapped = _unwrap_worker(exc)
    if wrapped is not None:
        qualname, message = wrapped
        exc_type = _type_named(qualname) or type(exc)
        if isinstance(exc_type, type) and (_is_project_user_type(exc_type) or issubclass(exc_type, OSError)):
            return f"{message} (in a DataLoader worker)" if issubclass(exc_type, OSError) else message
        if qualname.rsplit(".", 1)[-1] in ("FileNotFoundError", "PermissionError", "IsADirectoryError"):
            return message
        return None
    if "DataLoader worker (pid" in str(exc) and isinstance(exc, RuntimeError):
        hint = resume_hint()
        return (f"{str(exc).splitlines()[0]} (killed, or out of memory?)" + (f"; {hint}" if hint else ""))
    if _is_project_user_type(type(exc)):
        return " ".join(str(exc).split("\n"))
    remote = _remote_message(exc)
    if remote is not None:
        return remote
    for link in _chain(exc):   # the machine or a store said no (OSError is never a bug in this code's logic)
        if isinstance(link, OSError):
            return _machine_message(link)
    return None


def translate(exc: BaseException, ctx: click.Context | None = None) -> click.ClickException | None:
    """The click exception to raise instead of ``exc`` (None: let it through, with its traceback)."""
    if isinstance(exc, (click.ClickException, click.exceptions.Exit, click.Abort)) or os.environ.get("CIT_DEBUG"):
        return None
    if isinstance(exc, KeyboardInterrupt):
        hint = resume_hint()
        return CitInterrupted(hint or "stopped before it finished")
    message = user_message(exc)
    return None if message is None else CitError(message)


class CitGroup(click.Group):
    """A click group whose commands' user errors leave as one line (see the module doc)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            ctx.meta["cit.argv"] = list(args)   # the command as typed, for "continue with: cit ... --resume"
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            replacement = translate(exc, ctx)
            if replacement is None:
                raise
            raise replacement from None
