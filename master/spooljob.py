"""The spool's files: job files (parsed and validated), the journal, and atomic writes and moves.

Socket-free on purpose (STYLE.md, habit 2): everything :mod:`ndpipe.master.spool` decides about a
job's files happens here, so the crash-point tests run it without a broker. A job file is hostile
input: it is read with a size bound, through a YAML loader that refuses aliases and duplicate keys,
validated by a frozen pydantic model, and its ``input`` must name a regular file inside inbox/.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ndpipe import protocol
from ndpipe.config import _FROZEN, ServiceName, Timeout
from ndpipe.config import _Loader as _ConfigLoader
from ndpipe.errors import NdpipeError

JOB_SUFFIX = ".job.yaml"
MAX_JOB_BYTES = 64 << 10  # a job file names a service and a file: anything bigger is not one
DIR_MODE = 0o700
KEEP_FINISHED = 10_000  # finished jobs the journal keeps at compaction: duplicates of these are refused
_TEMPS = itertools.count()


class JobError(Exception):
    """A job file or its input cannot be run; the message names the file and the key."""


class SpoolFatal(NdpipeError):
    """The daemon cannot go on (not a job's fault): it exits 1, systemd restarts it, the journal resumes."""


class MasterClosed(SpoolFatal):
    """The Master's I/O thread is gone: no job can run; the job stays journaled and reruns at the restart."""


def is_closed(exc: BaseException) -> bool:
    """An error of a Master that closed under us (``master is closed``, ``master closed before …``)."""
    return isinstance(exc, MasterClosed) or (
        isinstance(exc, NdpipeError) and str(exc).startswith(("master is closed", "master closed")))


class JobSpec(BaseModel):
    """``NAME.job.yaml``: what to run on which input. Exactly one of ``service`` and ``pipeline``."""

    model_config = _FROZEN
    service: ServiceName | None = None
    pipeline: list[ServiceName] | None = Field(None, min_length=2, max_length=protocol.MAX_STAGES)
    input: str
    mode: Literal["call", "scatter"] = "call"
    shards: int | None = Field(None, ge=1, le=65536, strict=True)
    axis: int = Field(0, strict=True)
    timeout: Timeout = None

    @model_validator(mode="after")
    def _one_target(self) -> JobSpec:
        if (self.service is None) == (self.pipeline is None):
            raise ValueError("name exactly one of 'service' and 'pipeline'")
        if self.pipeline is not None and self.mode == "scatter":
            raise ValueError("mode 'scatter' runs one service; a pipeline runs in mode 'call'")
        if self.mode == "call" and self.shards is not None:
            raise ValueError("'shards' needs mode 'scatter'")
        return self


# The config's loader (duplicate keys refused), and no aliases: `&a [*a, *a, …]` nests exponentially,
# and a validation error would repr the whole expansion.
_Loader: Any = type("_JobLoader", (_ConfigLoader,), {})


def _compose_node(self: Any, parent: Any, index: Any) -> Any:
    if self.check_event(yaml.AliasEvent):
        event = self.peek_event()
        raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a job file",
                                          event.start_mark)
    return yaml.composer.Composer.compose_node(self, parent, index)


_Loader.compose_node = _compose_node


def job_name(file_name: str) -> str | None:
    """``NAME`` of ``NAME.job.yaml``; None for anything else, and for dot-files (drops in progress)."""
    if file_name.startswith(".") or not file_name.endswith(JOB_SUFFIX) or file_name == JOB_SUFFIX:
        return None
    return file_name[: -len(JOB_SUFFIX)]


def _open_regular(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file, not following a symlink and never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobError(f"{what} {path.name}: no such file") from None
    except OSError as exc:
        raise JobError(f"{what} {path.name}: cannot open ({exc.strerror or exc}; a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobError(f"{what} {path.name}: not a regular file")
        data = f.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise JobError(f"{what} {path.name}: larger than {limit} bytes; a job file names a service and an input")
    return data


def _problems(exc: ValidationError, label: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), list(JobSpec.model_fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(JobSpec.model_fields)
            problem = f"unknown key ({hint})"
        elif err["type"] == "missing":
            problem = "missing required key"
        else:
            shown = repr(err["input"])
            problem = f"{err['msg']} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        lines.append(f"{label}: {key}: {problem}")
    return "\n".join(lines)


def task_count(spec: JobSpec, default_shards: int) -> int:
    """The most tasks the job sends at once (a scatter's shards; else 1: a pipeline is one task)."""
    return (spec.shards or default_shards) if spec.mode == "scatter" else 1


def parse_job(inbox: Path, name: str, window: int | None = None, default_shards: int = 1) -> JobSpec:
    """Read and validate ``inbox/NAME.job.yaml`` (JobError naming the file and key). ``window``: the
    master's; a job of more tasks could never be sent whole, and would block the daemon's loop."""
    label = name + JOB_SUFFIX
    raw = _open_regular(inbox / label, "job file", MAX_JOB_BYTES)
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_Loader)
    except UnicodeDecodeError as exc:
        raise JobError(f"{label}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise JobError(f"{label}: {where}invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise JobError(f"{label}: must be a mapping with 'service' (or 'pipeline') and 'input', "
                       f"got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(_problems(exc, label)) from None
    input_path(inbox, spec, label)
    if window is not None and task_count(spec, default_shards) > window:
        raise JobError(f"{label}: shards: {task_count(spec, default_shards)} tasks (shards, or spool.shards when the "
                       f"file names none) exceed master.window ({window}); ask for at most {window} shards")
    return spec


def input_path(inbox: Path, spec: JobSpec, label: str) -> Path:
    """``inbox/<input>``, refused unless it is a plain name of a file directly in inbox/ (no
    ``..``, no absolute path, no directory, no symlink out)."""
    given = spec.input
    if not given or "/" in given or "\\" in given or given in (".", "..") or given.startswith(".") or "\0" in given:
        raise JobError(f"{label}: input: must be the name of a file in inbox/ (no directories, no '..'), "
                       f"got {given!r:.80}")
    return inbox / given


def _check_size(f: Any, size: int, limit: int, label: str, given: str) -> None:
    """Refuse an input over ``limit`` bytes from its file size and its .npy header, before loading it."""
    too_big = f"{label}: input: {given}: %s bytes, over spool.max_input_bytes ({limit}); split the job or raise it"
    if size > limit:
        raise JobError(too_big % f"{size}")
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, EOFError, OSError):
        f.seek(0)
        return  # not a .npy header: np.load says what it is
    f.seek(0)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise JobError(too_big % f"an array of shape {shape} and dtype {dtype}: {nbytes}")


def load_input(inbox: Path, name: str, spec: JobSpec, max_bytes: int | None = None) -> np.ndarray:
    """The job's input array: a .npy file, no pickle, no object dtype, at most ``max_bytes`` (JobError
    saying what is wrong)."""
    label = name + JOB_SUFFIX
    path = input_path(inbox, spec, label)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobError(f"{label}: input: {spec.input} not found in inbox/ (write it before the job file)") from None
    except OSError as exc:
        raise JobError(f"{label}: input: {spec.input}: cannot open ({exc.strerror or exc}; a symlink is refused)"
                       ) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobError(f"{label}: input: {spec.input} is not a regular file")
        if max_bytes is not None:
            _check_size(f, os.fstat(fd).st_size, max_bytes, label, spec.input)
        try:
            data = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise JobError(f"{label}: input: {spec.input}: not a .npy array without pickled objects: {exc}") from None
    if not isinstance(data, np.ndarray):
        raise JobError(f"{label}: input: {spec.input}: a .npz archive; give one array as .npy")
    if spec.mode == "scatter" and (data.ndim == 0 or not -data.ndim <= spec.axis < data.ndim):
        raise JobError(f"{label}: axis: {spec.axis} is out of range for an array of shape {data.shape}")
    return data


def as_output(result: Any) -> np.ndarray:
    """A job's output must be a numeric array (saved without pickle)."""
    array = np.asarray(result)
    if array.dtype.hasobject:
        raise TypeError(f"the result is not a numeric array (a {type(result).__name__} that makes an object array)")
    return array


def input_if_named(inbox: Path, name: str) -> str:
    """The input a refused job names, if its file parses that far (to move it along); else ""."""
    try:
        return str(parse_job(inbox, name).input)
    except JobError:
        return ""


def finish_rename(outbox: Path, name: str, tmp_name: str) -> None:
    """Recovery of a ``committed`` job: rename its temporary output if the kill came before that."""
    if not tmp_name or "/" in tmp_name or not tmp_name.startswith(".tmp-"):
        return
    tmp = outbox / tmp_name
    if tmp.is_file():
        os.replace(tmp, outbox / f"{name}.npy")
        fsync_dir(outbox)


# ---- durable file operations ----------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A dot-file beside ``path`` whose name is short whatever ``path``'s (a 246-byte job name plus a
    suffix would pass NAME_MAX); :func:`clean_temps` finds it by its ``.tmp-`` prefix."""
    return path.with_name(f".tmp-{os.getpid()}-{next(_TEMPS)}")


def write_atomic(path: Path, write: Any, before_rename: Callable[[Path], None] | None = None) -> None:
    """``write(file)`` into a dot-file beside ``path``, fsync, rename onto ``path``, fsync the
    directory: ``path`` either does not exist or holds all of it (the rename is the commit).
    ``before_rename(tmp)`` runs once the temporary is durable (the spool journals it there); a
    failure while writing removes the temporary, one in ``before_rename`` is its caller's to clean."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if before_rename is not None:
        before_rename(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_array(path: Path, array: np.ndarray, before_rename: Callable[[Path], None] | None = None) -> None:
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False), before_rename)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8", "replace")))


def move(src: Path, dest_dir: Path, inode: int | None = None) -> bool:
    """Move ``src`` into ``dest_dir`` (keeping its name unless one is there already: then
    ``NAME.<n>``); False if ``src`` is gone, or is not the file ``inode`` says it was (replaced by
    a new drop, which the scanner then sees on its own)."""
    try:
        st = src.lstat()
    except FileNotFoundError:
        return False
    if inode is not None and st.st_ino != inode:
        return False
    dest, n = dest_dir / src.name, 1
    while os.path.lexists(dest):
        dest, n = dest_dir / f"{src.name}.{n}", n + 1
    os.replace(src, dest)
    return True


def clean_temps(directory: Path) -> int:
    """Remove the dot-file temporaries a killed writer left in ``directory``; how many."""
    removed = 0
    for entry in os.scandir(directory):
        if entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed += 1
    return removed


# ---- the journal --------------------------------------------------------------------------------------
class Journal:
    """Append-only JSON lines, one fsync per record: ``{"job", "state", ...}`` with state
    ``started`` (with the input's name and the job file's inode), ``committed`` (with the durable
    temporary output's name, just before its rename), ``done`` or ``failed``.

    A kill -9 can tear only the last line; it is cut off at open. Each start rewrites the file with
    the last record of each job (atomically), keeping every unfinished job and the last ``keep``
    finished ones (``done``/``failed``): it grows with neither restarts nor the spool's age, and a
    duplicate of an older name is no longer recognised (it runs)."""

    def __init__(self, path: Path, keep: int = KEEP_FINISHED) -> None:
        self.path = path
        self.last: dict[str, dict[str, Any]] = {}
        torn = False
        if path.exists():
            text = path.read_bytes()
            end = text.rfind(b"\n") + 1
            torn = end != len(text)
            for line in text[:end].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    torn = True
                    continue
                if isinstance(record, dict) and isinstance(record.get("job"), str):
                    self.last.pop(record["job"], None)  # re-inserted: the order is that of last records
                    self.last[record["job"]] = record
        self.torn = torn
        finished = [job for job, r in self.last.items() if r.get("state") in ("done", "failed")]
        for job in finished[: max(0, len(finished) - keep)]:
            del self.last[job]
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.last.values())
        write_text(path, body)
        self._f = open(path, "a", encoding="utf-8")

    def record(self, job: str, state: str, **extra: Any) -> None:
        entry = {"job": job, "state": state, **extra}
        self._f.write(json.dumps(entry, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.last.pop(job, None)
        self.last[job] = entry

    def state(self, job: str) -> str | None:
        record = self.last.get(job)
        return None if record is None else str(record["state"])

    def close(self) -> None:
        self._f.close()


def make_dirs(root: Path) -> dict[str, Path]:
    """The spool's directories (created 0700 if missing); a ConfigError-worthy OSError propagates."""
    dirs = {name: root / name for name in ("inbox", "outbox", "done", "failed")}
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for path in dirs.values():
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    return dirs
