"""The `teesplit` command's own texts: help shows every default once, the version, addresses,
messages that name the right flag and the right form of a command."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from teesplit.cli import build_parser
from teesplit.protocol import RemoteError

COMMANDS = ["serve", "generate", "api", "chat", "ping", "demo", "manifest", "attest", "convert"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=timeout
    )


def _parser(command: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


def _help(command: str) -> str:
    return " ".join(_parser(command).format_help().split())  # one line: wrapping aside


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_once(command):
    parser = _parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            text = formatter._expand_help(action)
            assert text.lower().count("(default") <= 1, text
            assert "(default: None)" not in text and "(default: False)" not in text, text


def test_help_shows_the_defaults_of_the_limits():
    text = _help("serve")
    assert "--max-sessions-per-client MAX_SESSIONS_PER_CLIENT sessions one client" in text
    parser = _parser("serve")
    formatter = parser._get_formatter()
    helps = {a.option_strings[0]: formatter._expand_help(a) for a in parser._actions if a.help}
    for flag, default in [("--max-sessions", "64"), ("--max-kv-gib", "4.0"), ("--max-inflight", "4")]:
        assert helps[flag].endswith(f"(default: {default})"), helps[flag]
    text = _help("generate")
    assert "(default: 5.0)" in text and "--connect-timeout" in text
    assert "`teesplit manifest --model DIR`" in text and "teesplit manifest DIR" not in text


def test_version():
    r = run("--version")
    assert r.returncode == 0 and re.fullmatch(r"teesplit \d+\.\d+\.\d+\S*\n", r.stdout)


def test_ping_names_every_address_form():
    r = run("ping", "udp://nowhere:1")
    assert r.returncode == 2
    assert "tcp://" in r.stderr and "ipc://" in r.stderr and "shm://" in r.stderr


def test_a_remote_error_names_its_operation_once():
    e = RemoteError("too_large", "OpenSession: the server already holds 64 sessions", "OpenSession")
    assert str(e).count("OpenSession") == 1
    assert (
        str(RemoteError("bad_args", "layer out of range", "Linear"))
        == "Linear: layer out of range [bad_args]"
    )


def test_prefill_chunk_takes_auto_a_size_or_zero():
    parse = build_parser().parse_args
    assert parse(["generate", "--prompt", "x"]).prefill_chunk == "auto"
    assert parse(["api", "--prefill-chunk", "128"]).prefill_chunk == 128
    assert parse(["chat", "--prefill-chunk", "0"]).prefill_chunk == 0
    for bad in ("-1", "big"):
        with pytest.raises(SystemExit):
            parse(["generate", "--prompt", "x", "--prefill-chunk", bad])
