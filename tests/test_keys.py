"""``ndpipe keys``: CurveZMQ key pairs written as ZeroMQ certificates, never overwritten, usable by
libzmq as they are (a CURVE handshake with them), and every bad input a clear error with exit 2."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from ndpipe.errors import ConfigError
from ndpipe.keys import generate, load

pytestmark = pytest.mark.timeout(60)


def ndpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ndpipe.cli", *args], capture_output=True, text=True, timeout=60)


def test_generate_writes_a_public_file_anyone_may_read_and_a_secret_only_its_owner_may(tmp_path: Path) -> None:
    public_file, secret_file = generate("broker", tmp_path / "keys")
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    public, no_secret = load(public_file)
    same_public, secret = load(secret_file)
    assert no_secret is None and secret is not None and public == same_public == zmq.curve_public(secret)
    assert len(public) == 40 and b"secret" not in public_file.read_bytes()


def test_an_existing_pair_is_never_overwritten(tmp_path: Path) -> None:
    public_file, secret_file = generate("w1", tmp_path)
    before = secret_file.read_bytes()
    with pytest.raises(ConfigError, match="w1.key_secret exists: not overwritten"):
        generate("w1", tmp_path)
    secret_file.unlink()  # only the public half left: still refused (it names someone's identity)
    with pytest.raises(ConfigError, match="w1.key exists"):
        generate("w1", tmp_path)
    assert public_file.exists() and before


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 101])
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="a file name, no path"):
        generate(name, tmp_path)


def test_bad_key_files_are_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such key file"):
        load(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="junk.key is not a ZeroMQ key file"):
        load(junk)
    _, secret_file = generate("a", tmp_path)
    _, other_secret = zmq.curve_keypair()
    text = secret_file.read_text()
    secret = load(secret_file)[1]
    assert secret is not None
    secret_file.write_text(text.replace(secret.decode(), other_secret.decode()))
    with pytest.raises(ConfigError, match="its secret key does not belong to its public key"):
        load(secret_file)


def test_libzmq_takes_the_keys_as_they_are(tmp_path: Path) -> None:
    server_public, server_secret = load(generate("srv", tmp_path)[1])
    client_public, client_secret = load(generate("cli", tmp_path)[1])
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.REP)
        server.curve_server, server.curve_secretkey = True, server_secret
        server.bind(f"ipc://{tmp_path}/s")
        client = ctx.socket(zmq.REQ)
        client.curve_serverkey, client.curve_publickey, client.curve_secretkey = \
            server_public, client_public, client_secret
        client.connect(f"ipc://{tmp_path}/s")
        client.send(b"ping")
        assert server.poll(10_000) and server.recv() == b"ping"
        server.send(b"pong")
        assert client.poll(10_000) and client.recv() == b"pong"
    finally:
        ctx.destroy(linger=0)


def test_the_cli_generates_and_shows_and_refuses_with_exit_2(tmp_path: Path) -> None:
    made = ndpipe("keys", "generate", "m1", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    public = load(tmp_path / "m1.key")[0].decode()
    assert made.stdout.splitlines()[-1] == public
    for file in ("m1.key", "m1.key_secret"):
        shown = ndpipe("keys", "show", str(tmp_path / file))
        assert shown.returncode == 0 and shown.stdout.strip() == public
    again = ndpipe("keys", "generate", "m1", "--dir", str(tmp_path))
    assert again.returncode == 2 and "not overwritten" in again.stderr
    missing = ndpipe("keys", "show", str(tmp_path / "nope.key"))
    assert missing.returncode == 2 and "no such key file" in missing.stderr
