"""The Gramine-SGX manifest template for the runner's API is well-formed (no SGX hardware here)."""

from __future__ import annotations

import re
import tomllib

from helpers import TESTS

TEMPLATE = TESTS.parent / "deploy" / "gramine" / "teesplit-runner.manifest.template"


def _render(text: str) -> str:
    """What gramine-manifest's Jinja pass would produce, with placeholder values."""
    values = {
        "entrypoint": "/venv/bin/python3",
        "log_level": "error",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "venv": "/venv",
        "model_dir": "/srv/model",
        "keys_dir": "/srv/keys",
        "gramine.runtimedir()": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
    }
    out = re.sub(r"{{\s*([^}]+?)\s*}}", lambda m: values[m.group(1)], text)
    assert "{{" not in out and "{%" not in out
    return out


def test_gramine_manifest_template_is_well_formed():
    manifest = tomllib.loads(_render(TEMPLATE.read_text()))
    assert manifest["libos"]["entrypoint"] == "/venv/bin/python3"
    argv = manifest["loader"]["argv"]
    assert argv[1:4] == ["-m", "teesplit", "api"]
    for flag in ("--curve-secret", "--server-key", "--tls-self-signed", "--api-key-file", "--attestation"):
        assert flag in argv
    assert "--tls-key" not in argv and "--insecure" not in argv, "no key file, no plain HTTP"
    # The runner must be able to parse its own command line.
    from teesplit.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.tls_self_signed and args.attestation == "sgx" and args.host == "0.0.0.0"
    assert args.port == 8443 and args.api_key_file == ["/keys/api_keys"]
    sgx = manifest["sgx"]
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap"
    assert re.fullmatch(r"\d+G", sgx["enclave_size"])
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/keys"]["type"] == "encrypted" and mounts["/models"]["uri"] == "file:/srv/model"
    assert mounts[args.tls_memory_dir]["type"] == "tmpfs", "the key's instant in a file is enclave memory"
    assert "file:/srv/model/" in sgx["trusted_files"]  # the checkpoint is measured
    assert manifest["sys"]["enable_sigterm_injection"] is True
