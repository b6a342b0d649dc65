"""The ndpipe worker daemon and its compute processes."""

from ndpipe.worker.daemon import WorkerDaemon, serve

__all__ = ["WorkerDaemon", "serve"]
