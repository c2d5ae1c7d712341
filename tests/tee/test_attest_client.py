"""The verifier (tee/attest_client.py) on real Intel TDX evidence (tests/fixtures/tdx, from
the dcap-qvl project; its README says when each quote verifies), the policy file, and
`teesplit attest` offline: its verdicts and its distinct exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import TESTS

from teesplit.launch import free_tcp_port
from teesplit.tee.attest_client import (
    AttestationFailed,
    Outcome,
    Policy,
    PolicyError,
    Verdict,
    check_policy,
    format_verdict,
    parse_time,
    verify_offline,
    verify_quote,
)

pytest.importorskip("dcap_qvl")

FX = TESTS / "fixtures" / "tdx"
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
RTMR0 = "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0"
VALID_AT = parse_time("2025-06-20T00:00:00Z")
EXPIRED_AT = parse_time("2026-03-10T00:00:00Z")
OUTDATED_AT = parse_time("2026-02-20T00:00:00Z")  # its collateral was issued 2026-02-18
BODY_END = 48 + 584  # quote v4: 48-byte header, 584-byte TD report, then the signature data


@pytest.fixture(scope="module")
def quote() -> bytes:
    return (FX / "tdx_quote").read_bytes()


@pytest.fixture(scope="module")
def collateral() -> str:
    return (FX / "tdx_quote_collateral.json").read_text()


def _policy(**kw) -> Policy:
    return Policy.from_dict({"mrtd": [MRTD], **kw})


def _refusal(fn, *args) -> AttestationFailed:
    with pytest.raises(AttestationFailed) as e:
        fn(*args)
    return e.value


def test_accepts_the_real_quote_under_its_mrtd(quote, collateral):
    v = verify_offline(quote, collateral, _policy(rtmr0=[RTMR0]), VALID_AT)
    assert v.tee == "tdx" and v.tcb_status == "UpToDate" and v.advisories == []
    assert v.measurements["mrtd"] == MRTD and v.measurements["rtmr0"] == RTMR0
    assert v.debug is False and v.report_data.hex().startswith("9a9d48e7f6799642")
    text = format_verdict(v, Outcome.VERIFIED)
    assert text.startswith("verdict: VERIFIED") and f"mrtd: {MRTD}" in text
    assert "binding: not checked (offline" in text


def test_refuses_one_flipped_bit_anywhere_in_the_signed_quote(quote, collateral):
    """Every byte of the header and the TD report, one bit each (the bit moves with the byte)."""
    for i in range(BODY_END):
        bad = bytearray(quote)
        bad[i] ^= 1 << (i % 8)
        e = _refusal(verify_quote, bytes(bad), collateral, VALID_AT)
        assert e.outcome == Outcome.INVALID_EVIDENCE, i


def test_a_flipped_body_bit_names_the_signature(quote, collateral):
    bad = bytearray(quote)
    bad[600] ^= 1
    e = _refusal(verify_quote, bytes(bad), collateral, VALID_AT)
    assert "signature is invalid" in str(e)


def test_refuses_the_quote_once_its_collateral_expired(quote, collateral):
    e = _refusal(verify_offline, quote, collateral, _policy(), EXPIRED_AT)
    assert e.outcome == Outcome.INVALID_EVIDENCE and "expired" in str(e)


def test_refuses_a_platform_with_no_matching_tcb_level():
    q = (FX / "tdx_quote_outdated").read_bytes()
    c = (FX / "tdx_quote_outdated_collateral.json").read_text()
    e = _refusal(verify_offline, q, c, _policy(), OUTDATED_AT)
    assert e.outcome == Outcome.INVALID_EVIDENCE and "TCB level" in str(e)


def test_refuses_a_policy_with_another_mrtd(quote, collateral):
    other = Policy.from_dict({"mrtd": ["00" * 48, "ab" * 48]})
    e = _refusal(verify_offline, quote, collateral, other, VALID_AT)
    assert e.outcome == Outcome.POLICY_MISMATCH and f"mrtd {MRTD} is not in the policy" in str(e)
    assert e.verdict.measurements["mrtd"] == MRTD, "the refusal still shows what was measured"


def test_refuses_another_rtmr(quote, collateral):
    e = _refusal(verify_offline, quote, collateral, _policy(rtmr2=["11" * 48]), VALID_AT)
    assert e.outcome == Outcome.POLICY_MISMATCH and "rtmr2" in str(e)


def test_tcb_status_must_be_accepted(quote, collateral):
    e = _refusal(verify_offline, quote, collateral, _policy(accepted_tcb_status=["OutOfDate"]), VALID_AT)
    assert e.outcome == Outcome.INVALID_EVIDENCE and "TCB status UpToDate is not accepted" in str(e)


def test_an_sgx_policy_refuses_a_tdx_quote(quote, collateral):
    sgx = Policy.from_dict({"mrenclave": ["00" * 32]})
    e = _refusal(verify_offline, quote, collateral, sgx, VALID_AT)
    assert e.outcome == Outcome.POLICY_MISMATCH and "the quote is tdx" in str(e)


def test_a_debug_td_is_refused_unless_allowed():
    v = Verdict(tee="tdx", tcb_status="UpToDate", measurements={"mrtd": MRTD}, debug=True)
    e = _refusal(check_policy, v, _policy())
    assert e.outcome == Outcome.POLICY_MISMATCH and "DEBUG" in str(e)
    check_policy(v, _policy(allow_debug=True))


def test_garbage_is_an_invalid_quote(collateral):
    e = _refusal(verify_quote, b"not a quote at all", collateral, VALID_AT)
    assert e.outcome == Outcome.INVALID_EVIDENCE


def test_malformed_collateral_is_invalid(quote):
    e = _refusal(verify_quote, quote, "{}", VALID_AT)
    assert e.outcome == Outcome.INVALID_EVIDENCE and "collateral" in str(e)


@pytest.mark.parametrize(
    "policy, error",
    [
        ([], "JSON object"),
        ({}, "names no measurement"),
        ({"mrtd": [MRTD], "mrtdd": []}, "unknown key 'mrtdd'"),
        ({"mrtd": MRTD}, "non-empty list"),
        ({"mrtd": []}, "non-empty list"),
        ({"mrtd": [MRTD[:-2]]}, "not 48 bytes"),
        ({"mrtd": ["zz" * 48]}, "not 48 bytes"),
        ({"rtmr0": [RTMR0]}, "needs 'mrtd'"),
        ({"mrtd": [MRTD], "mrenclave": ["00" * 32]}, "mixes TDX"),
        ({"mrsigner": ["00" * 48]}, "not 32 bytes"),
        ({"mrtd": [MRTD], "accepted_tcb_status": ["Fine"]}, "accepted_tcb_status"),
        ({"mrtd": [MRTD], "accepted_tcb_status": ["Revoked"]}, "accepted_tcb_status"),
        ({"mrtd": [MRTD], "allow_debug": "no"}, "allow_debug"),
    ],
)
def test_bad_policies_are_refused(policy, error):
    with pytest.raises(PolicyError, match=error):
        Policy.from_dict(policy)


def test_policy_values_are_case_insensitive_hex(quote, collateral):
    verify_offline(quote, collateral, Policy.from_dict({"mrtd": [MRTD.upper()]}), VALID_AT)


def test_parse_time():
    assert parse_time("2025-06-20T00:00:00Z") == 1750377600
    assert parse_time("2025-06-20T02:00:00+02:00") == 1750377600
    with pytest.raises(ValueError, match="time zone"):
        parse_time("2025-06-20T00:00:00")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


# ---- `teesplit attest`, offline, as a real process ------------------------------------------
def _attest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", "attest", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_cli_offline_verdicts_and_exit_codes(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mrtd": [MRTD], "accepted_tcb_status": ["UpToDate"]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"mrtd": ["00" * 48]}))
    broken = tmp_path / "broken.quote"
    raw = bytearray((FX / "tdx_quote").read_bytes())
    raw[300] ^= 0x10
    broken.write_bytes(bytes(raw))
    quote, coll = str(FX / "tdx_quote"), str(FX / "tdx_quote_collateral.json")
    at = ["--at", "2025-06-20T00:00:00Z"]

    r = _attest("--quote", quote, "--collateral", coll, "--policy", str(good), *at)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("verdict: VERIFIED") and f"mrtd: {MRTD}" in r.stdout

    r = _attest("--quote", quote, "--collateral", coll, "--policy", str(other), *at)
    assert r.returncode == Outcome.POLICY_MISMATCH == 10
    assert r.stdout.startswith("verdict: REFUSED: policy mismatch") and f"mrtd: {MRTD}" in r.stdout

    r = _attest("--quote", str(broken), "--collateral", coll, "--policy", str(good), *at)
    assert r.returncode == Outcome.INVALID_EVIDENCE == 11
    assert r.stdout.startswith("verdict: REFUSED: invalid quote or collateral")

    r = _attest("--quote", quote, "--collateral", coll, "--policy", str(good), "--at", "2026-03-10T00:00:00Z")
    assert r.returncode == Outcome.INVALID_EVIDENCE and "expired" in r.stdout

    # Nothing listens on this port: could not fetch.
    r = _attest(f"https://127.0.0.1:{free_tcp_port()}", "--policy", str(good), "--collateral", coll)
    assert r.returncode == Outcome.FETCH_FAILED == 13
    assert r.stdout.startswith("verdict: FAILED: could not fetch")

    # Usage errors are 2, apart from every verdict.
    r = _attest("--quote", quote, "--policy", str(good))
    assert r.returncode == 2 and "--collateral" in r.stderr
    r = _attest("http://127.0.0.1:1", "--policy", str(good))
    assert r.returncode == 2 and "https://" in r.stderr
    assert len({2, *(int(o) for o in Outcome)}) == 1 + len(Outcome)  # all distinct, 0 included
