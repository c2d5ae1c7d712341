"""Check an enclave's attestation before trusting it with a prompt (the client's side).

`attest(url, policy)` does what `teesplit attest https://HOST:PORT --policy FILE` does:

1. connects over TLS (no certificate check: the evidence authenticates the server) and asks
   `GET /v1/attestation?nonce=...` with a fresh random nonce, keeping the certificate that
   this very connection presented;
2. verifies the quote's signature chain, the collateral and the TCB status with `dcap-qvl`
   (Phala's maintained DCAP verifier; nothing here parses quotes or X.509 chains by hand),
   against collateral from a file or a PCCS;
3. checks the measurements against the policy (and refuses a debug TD or enclave unless the
   policy allows one);
4. checks that the quote's report data binds that certificate's public key and the nonce
   (tee/attestation.py has the rule).

The result pins the certificate: `Attested.ssl_context()` accepts that certificate and no
other, and `openai_client()` / `httpx_client()` build clients on it:

    from teesplit.tee.attest_client import Policy, attest
    att = attest("https://enclave:8443", Policy.load("policy.json"), api_key=KEY)
    client = att.openai_client(api_key=KEY)      # talks only to the attested certificate
    client.chat.completions.create(model=..., messages=[...])

A policy is JSON: `mrtd` and optionally `rtmr0`..`rtmr3` (TDX), or `mrenclave` and/or
`mrsigner` (SGX), each a list of accepted hex values, and `accepted_tcb_status` (default
["UpToDate"]); `allow_debug` (default false). Failures raise AttestationFailed, whose
`outcome` is the exit code of `teesplit attest`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import enum
import http.client
import json
import ssl
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teesplit.errors import UsageError
from teesplit.tee.attestation import BindingMismatch, check_binding, random_nonce
from teesplit.tee.tls import client_context, fingerprint, pinned_client_context, spki_of, spki_pin

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
TDX_FIELDS = {"mrtd": "mr_td", "rtmr0": "rt_mr0", "rtmr1": "rt_mr1", "rtmr2": "rt_mr2", "rtmr3": "rt_mr3"}
SGX_FIELDS = {"mrenclave": "mr_enclave", "mrsigner": "mr_signer"}
FIELD_BYTES = {**dict.fromkeys(TDX_FIELDS, 48), **dict.fromkeys(SGX_FIELDS, 32)}
# The TCB statuses Intel's collateral can give (Revoked is never acceptable).
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
MAX_EVIDENCE_BYTES = 4 << 20


class Outcome(enum.IntEnum):
    """The verdicts, as `teesplit attest` exit codes."""

    VERIFIED = 0
    POLICY_MISMATCH = 10  # a measurement (or the TEE type, or debug) the policy does not accept
    INVALID_EVIDENCE = 11  # signature, collateral (expired, malformed), TCB status not accepted
    BINDING_MISMATCH = 12  # the quote does not bind this connection's certificate and nonce
    FETCH_FAILED = 13  # no evidence (unreachable, HTTP error, not evidence) or no collateral


OUTCOME_WORDS = {
    Outcome.VERIFIED: "VERIFIED",
    Outcome.POLICY_MISMATCH: "REFUSED: policy mismatch",
    Outcome.INVALID_EVIDENCE: "REFUSED: invalid quote or collateral",
    Outcome.BINDING_MISMATCH: "REFUSED: binding mismatch",
    Outcome.FETCH_FAILED: "FAILED: could not fetch the evidence",
}


class PolicyError(UsageError):
    """A policy file that cannot be used (the message names the key)."""


# ---- the policy -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    tee: str  # "tdx" or "sgx"
    accepted: dict[str, frozenset[str]]  # policy key -> accepted lowercase hex values
    accepted_tcb_status: tuple[str, ...] = ("UpToDate",)
    allow_debug: bool = False

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            obj = json.loads(Path(path).read_text())
        except OSError as e:
            raise PolicyError(f"cannot read the policy {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise PolicyError(f"the policy {path} is not JSON: {e}") from None
        return cls.from_dict(obj, str(path))

    @classmethod
    def from_dict(cls, obj: Any, where: str = "the policy") -> Policy:
        if not isinstance(obj, dict):
            raise PolicyError(f"{where} must be a JSON object")
        known = set(FIELD_BYTES) | {"accepted_tcb_status", "allow_debug", "comment"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        tdx = [k for k in TDX_FIELDS if k in obj]
        sgx = [k for k in SGX_FIELDS if k in obj]
        if tdx and sgx:
            raise PolicyError(f"{where} mixes TDX ({', '.join(tdx)}) and SGX ({', '.join(sgx)}) measurements")
        if tdx and "mrtd" not in obj:
            raise PolicyError(f"{where}: a TDX policy needs 'mrtd'")
        if not tdx and not sgx:
            raise PolicyError(
                f"{where} names no measurement: give 'mrtd' (TDX) or 'mrenclave'/'mrsigner' (SGX)"
            )
        accepted = {k: _hex_list(obj[k], k, FIELD_BYTES[k], where) for k in tdx + sgx}
        statuses = obj.get("accepted_tcb_status", ["UpToDate"])
        if (
            not isinstance(statuses, list)
            or not statuses
            or not all(isinstance(s, str) and s in TCB_STATUSES for s in statuses)
        ):
            raise PolicyError(
                f"{where}: 'accepted_tcb_status' must be a non-empty list of {', '.join(TCB_STATUSES)}"
            )
        debug = obj.get("allow_debug", False)
        if not isinstance(debug, bool):
            raise PolicyError(f"{where}: 'allow_debug' must be true or false")
        return cls("tdx" if tdx else "sgx", accepted, tuple(statuses), debug)


def _hex_list(values: Any, key: str, nbytes: int, where: str) -> frozenset[str]:
    if not isinstance(values, list) or not values:
        raise PolicyError(f"{where}: {key!r} must be a non-empty list of hex values")
    out = set()
    for v in values:
        try:
            ok = isinstance(v, str) and len(bytes.fromhex(v)) == nbytes
        except ValueError:
            ok = False
        if not ok:
            raise PolicyError(f"{where}: {key!r} holds {v!r}, not {nbytes} bytes of hex")
        out.add(v.lower())
    return frozenset(out)


# ---- the verdict ----------------------------------------------------------------------------
@dataclass
class Verdict:
    """What was established so far (failures carry the partial verdict, for printing)."""

    tee: str | None = None
    tcb_status: str | None = None
    advisories: list[str] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)
    debug: bool | None = None
    report_data: bytes | None = None
    certificate_der: bytes | None = None  # live only: the certificate this connection presented
    binding: str = "not checked (offline: a saved quote has no connection to bind)"


class AttestationFailed(Exception):
    def __init__(self, outcome: Outcome, message: str, verdict: Verdict | None = None):
        super().__init__(message)
        self.outcome = outcome
        self.verdict = verdict or Verdict()


def _dcap():
    try:
        import dcap_qvl
    except ImportError:
        raise AttestationFailed(
            Outcome.INVALID_EVIDENCE,
            "quote verification needs the dcap-qvl package: pip install 'teesplit[attest]'",
        ) from None
    return dcap_qvl


def _parse_quote(quote: bytes, verdict: Verdict):
    try:
        return _dcap().parse_quote(quote)
    except ValueError as e:
        raise AttestationFailed(
            Outcome.INVALID_EVIDENCE, f"not a quote dcap-qvl can read: {e}", verdict
        ) from None


def verify_quote(
    quote: bytes, collateral_json: str, at: int | None = None, verdict: Verdict | None = None
) -> Verdict:
    """Signature chain, collateral and TCB level (dcap-qvl), then the measurements as read by
    dcap-qvl from the verified bytes. `at`: the verification time (default now)."""
    dcap = _dcap()
    verdict = verdict or Verdict()
    parsed = _parse_quote(quote, verdict)
    try:
        collateral = dcap.QuoteCollateralV3.from_json(collateral_json)
    except ValueError as e:
        raise AttestationFailed(
            Outcome.INVALID_EVIDENCE, f"the collateral is not dcap-qvl QuoteCollateralV3 JSON: {e}", verdict
        ) from None
    now = int(time.time()) if at is None else at
    try:
        report = dcap.verify(quote, collateral, now)
    except ValueError as e:
        raise AttestationFailed(
            Outcome.INVALID_EVIDENCE, f"dcap-qvl refused the quote: {e}", verdict
        ) from None
    verdict.tcb_status = report.status
    verdict.advisories = list(report.advisory_ids)
    body = parsed.report
    if parsed.is_tdx():
        verdict.tee = "tdx"
        verdict.measurements = {k: getattr(body, attr).hex() for k, attr in TDX_FIELDS.items()}
        verdict.measurements["td_attributes"] = body.td_attributes.hex()
        verdict.debug = bool(body.td_attributes[0] & 0x01)  # TDATTRIBUTES.DEBUG (bit 0)
    else:
        verdict.tee = "sgx"
        verdict.measurements = {k: getattr(body, attr).hex() for k, attr in SGX_FIELDS.items()}
        verdict.measurements["attributes"] = body.attributes.hex()
        verdict.debug = bool(body.attributes[0] & 0x02)  # SGX ATTRIBUTES.DEBUG (bit 1)
    verdict.report_data = bytes(body.report_data)
    return verdict


def check_policy(verdict: Verdict, policy: Policy) -> None:
    """TCB status (INVALID_EVIDENCE when not accepted), then TEE type, debug and measurements."""
    if verdict.tcb_status not in policy.accepted_tcb_status:
        raise AttestationFailed(
            Outcome.INVALID_EVIDENCE,
            f"TCB status {verdict.tcb_status} is not accepted by the policy "
            f"({', '.join(policy.accepted_tcb_status)}); "
            f"advisories: {', '.join(verdict.advisories) or 'none'}",
            verdict,
        )
    if verdict.tee != policy.tee:
        raise AttestationFailed(
            Outcome.POLICY_MISMATCH, f"the quote is {verdict.tee}, the policy is for {policy.tee}", verdict
        )
    if verdict.debug and not policy.allow_debug:
        raise AttestationFailed(
            Outcome.POLICY_MISMATCH,
            "the quote comes from a DEBUG TD or enclave (its memory is readable by the host); "
            "the policy does not set allow_debug",
            verdict,
        )
    for key, accepted in policy.accepted.items():
        got = verdict.measurements[key]
        if got not in accepted:
            raise AttestationFailed(Outcome.POLICY_MISMATCH, f"{key} {got} is not in the policy", verdict)


def verify_offline(quote: bytes, collateral_json: str, policy: Policy, at: int | None = None) -> Verdict:
    """A saved quote: everything but the binding (there is no connection to bind)."""
    verdict = verify_quote(quote, collateral_json, at)
    check_policy(verdict, policy)
    return verdict


def parse_time(text: str) -> int:
    """`2025-06-20T00:00:00Z` (any ISO 8601 time with a zone) as Unix seconds."""
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r}: give an ISO 8601 time such as 2025-06-20T00:00:00Z") from None
    if t.tzinfo is None:
        raise UsageError(f"--at {text!r}: give the time zone, e.g. 2025-06-20T00:00:00Z")
    return int(t.timestamp())


# ---- fetching -------------------------------------------------------------------------------
def api_root(url: str) -> tuple[str, str, int, str]:
    """(root URL, host, port, path prefix) of `https://HOST[:PORT][/PREFIX][/v1]`."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https":
        raise UsageError(f"{url}: attestation binds a TLS certificate; give an https:// URL")
    if not u.hostname:
        raise UsageError(f"{url}: no host")
    prefix = u.path.rstrip("/")
    prefix = prefix[: -len("/v1")] if prefix.endswith("/v1") else prefix
    port = u.port or 443
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"https://{host}:{port}{prefix}", u.hostname, port, prefix


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def fetch_evidence(
    url: str,
    nonce: bytes,
    api_key: str | None = None,
    ca_file: str | Path | None = None,
    timeout: float = 30.0,
) -> tuple[dict[str, Any], bytes]:
    """(evidence JSON, DER certificate this connection presented). FETCH_FAILED otherwise.
    With `ca_file` the certificate must also chain to it (and name the host)."""
    _, host, port, prefix = api_root(url)
    ctx = client_context(ca_file) if ca_file else client_context(verify=False)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.connect()
        peer = conn.sock.getpeercert(binary_form=True)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        conn.request("GET", f"{prefix}/v1/attestation?nonce={nonce.hex()}", headers=headers)
        r = conn.getresponse()
        raw = r.read(MAX_EVIDENCE_BYTES + 1)
    except (OSError, http.client.HTTPException) as e:
        raise AttestationFailed(Outcome.FETCH_FAILED, f"cannot get evidence from {url}: {e}") from None
    finally:
        conn.close()
    if r.status != 200:
        raise AttestationFailed(
            Outcome.FETCH_FAILED, f"{url} answered {r.status} to GET /v1/attestation: {_error_message(raw)}"
        )
    try:
        evidence = json.loads(raw)
        if not isinstance(evidence, dict):
            raise ValueError("not a JSON object")
        for name in ("quote", "certificate", "nonce"):
            if not isinstance(evidence.get(name), str):
                raise ValueError(f"no {name!r}")
    except ValueError as e:
        raise AttestationFailed(
            Outcome.FETCH_FAILED, f"{url} answered something that is not evidence: {e}"
        ) from None
    return evidence, peer


def fetch_collateral(quote: bytes, pccs_url: str = INTEL_PCS_URL, timeout: float = 60.0) -> str:
    """The quote's collateral from a PCCS (or Intel's PCS), as QuoteCollateralV3 JSON.

    dcap-qvl fetches it on a Rust async runtime whose threads still touch the interpreter after
    the call returns: a process that exits soon after crashes (SIGSEGV, dcap-qvl 0.7.0). So the
    fetch runs in a short-lived child process that leaves with os._exit, and this process only
    reads its answer."""
    _parse_quote(quote, Verdict())  # a quote that cannot be read is invalid, not unfetchable
    code = "from teesplit.tee.attest_client import _collateral_child; _collateral_child()"
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, pccs_url, str(timeout)],
            input=quote,
            capture_output=True,
            timeout=timeout + 30,
        )
        answer = json.loads(child.stdout)
    except subprocess.TimeoutExpired:
        raise AttestationFailed(
            Outcome.FETCH_FAILED, f"no collateral from {pccs_url} in {timeout:g} s"
        ) from None
    except ValueError:
        raise AttestationFailed(
            Outcome.FETCH_FAILED,
            f"the collateral fetch failed: {child.stderr.decode(errors='replace')[-300:]}",
        ) from None
    if "error" in answer:
        raise AttestationFailed(
            Outcome.FETCH_FAILED, f"cannot get collateral from {pccs_url}: {answer['error']}"
        )
    return answer["collateral"]


def _collateral_child() -> None:
    """The child of fetch_collateral: quote on stdin, {"collateral"} or {"error"} on stdout."""
    import os

    pccs_url, timeout = sys.argv[1], float(sys.argv[2])
    quote = sys.stdin.buffer.read()

    async def get():
        return await asyncio.wait_for(_dcap().get_collateral(pccs_url, quote), timeout)

    try:
        answer = {"collateral": asyncio.run(get()).to_json()}
    except (ValueError, RuntimeError, OSError, TimeoutError, AttestationFailed) as e:
        answer = {"error": str(e) or type(e).__name__}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter shutdown, which the runtime's threads would crash


# ---- the whole check ------------------------------------------------------------------------
@dataclass
class Attested:
    """A verified endpoint; its clients accept the attested certificate and no other."""

    url: str  # the API root (https://HOST:PORT[/prefix])
    verdict: Verdict
    certificate_der: bytes  # the certificate the attested connection presented

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_der)

    def certificate_pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.certificate_der)

    def ssl_context(self) -> ssl.SSLContext:
        return pinned_client_context(self.certificate_der)

    def httpx_client(self, api_key: str | None = None, **kwargs):
        """An httpx.Client (httpx2 where that is what is installed) on the pinned certificate."""
        try:
            import httpx
        except ImportError:
            import httpx2 as httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), headers=headers, **kwargs)

    def openai_client(self, api_key: str | None = None, **kwargs):
        """An openai.OpenAI client on the pinned certificate."""
        import openai

        http_client = openai.DefaultHttpxClient(verify=self.ssl_context())
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=api_key or "no-key", http_client=http_client, **kwargs
        )


def attest(
    url: str,
    policy: Policy,
    *,
    collateral_json: str | None = None,
    pccs_url: str = INTEL_PCS_URL,
    api_key: str | None = None,
    ca_file: str | Path | None = None,
    at: int | None = None,
    timeout: float = 30.0,
) -> Attested:
    """Fetch, verify, check the policy and the binding; AttestationFailed on any failure."""
    root = api_root(url)[0]
    nonce = random_nonce(32)
    evidence, peer = fetch_evidence(url, nonce, api_key, ca_file, timeout)
    try:
        quote = base64.b64decode(evidence["quote"], validate=True)
    except ValueError:
        raise AttestationFailed(Outcome.FETCH_FAILED, f"{url}: the evidence's quote is not base64") from None
    if collateral_json is None:
        collateral_json = fetch_collateral(quote, pccs_url, timeout)
    verdict = verify_quote(quote, collateral_json, at, Verdict(certificate_der=peer))
    check_policy(verdict, policy)
    check_connection_binding(verdict, evidence, peer, nonce)
    return Attested(root, verdict, peer)


def check_connection_binding(
    verdict: Verdict, evidence: dict[str, Any], peer_der: bytes, nonce: bytes
) -> None:
    """The evidence names this connection's certificate, echoes the nonce, and the verified
    quote's report data binds both."""
    try:
        named = ssl.PEM_cert_to_DER_cert(evidence["certificate"].strip())
    except ValueError:
        named = b""
    try:
        if named != peer_der:
            raise BindingMismatch(
                "the evidence names another certificate than the one this connection presented"
            )
        if evidence["nonce"].lower() != nonce.hex():
            raise BindingMismatch("the evidence answers another nonce than the one sent")
        check_binding(verdict.report_data or b"", spki_of(peer_der), nonce)
    except BindingMismatch as e:
        raise AttestationFailed(Outcome.BINDING_MISMATCH, str(e), verdict) from None
    verdict.binding = "checked: the quote binds the certificate this connection presented and a fresh nonce"


def format_verdict(verdict: Verdict, outcome: Outcome, reason: str | None = None) -> str:
    """The human-readable verdict `teesplit attest` prints."""
    lines = [f"verdict: {OUTCOME_WORDS[outcome]}" + (f": {reason}" if reason else "")]
    if verdict.tee is not None:
        lines.append(
            f"tee: {verdict.tee}; TCB status {verdict.tcb_status}; "
            f"advisories: {', '.join(verdict.advisories) or 'none'}; "
            f"debug: {'yes' if verdict.debug else 'no'}"
        )
        lines += [f"{k}: {v}" for k, v in verdict.measurements.items()]
        lines.append(f"report_data: {verdict.report_data.hex() if verdict.report_data else '-'}")
        lines.append(f"binding: {verdict.binding}")
    if verdict.certificate_der is not None:
        pin = " (pin this)" if outcome == Outcome.VERIFIED else " (NOT attested: do not pin)"
        lines.append(f"certificate sha256: {fingerprint(verdict.certificate_der)}{pin}")
        lines.append(f"public key pin (curl --pinnedpubkey): {spki_pin(spki_of(verdict.certificate_der))}")
    return "\n".join(lines)


def run_attest(
    policy_file: str | Path,
    *,
    url: str | None = None,
    quote_file: str | Path | None = None,
    collateral_file: str | Path | None = None,
    pccs_url: str = INTEL_PCS_URL,
    api_key: str | None = None,
    ca_file: str | Path | None = None,
    at: str | None = None,
    timeout: float = 30.0,
    save_cert: str | Path | None = None,
) -> tuple[Outcome, str]:
    """`teesplit attest`: (outcome, the verdict to print). ValueError for unusable arguments."""
    policy = Policy.load(policy_file)
    when = parse_time(at) if at else None
    if (url is None) == (quote_file is None):
        raise UsageError("give the API's https:// URL, or --quote FILE --collateral FILE for a saved quote")
    collateral = Path(collateral_file).read_text() if collateral_file else None
    try:
        if quote_file is not None:
            if collateral is None:
                raise UsageError("--quote needs --collateral FILE (offline: nothing is fetched)")
            verdict = verify_offline(Path(quote_file).read_bytes(), collateral, policy, when)
        else:
            att = attest(
                url,
                policy,
                collateral_json=collateral,
                pccs_url=pccs_url,
                api_key=api_key,
                ca_file=ca_file,
                at=when,
                timeout=timeout,
            )
            verdict = att.verdict
            if save_cert:
                Path(save_cert).write_text(att.certificate_pem())
    except AttestationFailed as e:
        return e.outcome, format_verdict(e.verdict, e.outcome, str(e))
    return Outcome.VERIFIED, format_verdict(verdict, Outcome.VERIFIED)
