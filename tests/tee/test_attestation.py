"""The evidence side of attestation (tee/attestation.py): the binding rule as a pure function,
nonces, and quotes through configfs-tsm and Gramine's /dev/attestation, driven against
directories laid out like the kernel's (tests/teefake.py plays the kernel)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from helpers import TESTS
from teefake import FakeTEEDevice

from teesplit.tee.attestation import (
    BINDING_LABEL,
    AttestationService,
    BindingMismatch,
    ConfigfsTsm,
    EvidenceError,
    GramineAttestation,
    check_binding,
    choose_provider,
    parse_nonce,
    report_data_for,
)
from teesplit.tee.tls import self_signed

FIXTURE_REPORT_DATA_PREFIX = bytes.fromhex("9a9d48e7f6799642")  # tests/fixtures/tdx/README.md


@pytest.fixture(scope="module")
def cert():
    return self_signed()


def test_report_data_is_sha512_of_label_key_and_nonce(cert):
    nonce = bytes(range(32))
    want = hashlib.sha512(b"teesplit-tls-attestation-v1" + cert.spki_der + nonce).digest()
    assert BINDING_LABEL == b"teesplit-tls-attestation-v1"
    assert report_data_for(cert.spki_der, nonce) == want and len(want) == 64


def test_binding_accepts_the_matching_report_data(cert):
    nonce = bytes.fromhex("00112233445566778899aabbccddeeff")
    check_binding(report_data_for(cert.spki_der, nonce), cert.spki_der, nonce)


def test_binding_refuses_another_certificate_or_nonce(cert):
    other = self_signed()
    nonce = bytes(16)
    rd = report_data_for(cert.spki_der, nonce)
    with pytest.raises(BindingMismatch, match="another key"):
        check_binding(rd, other.spki_der, nonce)  # a relay that serves its own certificate
    with pytest.raises(BindingMismatch):
        check_binding(rd, cert.spki_der, bytes(15) + b"\x01")  # a replayed quote: other nonce
    with pytest.raises(BindingMismatch):
        check_binding(rd[:32], cert.spki_der, nonce)
    flipped = bytes([rd[0] ^ 1]) + rd[1:]
    with pytest.raises(BindingMismatch):
        check_binding(flipped, cert.spki_der, nonce)


def test_binding_refuses_the_real_quotes_report_data(cert):
    """The fixture quote binds nothing of ours: its report data must be refused."""
    from teesplit.tee.attest_client import verify_quote

    fx = TESTS / "fixtures" / "tdx"
    quote = (fx / "tdx_quote").read_bytes()
    verdict = verify_quote(quote, (fx / "tdx_quote_collateral.json").read_text(), 1750377600)
    assert verdict.report_data.startswith(FIXTURE_REPORT_DATA_PREFIX)
    with pytest.raises(BindingMismatch):
        check_binding(verdict.report_data, cert.spki_der, bytes(32))


@pytest.mark.parametrize(
    "text, error",
    [
        (None, "give a fresh random nonce"),
        ("", "give a fresh random nonce"),
        ("zz" * 16, "hexadecimal"),
        ("00" * 15, "got 15"),
        ("00" * 65, "got 65"),
        ("0" * 33, "hexadecimal"),
    ],
)
def test_bad_nonces_are_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_nonce(text)


def test_nonce_bounds_are_accepted():
    assert parse_nonce("ab" * 16) == b"\xab" * 16
    assert parse_nonce("AB" * 64) == b"\xab" * 64


# ---- configfs-tsm ---------------------------------------------------------------------------
def _tagged(report_data: bytes) -> bytes:
    return b"QUOTE:" + report_data


def test_configfs_tsm_writes_inblob_and_reads_outblob(tmp_path):
    entry = tmp_path / "tsm" / "report" / "teesplit-api"
    dev = FakeTEEDevice(entry, _tagged)
    try:
        tsm = ConfigfsTsm(entry)
        assert tsm.available() is None and tsm.tee == "tdx"
        for i in range(3):
            rd = bytes([i]) * 64
            assert tsm.quote(rd) == b"QUOTE:" + rd
        assert dev.inputs == [bytes([i]) * 64 for i in range(3)]
        assert (entry / "generation").read_text().strip() == "3"
    finally:
        dev.close()


def test_configfs_tsm_creates_its_entry_under_the_report_directory(tmp_path):
    """The default setting names an entry that does not exist yet: it is mkdir'ed (in configfs
    that makes the attribute files appear; here the fake then lays them out)."""
    base = tmp_path / "report"
    base.mkdir()
    tsm = ConfigfsTsm(base / "mine")
    assert tsm.available() is None  # the report directory exists
    with pytest.raises(EvidenceError, match="not a configfs-tsm report entry"):
        tsm.quote(bytes(64))  # a plain directory: no provider file appears
    assert (base / "mine").is_dir()


def test_configfs_tsm_detects_another_writer_and_retries(tmp_path):
    entry = tmp_path / "entry"
    dev = FakeTEEDevice(entry, _tagged)
    try:
        tsm = ConfigfsTsm(entry)
        dev.extra_writers = 2  # two interleaved writes: the third try gets a clean generation
        assert tsm.quote(b"\x07" * 64) == b"QUOTE:" + b"\x07" * 64
        assert len(dev.inputs) == 3
        dev.extra_writers = 3  # every try raced: refuse rather than return someone else's quote
        with pytest.raises(EvidenceError, match="another process kept writing"):
            tsm.quote(b"\x08" * 64)
    finally:
        dev.close()


def test_configfs_tsm_absent(tmp_path):
    tsm = ConfigfsTsm(tmp_path / "no" / "such" / "entry")
    assert "does not exist" in tsm.available()
    provider, why = choose_provider("tdx", tmp_path / "no" / "entry", tmp_path / "no-gramine")
    assert provider is None and "configfs-tsm" in why


def test_gramine_attestation_device(tmp_path):
    dev = FakeTEEDevice(tmp_path / "attestation", _tagged, gramine=True)
    try:
        provider, why = choose_provider("auto", tmp_path / "no" / "entry", tmp_path / "attestation")
        assert why is None and isinstance(provider, GramineAttestation) and provider.tee == "sgx"
        assert provider.quote(b"\x05" * 64) == b"QUOTE:" + b"\x05" * 64
        assert dev.inputs == [b"\x05" * 64]
    finally:
        dev.close()


def test_evidence_json_binds_the_served_certificate(tmp_path, cert):
    entry = tmp_path / "entry"
    dev = FakeTEEDevice(entry, _tagged)
    try:
        service = AttestationService(ConfigfsTsm(entry), cert.pem, cert.spki_der)
        nonce = bytes(range(40))
        ev = service.evidence(nonce)
        rd = report_data_for(cert.spki_der, nonce)
        assert ev["tee"] == "tdx" and ev["interface"] == "configfs-tsm"
        assert base64.b64decode(ev["quote"]) == b"QUOTE:" + rd and dev.inputs == [rd]
        assert ev["certificate"].encode() == cert.pem and ev["nonce"] == nonce.hex()
        assert ev["report_data"] == rd.hex()
        assert ev["binding"]["label"] == BINDING_LABEL.decode() and ev["binding"]["hash"] == "sha512"
    finally:
        dev.close()


def test_evidence_without_an_interface_says_why(cert):
    service = AttestationService(None, cert.pem, cert.spki_der, "no TEE here")
    with pytest.raises(EvidenceError, match="no TEE here"):
        service.evidence(bytes(16))
