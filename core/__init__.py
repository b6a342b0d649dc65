"""ndpipe: a ZeroMQ task pipeline for numpy work.

``from ndpipe import Master`` is the user-facing API; the daemons are started with the ``ndpipe``
command (``ndpipe broker``, ``ndpipe worker``, ``ndpipe demo`` …).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ndpipe.master.client import Master
    from ndpipe.refs import Ref

__all__ = ["Master", "Ref", "__version__"]

from ndpipe.logsetup import install_library_fallback  # noqa: E402  (warnings in a user's script carry level and name)

install_library_fallback()


def __getattr__(name: str) -> Any:
    # Lazy, so `import ndpipe.broker` does not pull in the master's thread machinery.
    if name == "Master":
        from ndpipe.master.client import Master

        return Master
    if name == "Ref":
        from ndpipe.refs import Ref

        return Ref
    raise AttributeError(name)
