"""The API's front door assembled from settings (TRUSTED side): TLS, API keys, attestation.

`cli.py` fills `FrontDoorSettings` from the command line and the environment; `build()`
checks the combination, makes or loads the certificate, and chooses the attestation
interface. The rules:
- a non-loopback --host without TLS is refused unless `insecure` (anyone on the path would
  read every prompt and answer);
- attestation binds the TLS certificate, so asking for it explicitly without TLS is refused;
  in `auto` mode, or where the interface is absent, the endpoint answers 501 and one warning
  is logged at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from teesplit.errors import UsageError
from teesplit.tee import tls as tlsmod
from teesplit.tee.apikeys import APIKeys
from teesplit.tee.attestation import (
    DEFAULT_GRAMINE_DIR,
    DEFAULT_TSM_REPORT,
    AttestationService,
    choose_provider,
)

ATTESTATION_KINDS = ("auto", "tdx", "sgx", "none")


@dataclass
class FrontDoorSettings:
    host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_self_signed: bool = False
    tls_names: list[str] = field(default_factory=list)  # extra names in a self-signed certificate
    tls_memory_dir: str | None = None  # where memfds do not exist: an in-TEE tmpfs for the key
    insecure: bool = False
    api_keys: list[str] = field(default_factory=list)
    api_key_files: list[str] = field(default_factory=list)
    env_api_key: str | None = None  # TEESPLIT_API_KEY, read by the CLI
    metrics_open: bool = False
    attestation: str = "auto"
    tsm_report: str = str(DEFAULT_TSM_REPORT)
    gramine_attestation: str = str(DEFAULT_GRAMINE_DIR)


@dataclass
class FrontDoor:
    tls: tlsmod.ServedCertificate | None
    api_keys: APIKeys
    metrics_open: bool
    attestation: AttestationService | None  # None: the endpoint is off

    def server_kwargs(self) -> dict:
        """Keyword arguments of APIServer."""
        return {
            "tls": self.tls,
            "api_keys": self.api_keys,
            "metrics_open": self.metrics_open,
            "attestation": self.attestation,
        }


def _tls(s: FrontDoorSettings) -> tlsmod.ServedCertificate | None:
    if (s.tls_cert is None) != (s.tls_key is None):
        raise UsageError("--tls-cert FILE and --tls-key FILE go together")
    if s.tls_self_signed and s.tls_cert is not None:
        raise UsageError("give --tls-self-signed or --tls-cert/--tls-key, not both")
    if s.tls_names and not s.tls_self_signed:
        raise UsageError("--tls-name adds names to the --tls-self-signed certificate")
    if s.tls_self_signed:
        return tlsmod.self_signed([s.host, *s.tls_names], s.tls_memory_dir)
    if s.tls_cert is not None:
        return tlsmod.certificate_from_files(s.tls_cert, s.tls_key)
    if not tlsmod.is_loopback_host(s.host) and not s.insecure:
        raise UsageError(
            f"refusing to listen on {s.host} without TLS: anyone on the path could read every prompt and "
            "answer; pass --tls-self-signed or --tls-cert FILE --tls-key FILE, or --insecure to accept that"
        )
    return None


def _attestation(
    s: FrontDoorSettings, served: tlsmod.ServedCertificate | None, warn: Callable[[str], None]
) -> AttestationService | None:
    if s.attestation not in ATTESTATION_KINDS:
        raise UsageError(f"--attestation must be one of {', '.join(ATTESTATION_KINDS)}")
    if s.attestation == "none":
        return None
    if served is None:
        if s.attestation != "auto":
            raise UsageError(
                f"--attestation {s.attestation} binds the TLS certificate: add --tls-self-signed or "
                "--tls-cert/--tls-key"
            )
        why = "the evidence binds the TLS certificate, and this API serves plain HTTP (no --tls-*)"
        warn(f"GET /v1/attestation answers 501: {why}")
        return AttestationService(None, None, None, why)
    provider, why = choose_provider(s.attestation, s.tsm_report, s.gramine_attestation)
    if provider is None:
        warn(f"GET /v1/attestation answers 501: no TEE attestation interface here: {why}")
    return AttestationService(provider, served.pem, served.spki_der, why)


def build(s: FrontDoorSettings, warn: Callable[[str], None]) -> FrontDoor:
    """The front door for these settings; ValueError (with what to change) if they do not fit."""
    served = _tls(s)
    keys = APIKeys.from_sources(s.api_keys, s.api_key_files, s.env_api_key)
    if not keys and not tlsmod.is_loopback_host(s.host):
        warn(f"no API key configured: anyone who reaches {s.host} can use the API (--api-key-file FILE)")
    return FrontDoor(served, keys, s.metrics_open, _attestation(s, served, warn))
