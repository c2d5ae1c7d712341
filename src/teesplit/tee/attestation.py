"""Remote-attestation evidence for the API (TRUSTED side): a TEE quote bound to the TLS key.

`GET /v1/attestation?nonce=HEX` answers with a quote whose 64 bytes of report data are

    SHA-512( BINDING_LABEL || DER SubjectPublicKeyInfo of the TLS certificate served || nonce )

so a client that checks the quote (tee/attest_client.py) learns that the key holding its TLS
connection lives inside the measured TEE, and, through its fresh nonce, that the quote was
made for it now. The label is fixed and the SPKI is self-delimiting DER, so the three parts
cannot be shifted into one another.

Where quotes come from:
- Intel TDX (and other confidential VMs) through Linux's configfs-tsm interface: an entry
  directory under /sys/kernel/config/tsm/report/ whose `inblob` takes the report data and
  whose `outblob` then reads as the quote; `provider` names the TEE (`tdx_guest`) and
  `generation` counts writes, so a write by another process between ours and the read is
  detected and the quote made again.
- Gramine-SGX: /dev/attestation/user_report_data, then /dev/attestation/quote.
Both paths are settings, so tests drive them with a directory laid out the same way.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Protocol

BINDING_LABEL = b"teesplit-tls-attestation-v1"
BINDING_RULE = (
    "report_data = SHA-512(label || DER SubjectPublicKeyInfo of the TLS certificate served || nonce)"
)
NONCE_MIN_BYTES, NONCE_MAX_BYTES = 16, 64
REPORT_DATA_BYTES = 64
DEFAULT_TSM_REPORT = Path("/sys/kernel/config/tsm/report/teesplit-api")
DEFAULT_GRAMINE_DIR = Path("/dev/attestation")
TEE_OF_PROVIDER = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}
QUOTE_TRIES = 3
MAX_QUOTE_BYTES = 1 << 20


class EvidenceError(Exception):
    """No quote could be made (the interface is absent or failed); the message says why."""


class BindingMismatch(Exception):
    """The report data does not bind this certificate and this nonce."""


# ---- the binding ----------------------------------------------------------------------------
def report_data_for(spki_der: bytes, nonce: bytes) -> bytes:
    """The 64 bytes of report data that bind a TLS public key and a nonce."""
    return hashlib.sha512(BINDING_LABEL + spki_der + nonce).digest()


def check_binding(report_data: bytes, spki_der: bytes, nonce: bytes) -> None:
    """Raise BindingMismatch unless `report_data` binds `spki_der` and `nonce`."""
    if len(report_data) != REPORT_DATA_BYTES:
        raise BindingMismatch(f"the report data has {len(report_data)} bytes, not {REPORT_DATA_BYTES}")
    # Both sides are public; the comparison needs no constant time, only exactness.
    if report_data != report_data_for(spki_der, nonce):
        raise BindingMismatch(
            "the quote's report data does not bind the certificate this connection presented and this "
            "nonce: the quote was made for another key (a relay or an interception) or another request"
        )


def parse_nonce(text: str | None) -> bytes:
    """The `nonce` query parameter: hex, 16 to 64 bytes. ValueError with a message otherwise."""
    if not text:
        raise ValueError(
            f"give a fresh random nonce: ?nonce=HEX ({NONCE_MIN_BYTES} to {NONCE_MAX_BYTES} bytes)"
        )
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise ValueError("'nonce' must be hexadecimal") from None
    if not NONCE_MIN_BYTES <= len(nonce) <= NONCE_MAX_BYTES:
        raise ValueError(f"'nonce' must be {NONCE_MIN_BYTES} to {NONCE_MAX_BYTES} bytes, got {len(nonce)}")
    return nonce


# ---- quote providers ------------------------------------------------------------------------
class QuoteProvider(Protocol):
    tee: str  # "tdx", "sgx", ...
    name: str  # the interface, for messages

    def quote(self, report_data: bytes) -> bytes: ...


def _read(path: Path, limit: int = MAX_QUOTE_BYTES) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise EvidenceError(f"{path} holds more than {limit} bytes: not a quote")
    return data


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(data)


class ConfigfsTsm:
    """Quotes through configfs-tsm (Linux 6.7+): Intel TDX, or whatever `provider` names.

    `entry` is the report directory this process uses; it is created if missing (in configfs,
    mkdir makes the attribute files appear) and kept. Requests are serialized by a lock; a
    write by another process that shares the entry shows as an unexpected `generation` and
    the quote is made again."""

    name = "configfs-tsm"

    def __init__(self, entry: str | Path = DEFAULT_TSM_REPORT):
        self.entry = Path(entry)
        self.lock = threading.Lock()
        self._provider: str | None = None

    def available(self) -> str | None:
        """None when usable; else why not."""
        if self.entry.is_dir() or self.entry.parent.is_dir():
            return None
        return (
            f"{self.entry.parent} does not exist (configfs-tsm needs Linux 6.7+ in a TDX guest, "
            "with configfs mounted)"
        )

    @property
    def tee(self) -> str:
        provider = self.provider()
        return TEE_OF_PROVIDER.get(provider, provider)

    def provider(self) -> str:
        if self._provider is None:
            self._ensure_entry()
            try:
                self._provider = _read(self.entry / "provider", 256).decode(errors="replace").strip()
            except OSError as e:
                raise EvidenceError(
                    f"{self.entry} is not a configfs-tsm report entry ({e.strerror}: provider)"
                ) from None
        return self._provider

    def _ensure_entry(self) -> None:
        try:
            self.entry.mkdir(exist_ok=True)
        except OSError as e:
            raise EvidenceError(f"cannot create the configfs-tsm entry {self.entry}: {e.strerror}") from None

    def _generation(self) -> int:
        raw = _read(self.entry / "generation", 64).decode(errors="replace").strip()
        try:
            return int(raw)
        except ValueError:
            raise EvidenceError(f"{self.entry}/generation reads {raw!r}, not a number") from None

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes")
        with self.lock:
            self.provider()
            for _ in range(QUOTE_TRIES):
                try:
                    before = self._generation()
                    _write(self.entry / "inblob", report_data)
                    blob = _read(self.entry / "outblob")
                    after = self._generation()
                except OSError as e:
                    raise EvidenceError(f"configfs-tsm at {self.entry} failed: {e.strerror or e}") from None
                if after == before + 1 and blob:
                    return blob
            raise EvidenceError(
                f"another process kept writing {self.entry} while this one made its quote "
                f"({QUOTE_TRIES} tries); give this API its own entry (--tsm-report)"
            )


class GramineAttestation:
    """Quotes through Gramine-SGX's /dev/attestation (needs sgx.remote_attestation = "dcap")."""

    name = "gramine /dev/attestation"
    tee = "sgx"

    def __init__(self, directory: str | Path = DEFAULT_GRAMINE_DIR):
        self.dir = Path(directory)
        self.lock = threading.Lock()

    def available(self) -> str | None:
        if (self.dir / "quote").exists() and (self.dir / "user_report_data").exists():
            return None
        return f'{self.dir}/quote does not exist (run under Gramine-SGX with sgx.remote_attestation = "dcap")'

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes")
        with self.lock:
            try:
                _write(self.dir / "user_report_data", report_data)
                return _read(self.dir / "quote")
            except OSError as e:
                raise EvidenceError(f"{self.dir} failed: {e.strerror or e}") from None


def choose_provider(
    kind: str, tsm_report: str | Path = DEFAULT_TSM_REPORT, gramine_dir: str | Path = DEFAULT_GRAMINE_DIR
) -> tuple[QuoteProvider | None, str | None]:
    """(provider, None) when `kind` ('auto', 'tdx' or 'sgx') is usable here; (None, why) else."""
    candidates: list[Any] = []
    if kind in ("auto", "tdx"):
        candidates.append(ConfigfsTsm(tsm_report))
    if kind in ("auto", "sgx"):
        candidates.append(GramineAttestation(gramine_dir))
    reasons = []
    for c in candidates:
        why = c.available()
        if why is None:
            return c, None
        reasons.append(why)
    return None, "; ".join(reasons) or f"unknown attestation kind {kind!r}"


# ---- the endpoint's answer ------------------------------------------------------------------
class AttestationService:
    """What GET /v1/attestation answers, for the certificate this API serves.

    `provider` None: the interface is absent (`unavailable` says why) and every request is
    answered 501 with that message."""

    def __init__(
        self,
        provider: QuoteProvider | None,
        cert_pem: bytes | None,
        spki_der: bytes | None,
        unavailable: str | None = None,
    ):
        self.provider = provider
        self.cert_pem = cert_pem
        self.spki_der = spki_der
        self.unavailable = unavailable

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        """The evidence JSON; EvidenceError when no quote can be made."""
        if self.provider is None or self.spki_der is None:
            raise EvidenceError(self.unavailable or "attestation is not available")
        report_data = report_data_for(self.spki_der, nonce)
        quote = self.provider.quote(report_data)
        return {
            "tee": self.provider.tee,
            "interface": self.provider.name,
            "quote": base64.b64encode(quote).decode(),
            "certificate": self.cert_pem.decode(),
            "nonce": nonce.hex(),
            "report_data": report_data.hex(),
            "binding": {"rule": BINDING_RULE, "label": BINDING_LABEL.decode(), "hash": "sha512"},
        }


def random_nonce(n: int = 32) -> bytes:
    return os.urandom(n)
