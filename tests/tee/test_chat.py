"""`teesplit chat` driven through a pseudo-terminal (pexpect): history through the chat
template, streamed answers equal to solo greedy runs, /stats, /reset, /quit."""

from __future__ import annotations

import sys

import pytest
from apihelpers import make_chat_checkpoint
from helpers import local_model

from teesplit.launch import start_server, stop_server
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    ckpt = make_chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", smollm2_dir)
    address = f"ipc://{tmp_path_factory.mktemp('ipc')}/gpu.sock"
    proc = start_server(ckpt, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    yield ckpt, address
    stop_server(proc)


def _answer(child) -> str:
    """The streamed answer: everything between 'assistant> ' and the next prompt."""
    child.expect_exact("assistant> ")
    child.expect_exact("\r\nyou> ")
    return child.before.replace("\r\n", "\n")


@pytest.mark.slow
def test_chat_through_a_terminal(setup):
    ckpt, address = setup
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(local_model(ckpt, "v3-fused"), tok)

    def solo(messages):
        return gen.generate(tok.apply_chat_template(messages), SamplingParams(max_new_tokens=8))

    r1 = solo([{"role": "user", "content": "Hello there"}])
    first = r1.text
    r2 = solo(
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ]
    )
    second = r2.text
    assert first != second
    args = ["-m", "teesplit", "chat", "--server", address, "--model", str(ckpt), "--max-new-tokens", "8"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, dimensions=(50, 400))
    try:
        child.expect_exact("you> ")
        child.sendline("Hello there")
        assert _answer(child) == first
        child.sendline("And then?")  # the second turn sees the first through the history
        assert _answer(child) == second
        child.sendline("/stats")
        child.expect_exact("RPCs by op:")
        child.expect(r"session: 2 turn\(s\), 2 in the history, (\d+) tokens generated")
        assert int(child.match.group(1)) == len(r1.tokens) + len(r2.tokens)
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("you> ")
        child.sendline("And then?")  # no history now: the answer of a fresh conversation
        assert _answer(child) == solo([{"role": "user", "content": "And then?"}]).text
        child.sendline("/nope")
        child.expect_exact("unknown command /nope")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_from_stdin_ends_at_eof(setup):
    import subprocess

    ckpt, address = setup
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "teesplit",
            "chat",
            "--server",
            address,
            "--model",
            str(ckpt),
            "--max-new-tokens",
            "4",
        ],
        input="Hi\n/stats\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 1 and "session: 1 turn(s)" in r.stdout
    # piped input is echoed after its prompt: the question and the answer have their own lines
    assert "you> Hi\nassistant> " in r.stdout and "you> /stats\n" in r.stdout


def test_history_drops_the_oldest_turns_when_it_outgrows_the_context(smollm2_dir):
    from types import SimpleNamespace

    from teesplit.tee.chat import ChatSession

    tok = Tokenizer.from_dir(smollm2_dir)
    system = "You are brief."
    old = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok " * 40}]
    recent = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    def ids(history):
        return tok.apply_chat_template([{"role": "system", "content": system}, *history])

    fits_recent = len(ids([*recent, {"role": "user", "content": "Next"}]))
    context = fits_recent + 8  # room for the recent exchange and 8 new tokens, not the old one
    s = ChatSession(SimpleNamespace(tokenizer=tok), SamplingParams(max_new_tokens=8), context, system)
    s.messages = old + recent
    got = s.prompt_ids("Next")
    assert got == ids([*recent, {"role": "user", "content": "Next"}])
    assert s.messages == recent, "the oldest exchange was dropped, the system prompt kept"
    with pytest.raises(ValueError, match="too long"):
        s.prompt_ids("word " * 400)
