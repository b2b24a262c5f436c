"""Writing a run's files so that a crash, a full disk or a second process never leaves a torn or
mixed-up file behind: whole-file writes go to a temporary name in the same folder and are renamed
over the target (atomic on POSIX), and one lock per run directory admits one writer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from neuronlens.errors import UserError

UMASK = os.umask(0)
os.umask(UMASK)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, so that the JSON is strict (a bare
    ``NaN`` is rejected by strict readers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (NaN and infinities as null)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def json_lines(lines: Iterable[str], where: str, error: type[UserError] = UserError,
               cut_last: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` for each non-blank line of JSON Lines; a line that is not JSON is
    one ``error`` naming it, except a last line cut off by a crash when ``cut_last`` (skipped)."""
    lines = list(lines)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            if cut_last and n == len(lines):
                return
            raise error(f"{where} line {n} is not valid JSON ({e.msg}); remove or fix that line.") from e


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``neurons.jsonl``. A last line cut off by a crash is skipped (that
    neuron is unfinished); any other line that is not a neuron's row is one clear error."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    rows = []
    for n, row in json_lines(text.splitlines(), str(path), cut_last=not text.endswith("\n")):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), int) and not isinstance(
                row.get(k), bool) for k in ("layer", "index"))):
            raise UserError(f"{path} line {n} is not a neuron's row (it needs a whole-number "
                            "\"layer\" and \"index\"); remove that line to redo its neuron.")
        rows.append(row)
    return rows


def disk_error(path: Path, e: OSError) -> UserError:
    """One sentence for a file that could not be written (read-only folder, full disk, ...)."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large"}
    return UserError(f"Could not write {path}: {why.get(e.errno, e.strerror or str(e))}; free space "
                     "or choose a writable folder (hydra.run.dir=...), then run the same command "
                     "again to resume.")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise disk_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)   # as open() would have made it (mkstemp makes 0600)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    return write_atomic(path, dumps(value, indent=indent))


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``.lock``, which holds the writer's
    pid. The kernel drops the lock when its process dies, so a stale lock is taken over."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise disk_error(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"Another neuronlens process (pid {holder}) is writing "
                            f"{self.path.parent}; wait for it, or choose another hydra.run.dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)   # releases the lock; the file stays (removing it would race)
            self._fd = None


URL_TIMEOUT_S = 60   # seconds to wait for a file fetched over HTTP


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def fetch_text(url: str, what: str, missing_ok: bool = False) -> str | None:
    """The body at ``url`` (None for a 404 when ``missing_ok``); no network, an HTTP error or a
    timeout is one clear sentence."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        if missing_ok and e.code == 404:
            return None
        raise UserError(f"Could not download {what} from {url} (HTTP {e.code}); check the path "
                        "and the neuron indices.") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"Could not download {what} from {url} ({reason}): without network access, "
                        "download the files first and point the path at the local folder.") from e
