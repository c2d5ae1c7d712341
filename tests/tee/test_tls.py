"""TLS for the API (tee/tls.py): the self-signed certificate made in memory, keys loaded through
memory files, certificate files, the per-connection TLS server (plain HTTP answered, broken
handshakes survived) and the pinned client context."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from teesplit.tee import tls

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from tlshelpers import make_ca_and_leaf  # noqa: E402


def test_self_signed_certificate():
    served = tls.self_signed(["enclave.example", "10.1.2.3", "0.0.0.0"])
    cert = x509.load_der_x509_certificate(served.der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "enclave.example"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert served.spki_der == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert served.fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert served.spki_pin.startswith("sha256//") and len(served.spki_pin) == 8 + 44
    assert tls.self_signed().der != served.der, "a fresh key pair every start"


def test_keys_load_from_memory_and_the_descriptor_is_closed():
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tls.memory_file(key_pem) as path:
        assert path.startswith("/proc/self/fd/")
        fd = int(path.rsplit("/", 1)[1])
        assert os.readlink(path).startswith("/memfd:teesplit-tls")  # anonymous memory, no file
        assert Path(path).read_bytes() == key_pem
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the memory is gone with it
    served = tls.self_signed()  # the whole path, as the API runs it
    cert_pem = x509.load_der_x509_certificate(served.der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ssl.SSLError):  # the load really checks the pair: another key is refused
        tls.load_chain_from_memory(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_pem, key_pem)


def test_without_memfds_the_key_goes_only_to_a_named_memory_dir(tmp_path, monkeypatch):
    """Gramine has no memfd_create: refuse, unless told an in-TEE tmpfs, which is left empty."""

    def no_memfd(*_):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    with pytest.raises(tls.TLSConfigError, match="--tls-memory-dir"):
        tls.self_signed()
    with tls.memory_file(b"secret bytes", tmp_path) as path:
        assert Path(path).parent == tmp_path and Path(path).read_bytes() == b"secret bytes"
        assert os.stat(path).st_mode & 0o077 == 0, "readable by this user only"
    assert list(tmp_path.iterdir()) == []
    served = tls.self_signed(memory_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] and served.spki_der


def test_certificate_files(tmp_path):
    _, chain, key = make_ca_and_leaf(tmp_path)
    served = tls.certificate_from_files(chain, key)
    assert served.der == x509.load_pem_x509_certificates(chain.read_bytes())[0].public_bytes(
        serialization.Encoding.DER
    ), "the leaf, first in the chain, is what the attestation binds"
    other_key = tmp_path / "other.pem"
    other_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(tls.TLSConfigError, match="the key must be the certificate's"):
        tls.certificate_from_files(chain, other_key)
    with pytest.raises(tls.TLSConfigError, match="no PEM certificate"):
        tls.certificate_from_files(key, key)
    with pytest.raises(tls.TLSConfigError, match="cannot read"):
        tls.certificate_from_files(tmp_path / "missing.pem", key)


def test_loopback_hosts():
    for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert tls.is_loopback_host(h), h
    for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not tls.is_loopback_host(h), h


# ---- the server and the clients --------------------------------------------------------------
class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        body = b"hello over tls"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    served = tls.self_signed()
    lines = []
    httpd = tls.TLSHTTPServer(("127.0.0.1", 0), _Hello, served.context, log=lines.append)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield httpd.server_address[1], served, lines
    httpd.shutdown()
    httpd.server_close()


def _get(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_pinned_context_accepts_that_certificate_only(server):
    port, served, _ = server
    assert _get(port, tls.pinned_client_context(served.der)) == (200, b"hello over tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, tls.pinned_client_context(tls.self_signed().der))
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, tls.client_context())  # the system's CAs know nothing of it


def test_pinned_context_accepts_a_ca_issued_leaf(tmp_path):
    """Pinning works for a certificate a CA issued (--tls-cert), not only self-signed ones."""
    ca, chain, key = make_ca_and_leaf(tmp_path, names=("enclave.example",))
    served = tls.certificate_from_files(chain, key)
    httpd = tls.TLSHTTPServer(("127.0.0.1", 0), _Hello, served.context)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        port = httpd.server_address[1]
        # the name differs (enclave.example), the pin holds: accepted
        assert _get(port, tls.pinned_client_context(served.der))[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):  # the CA checks the name
            _get(port, tls.client_context(ca))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_plain_http_and_broken_handshakes_leave_the_server_up(server):
    port, served, lines = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    assert r.status == 400 and b"use https://" in r.read()
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", body=b"x" * 200_000)  # a body it never reads as HTTP
    r = conn.getresponse()
    assert r.status == 400 and b"use https://" in r.read()
    conn.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a TLS record, then junk
        s.sendall(b"\x16\x03\x01\x00\x05junk!")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) is not None  # an alert or end-of-file, not a hang
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass  # connect and leave without a byte
    assert _get(port, tls.pinned_client_context(served.der))[0] == 200
    assert any("plain HTTP" in line for line in lines)
    assert any("handshake failed" in line for line in lines)
