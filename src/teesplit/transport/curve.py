"""CurveZMQ keys for the link between the runner and the GPU server (shared by both sides).

Keys follow ZeroMQ's certificate convention (`zmq.auth`): ``DIR/NAME.key`` holds the public
key, ``DIR/NAME.key_secret`` the public and the secret key. The server is given its secret
file and a directory of allowed runners' public ``.key`` files; a runner is given its own
secret file and the server's public ``.key``. With CURVE on, every frame on the link is
encrypted and authenticated (Curve25519 key exchange, XSalsa20-Poly1305 per message), and a
runner whose public key is not in the allow-list is refused during the handshake.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq

from teesplit.errors import UsageError


class CurveError(UsageError):
    """A key file is missing or malformed, or CURVE is not available in this libzmq."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveError("this libzmq was built without CURVE support; install a pyzmq wheel with libsodium")


def generate_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600); refuse to overwrite."""
    import zmq.auth

    _require_curve()
    directory = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"key name {name!r} must be a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise CurveError(f"{p} exists already; choose another --name or remove it")
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def _load(path: str | Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise CurveError(f"key file {path} not found")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as e:  # malformed certificate text
        raise CurveError(f"{path} is not a ZeroMQ certificate file: {e}") from None
    if public is None or len(public) != 40:
        raise CurveError(f"{path} holds no valid public key")
    if need_secret and (secret is None or len(secret) != 40):
        raise CurveError(f"{path} holds no secret key: pass the NAME.key_secret file")
    return public, secret


@dataclass(frozen=True)
class CurveClient:
    """A runner's keys: its own keypair and the server's public key (Z85 text, 40 bytes each)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, secret_file: str | Path, server_key_file: str | Path) -> CurveClient:
        _require_curve()
        public, secret = _load(secret_file, need_secret=True)
        server_public, _ = _load(server_key_file, need_secret=False)
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


@dataclass(frozen=True)
class CurveServer:
    """The server's keypair and the directory of allowed runners' public keys."""

    public: bytes
    secret: bytes
    allow_dir: Path

    @classmethod
    def from_files(cls, secret_file: str | Path, allow_dir: str | Path) -> CurveServer:
        _require_curve()
        public, secret = _load(secret_file, need_secret=True)
        allow_dir = Path(allow_dir)
        if not allow_dir.is_dir():
            raise CurveError(f"--allow-keys {allow_dir} is not a directory")
        if not list(allow_dir.glob("*.key")):
            raise CurveError(
                f"--allow-keys {allow_dir} holds no public key files (*.key): nobody could connect"
            )
        return cls(public, secret, allow_dir)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def start_authenticator(self, ctx: zmq.Context):
        """A ZAP handler thread admitting only the public keys in allow_dir (stop() it after)."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow_dir))
        return auth


def is_local_address(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname, an interface name or "*": not provably loopback
        return False
