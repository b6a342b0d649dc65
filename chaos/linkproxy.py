"""A byte-level proxy in front of a broker socket, to cut or freeze one peer's link on loopback.

ZeroMQ speaks the same ZMTP stream over ``tcp://`` and ``ipc://``, so the proxy listens on
``127.0.0.1`` (an OS-chosen port: no free-port race) and forwards each connection to the broker's
ipc path (or a tcp address). Faults, each on the links through it only:

* :meth:`cut` resets every connection (RST both ways) and refuses new ones until :meth:`restore`:
  a dropped link that comes back, as after a cable pull or a NAT timeout;
* :meth:`freeze` stops forwarding on the connections open now, both ways, and leaves them open,
  while new connections work: a link that went silent without closing.

One thread, one ``selectors`` loop, bounded by ``lifetime`` seconds; :meth:`close` ends it.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time


class LinkProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` (``ipc:///path`` or ``tcp://host:port``)."""

    def __init__(self, upstream: str, lifetime: float = 900.0) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.refusing = False
        self.accepted = 0
        self._pairs: dict[socket.socket, socket.socket] = {}  # both directions: a -> b and b -> a
        self._frozen: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._run, name="link-proxy", daemon=True)
        self._thread.start()

    def _connect_upstream(self) -> socket.socket:
        if self.upstream.startswith("ipc://"):
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.upstream[len("ipc://"):])
            except OSError:
                up.close()
                raise
        else:
            host, port = self.upstream[len("tcp://"):].rsplit(":", 1)
            up = socket.create_connection((host, int(port)))
        return up

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            for key, _ in self._sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            if self.refusing:
                _reset(client)
                return
            try:
                up = self._connect_upstream()
            except OSError:
                _reset(client)
                return
            self.accepted += 1
            for a, b in ((client, up), (up, client)):
                a.setblocking(True)
                a.settimeout(5.0)
                self._pairs[a] = b
                self._sel.register(a, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.get(sock)
            if peer is None or sock in self._frozen:
                return
            try:
                data = sock.recv(65536)
                if data:
                    peer.sendall(data)
                    return
            except OSError:
                pass
            self._drop(sock, reset=False)

    def _drop(self, sock: socket.socket, reset: bool) -> None:
        peer = self._pairs.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._pairs.pop(s, None)
            self._frozen.discard(s)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset(s)
            else:
                s.close()

    # ---- faults ---------------------------------------------------------------------------------
    def cut(self) -> None:
        """Reset every connection through the proxy and refuse new ones until :meth:`restore`."""
        with self._lock:
            self.refusing = True
            for sock in list(self._pairs):
                if sock in self._pairs:
                    self._drop(sock, reset=True)

    def restore(self) -> None:
        with self._lock:
            self.refusing = False

    def freeze(self) -> None:
        """Stop forwarding on every connection open now (both ways), keeping them open."""
        with self._lock:
            for sock in self._pairs:
                if sock not in self._frozen:
                    self._frozen.add(sock)
                    self._sel.unregister(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for sock in list(self._pairs):
                if sock in self._pairs:
                    self._drop(sock, reset=True)
        self._sel.close()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the peer sees the link broken, as after a failure."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
