"""CurveZMQ for ndpipe's sockets: key loading, client and server set-up, the broker's allow-lists.

Why this shape (PROTOCOL.md §13): every socket that crosses a host speaks CURVE when
``security.curve`` is on; the broker authenticates each connection through ZAP against three
allow-lists (masters, workers, admins) and then authorises **each message** by the key libzmq
attaches to it (the ZAP User-Id), never by its routing id: a routing id is only a name a peer
chose or was given, and anyone who knows it can present it. Checking the key per message also
makes a SIGHUP reload take effect at once: a key removed from a list is refused from its next
message on, while connections of keys still allowed are never touched.

Nothing here holds a socket except :func:`client` / :func:`server`, which only set options.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.z85

from ndpipe import keys
from ndpipe.config import SecurityConfig
from ndpipe.errors import ConfigError

log = logging.getLogger("ndpipe.security")

MASTERS, WORKERS = "ndpipe-masters", "ndpipe-workers"  # ZAP domains of the frontend and the backend
_TCP_HOST = re.compile(r"tcp://(?P<host>.+):[0-9]+")
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def tag(ident: bytes) -> str:
    """A routing id as logs show it: a short hash. The id itself is never logged at INFO: knowing a
    peer's routing id is what a connection takeover needs."""
    return hashlib.blake2b(ident, digest_size=4).hexdigest()


@dataclass(frozen=True)
class Curve:
    """This program's key pair and, for a client, the broker's public key it pins (Z85, 40 bytes)."""

    public: bytes
    secret: bytes
    server: bytes | None = None


def _key_file(name: str, path: str | None, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from the file ``security.<name>`` names; ConfigError naming the key."""
    if not path:
        raise ConfigError(f"security.{name}: required with security.curve: true ({what})")
    try:
        return keys.load(path)
    except ConfigError as exc:
        raise ConfigError(f"security.{name}: {exc}") from None


def _pair(sec: SecurityConfig) -> tuple[bytes, bytes]:
    public, secret = _key_file("secret_key", sec.secret_key, "this program's key pair; create one with: "
                               "ndpipe keys generate NAME --dir /etc/ndpipe/keys")
    if secret is None:
        raise ConfigError(f"security.secret_key: {sec.secret_key} holds only a public key (use NAME.key_secret)")
    return public, secret


def server_curve(sec: SecurityConfig) -> Curve | None:
    """The broker's own pair, or None when curve is off."""
    return Curve(*_pair(sec)) if sec.curve else None


def client_curve(sec: SecurityConfig) -> Curve | None:
    """A master's or worker's pair and the broker key it pins, or None when curve is off."""
    if not sec.curve:
        return None
    public, secret = _pair(sec)
    server, _ = _key_file("broker_key", sec.broker_key, "the broker's public key file, NAME.key: a broker with "
                          "any other key is refused")
    return Curve(public, secret, server)


def client(sock: zmq.Socket[Any], curve: Curve | None) -> zmq.Socket[Any]:
    """Make ``sock`` a CURVE client of the pinned broker key (before it connects)."""
    if curve is not None:
        assert curve.server is not None
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server
    return sock


def server(sock: zmq.Socket[Any], curve: Curve | None, domain: str) -> zmq.Socket[Any]:
    """Make ``sock`` a CURVE server whose connections ZAP checks in ``domain`` (before it binds)."""
    if curve is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.zap_domain = domain.encode()
    return sock


def exposed(endpoint: str) -> bool:
    """A TCP endpoint another host could reach: any address but loopback (``*`` and 0.0.0.0 included)."""
    match = _TCP_HOST.fullmatch(endpoint)
    if match is None:
        return False  # ipc:// and inproc:// stay on this host
    host = match["host"].strip("[]")
    if host in LOOPBACK_NAMES:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # '*', an interface name or a host name


def insecure_binds(sec: SecurityConfig, endpoints: dict[str, str]) -> list[str]:
    """The ``broker.KEY`` endpoints that would take plaintext from other hosts, unless curve is on or
    ``security.insecure`` says the operator chose that."""
    if sec.curve or sec.insecure:
        return []
    return [f"broker.{key}: {endpoint}" for key, endpoint in endpoints.items() if exposed(endpoint)]


INSECURE_HINT = ("anyone who can reach it could submit, register as a worker and read every payload. "
                 "Turn on CurveZMQ: 'ndpipe keys generate broker --dir /etc/ndpipe/keys' (and one pair per "
                 "master and worker host), then set security.curve: true (see README, 'Run it across machines'); "
                 "or set security.insecure: true to accept plaintext on a network you trust")


def _read_dir(key: str, folder: str | None) -> frozenset[bytes]:
    """Public keys of every ``*.key`` file in ``folder`` (secret files are skipped)."""
    if folder is None:
        return frozenset()
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"security.{key}: {folder} is not a directory of public key files (NAME.key)")
    found = set()
    for file in sorted(path.glob("*.key")):
        try:
            public, _ = keys.load(file)
        except ConfigError as exc:
            raise ConfigError(f"security.{key}: {exc}") from None
        found.add(public)
    return frozenset(found)


@dataclass(frozen=True)
class AllowLists:
    """Which public key may do what (Z85 bytes). A key may be in several lists."""

    masters: frozenset[bytes] = frozenset()
    workers: frozenset[bytes] = frozenset()
    admins: frozenset[bytes] = frozenset()

    @classmethod
    def load(cls, sec: SecurityConfig) -> AllowLists:
        """Read the three directories; ConfigError naming the key and file of the first problem."""
        if sec.masters is None or sec.workers is None:
            missing = "security.masters" if sec.masters is None else "security.workers"
            raise ConfigError(f"{missing}: required on the broker with security.curve: true (a directory of "
                              "allowed public keys, NAME.key files)")
        return cls(_read_dir("masters", sec.masters), _read_dir("workers", sec.workers),
                   _read_dir("admins", sec.admins))

    def admits(self, domain: str, key: bytes) -> bool:
        """ZAP: may a connection with ``key`` open on the socket of ``domain``? Masters and admins on
        the frontend, workers on the backend; nobody else, and no other socket."""
        if domain == MASTERS:
            return key in self.masters or key in self.admins
        if domain == WORKERS:
            return key in self.workers
        return False

    def describe(self) -> str:
        return f"{len(self.masters)} master, {len(self.workers)} worker, {len(self.admins)} admin keys"


def zap_reply(lists: AllowLists, request: list[bytes]) -> tuple[list[bytes], str | None]:
    """Answer one ZAP request (RFC 27: version, request id, domain, address, identity, mechanism,
    credentials…); returns the reply frames and, when refused, why (for the log).

    The User-Id of an accepted connection is its public key in Z85: libzmq attaches it to every
    message from that connection, and the broker authorises by it."""
    if len(request) < 6:
        return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""], "malformed ZAP request"
    version, rid, domain, address, _, mechanism = request[:6]
    if version != b"1.0":
        return [b"1.0", rid, b"500", b"version 1.0 only", b"", b""], f"ZAP version {version!r}"
    who = address.decode(errors="replace")
    if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
        why = f"{who}: {mechanism.decode(errors='replace')} refused"
        return [version, rid, b"400", b"CURVE only", b"", b""], why
    key = zmq.utils.z85.encode(request[6])
    if not lists.admits(domain.decode(errors="replace"), key):
        role = "master or admin" if domain == MASTERS.encode() else "worker"
        why = f"{who}: key {key.decode()} is not an allowed {role} key"
        return [version, rid, b"400", b"key not allowed", b"", b""], why
    return [version, rid, b"200", b"OK", key, b""], None
