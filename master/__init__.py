"""The ndpipe master: the ``Master`` client and the ``ndpipe submit`` command."""

from ndpipe.master.client import Master

__all__ = ["Master"]
