"""Logging to stderr for the ndpipe daemons: plain text on a terminal, syslog-prefixed under journald.

Why stderr only: systemd (and docker, and a terminal) already collect stderr; files would need
rotation and a writable path, which the hardened units do not give. Under journald each line starts
with ``<N>`` so ``journalctl -p warning`` works, and carries no timestamp because the journal adds one.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from ndpipe.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "text", "journal")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
_MARK = "_ndpipe_handler"  # attribute on our handler, so a second call replaces it instead of adding one
_active: tuple[str, str] | None = None  # (level, format) of the last setup_logging, for spawned lanes


def _priority(levelno: int) -> int:
    """syslog priority for sd-daemon(3) prefixes: err 3, warning 4, info 6, debug 7."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<6>ndpipe.worker[compute-2/4711]: message``, the prefix repeated on every line.

    Repeating it keeps a traceback at ERROR priority: journald starts a new entry at each newline.
    Process name and pid are kept because compute children share the daemon's stderr stream, so
    the journal attributes all their lines to the main pid.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s[%(processName)s/%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def under_journald(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd named in $JOURNAL_STREAM."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):  # no fileno (pytest capture, io.StringIO) or closed
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str, fmt: str = "auto", name: str = "ndpipe") -> None:
    """Send logger ``name`` (and its children) to stderr at ``level`` in ``fmt``.

    Idempotent: a second call replaces the handler it installed, so changing level or format at run
    time works and no line is printed twice. Handlers installed by others are left alone.
    """
    level_name = str(level).upper()
    if level_name not in LEVELS:
        raise ConfigError(f"logging.level: expected one of {', '.join(LEVELS)} (got {level!r})")
    fmt_name = str(fmt).lower()
    if fmt_name not in FORMATS:
        raise ConfigError(f"logging.format: expected one of {', '.join(FORMATS)} (got {fmt!r})")
    journal = fmt_name == "journal" or (fmt_name == "auto" and under_journald())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TEXT_FORMAT))
    setattr(handler, _MARK, True)
    logger = logging.getLogger(name)
    for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(level_name)
    global _active
    _active = (level_name, "journal" if journal else "text")


def active() -> tuple[str, str] | None:
    """(level, format) as set up in this process, or None: what a spawned lane sets up again (a spawned
    process starts with logging unconfigured, and its lines would lose their level and name)."""
    return _active


class LibraryFallback(logging.Handler):
    """What a user's script sees of ndpipe's warnings when it configured no logging: the line with its
    level and logger name on stderr, where Python's last-resort handler prints the bare message.

    Silent as soon as anything else would print the record (a handler on the root logger, or
    setup_logging's on "ndpipe"), so configuring logging never doubles a line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger("ndpipe")
        if logging.getLogger().handlers or any(getattr(h, _MARK, False) for h in logger.handlers):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a closed stderr must not break the caller
            self.handleError(record)


def install_library_fallback() -> None:
    """Once per process, from ``import ndpipe``."""
    logger = logging.getLogger("ndpipe")
    if not any(isinstance(h, LibraryFallback) for h in logger.handlers):
        logger.addHandler(LibraryFallback())
