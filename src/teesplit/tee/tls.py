"""TLS that ends inside the enclave (TRUSTED side), and the client contexts that trust it.

The API's certificate either comes from files (`--tls-cert`, `--tls-key`, e.g. issued by your
CA) or is made at start (`--tls-self-signed`): an ECDSA P-256 key pair created in this
process's memory. That private key never touches a file system: OpenSSL (through Python's
`ssl`, which loads keys only from paths) reads it from a memfd, an anonymous in-memory file
reached as /proc/self/fd/N, closed as soon as it is loaded (where there are no memfds, as
under Gramine, a file on an in-memory file system inside the TEE that you name).

Each connection is handshaken in its own handler thread, so a client that stalls its
handshake holds one thread, not the accept loop. A plain-HTTP request to the TLS port gets a
plain-HTTP 400 that says to use https://, and the server keeps serving.

The remote-attestation evidence (tee/attestation.py) binds the DER SubjectPublicKeyInfo of
the certificate served here; clients that checked it pin that exact certificate
(`pinned_client_context`). Certificates are parsed with `cryptography`, never by hand.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from teesplit.errors import UsageError

HANDSHAKE_TIMEOUT_S = 30.0
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello


class TLSConfigError(UsageError):
    """The certificate or key cannot be used (message says which file and why)."""


@dataclass(frozen=True)
class ServedCertificate:
    """The certificate the API presents, and the server context that presents it."""

    context: ssl.SSLContext
    pem: bytes  # the leaf certificate (PEM), the one the attestation binds
    der: bytes
    spki_der: bytes  # DER SubjectPublicKeyInfo of the leaf: what the binding hashes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)

    @property
    def spki_pin(self) -> str:
        return spki_pin(self.spki_der)


# ---- certificates ---------------------------------------------------------------------------
def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the DER certificate as `AB:CD:...` (the form `openssl x509 -fingerprint -sha256` prints)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(cert_der).digest())


def spki_pin(spki_der: bytes) -> str:
    """The public-key pin curl takes: `curl --pinnedpubkey sha256//...`."""
    return "sha256//" + base64.b64encode(hashlib.sha256(spki_der).digest()).decode()


def spki_of(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _leaf_of_pem_chain(pem: bytes, where: str) -> bytes:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TLSConfigError(f"{where} holds no PEM certificate: {e}") from None
    return certs[0].public_bytes(_der_encoding())


def _der_encoding():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # http.server speaks HTTP/1.1 only
    return ctx


def _served(ctx: ssl.SSLContext, leaf_der: bytes) -> ServedCertificate:
    pem = ssl.DER_cert_to_PEM_cert(leaf_der).encode()
    return ServedCertificate(context=ctx, pem=pem, der=leaf_der, spki_der=spki_of(leaf_der))


def certificate_from_files(cert_file: str | Path, key_file: str | Path) -> ServedCertificate:
    """A PEM certificate chain (leaf first) and its PEM private key, read from files."""
    cert_file, key_file = Path(cert_file), Path(key_file)
    try:
        chain = cert_file.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read --tls-cert {cert_file}: {e.strerror}") from None
    leaf = _leaf_of_pem_chain(chain, f"--tls-cert {cert_file}")
    ctx = _server_context()
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as e:
        raise TLSConfigError(f"cannot read {e.filename}: no such file") from None
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"cannot use --tls-cert {cert_file} with --tls-key {key_file}: {e.reason or e} "
            "(the key must be the certificate's, PEM, unencrypted)"
        ) from None
    return _served(ctx, leaf)


def self_signed(names: Sequence[str] = (), memory_dir: str | Path | None = None) -> ServedCertificate:
    """A fresh ECDSA P-256 key and a self-signed certificate for `names` (DNS names or IP
    addresses; localhost, 127.0.0.1 and ::1 are always included). The key exists only in this
    process: it is serialized once into an in-memory file for OpenSSL and dropped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teesplit api")])
    now = datetime.datetime.now(datetime.UTC)
    # The key lives exactly as long as the process, so the certificate does not expire on its
    # own (RFC 5280's "no well-defined expiration"): a long-running API is never cut off.
    forever = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate a client clock behind
        .not_valid_after(forever)
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ctx = _server_context()
    load_chain_from_memory(ctx, cert_pem, key_pem, memory_dir)
    del key, key_pem
    return _served(ctx, cert.public_bytes(serialization.Encoding.DER))


def _san(names: Sequence[str]) -> list:
    from cryptography import x509

    out: list = []
    seen: set[str] = set()
    for n in ("localhost", "127.0.0.1", "::1", *names):
        if not n or n in seen or n in ("0.0.0.0", "::"):
            continue
        seen.add(n)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


# ---- keys through memory, never a file ------------------------------------------------------
@contextlib.contextmanager
def memory_file(data: bytes, memory_dir: str | Path | None = None) -> Iterator[str]:
    """A path OpenSSL can open that reads `data` from memory: a memfd (Linux 3.17+), closed, and
    its memory freed, when the block ends (OpenSSL seeks in what it reads, so a pipe would not
    do). Where memfds do not exist (Gramine has none), a file in `memory_dir`, which must be an
    in-memory file system inside the TEE (Gramine: a tmpfs mount), is used, overwritten and
    removed at once; without `memory_dir` this refuses rather than write a file."""
    try:
        fd = os.memfd_create("teesplit-tls", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as e:
        if memory_dir is None:
            raise TLSConfigError(
                f"cannot make a memfd to hand the TLS key to OpenSSL ({e}); give --tls-memory-dir DIR on "
                "an in-memory file system inside the TEE, or use --tls-cert/--tls-key"
            ) from None
        yield from _spill_file(data, Path(memory_dir))
        return
    try:
        os.write(fd, data)  # a few hundred bytes: one write
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _spill_file(data: bytes, directory: Path) -> Iterator[str]:
    fd, path = tempfile.mkstemp(dir=directory, prefix=".teesplit-tls-")  # mode 0600
    try:
        os.write(fd, data)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.pwrite(fd, bytes(len(data)), 0)
        os.close(fd)
        os.unlink(path)


def load_chain_from_memory(
    ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, memory_dir: str | Path | None = None
) -> None:
    with memory_file(cert_pem, memory_dir) as cert_path, memory_file(key_pem, memory_dir) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


# ---- the server -----------------------------------------------------------------------------
_PLAIN_HTTP_REPLY = (
    b'{"error": {"message": "this port speaks HTTPS: use https://", '
    b'"type": "invalid_request_error", "param": null, "code": "https_required"}}'
)


class TLSHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections are TLS, handshaken in their own thread."""

    def __init__(self, address, handler, context: ssl.SSLContext, log=None):
        self.ssl_context = context
        self.tls_log = log
        super().__init__(address, handler)

    def finish_request(self, request, client_address) -> None:  # runs in the connection's thread
        tls = self._handshake(request, client_address)
        if tls is None:
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            _close_tls(tls)

    def _handshake(self, sock: socket.socket, peer) -> ssl.SSLSocket | None:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return None
            if first[0] != TLS_RECORD_HANDSHAKE:
                _answer_plain_http(sock)
                self._log(peer, "plain HTTP on the TLS port: answered 400")
                return None
            tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            return tls
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a failed handshake
            self._log(peer, f"TLS handshake failed: {e}")
            return None

    def _log(self, peer, message: str) -> None:
        if self.tls_log is not None:
            self.tls_log(f"{peer[0]} {message}")


def _answer_plain_http(sock: socket.socket) -> None:
    """Read the request head (so closing does not reset the connection before the client
    reads the answer), answer 400 in OpenAI's error shape, close."""
    sock.settimeout(2.0)
    seen = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in seen and len(seen) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            seen += chunk
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(_PLAIN_HTTP_REPLY)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError):
        sock.sendall(head + _PLAIN_HTTP_REPLY)
        sock.shutdown(socket.SHUT_WR)
        # Read what the client still sends (a body) until it closes, within the timeout and a
        # bound: closing with unread data would reset the connection under the answer.
        for _ in range(256):
            if not sock.recv(4096):
                break


def _close_tls(tls: ssl.SSLSocket) -> None:
    """Send close_notify without waiting for the peer's (a stream's end is the connection's
    end, and OpenSSL 3 clients call an end without close_notify a truncation), then close."""
    try:
        tls.setblocking(False)
        tls.unwrap()
    except (OSError, ValueError):  # SSLWantReadError: ours is sent, theirs not yet come
        pass
    finally:
        tls.close()


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP addresses; any other name counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---- clients --------------------------------------------------------------------------------
def client_context(ca_file: str | Path | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context: verify against `ca_file` (or the system's CAs), or not at all
    (`verify=False`: used only to fetch attestation evidence, which authenticates itself)."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def pinned_client_context(cert_der: bytes) -> ssl.SSLContext:
    """A client context that accepts exactly this certificate and nothing else.

    The certificate is the only trust anchor, accepted as such even when a CA issued it
    (partial-chain verification); the host name is not checked, since the pin is stronger
    than a name: whoever presents this certificate holds the attested key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=cert_der)
    return ctx
