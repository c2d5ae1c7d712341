"""`teesplit.Runner`, the Python entry point: the same tokens as `teesplit generate`, whole or
streamed, in process or against a server process, with the protections of the one assembly."""

from __future__ import annotations

import pytest
from apihelpers import make_chat_checkpoint
from helpers import local_model

import teesplit
from teesplit.errors import UsageError
from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer
from teesplit.tee.verify import VerifiedPort

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, smollm2_dir):
    return make_chat_checkpoint(tmp_path_factory.mktemp("runner") / "tiny", smollm2_dir)


def _reference(ckpt, plan: str, n: int) -> list[int]:
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(local_model(ckpt, plan), tok)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    return gen.generate(ids, SamplingParams(max_new_tokens=n)).tokens


@pytest.mark.parametrize("plan", ["v3-fused", "v2-merged"])
def test_generate_and_stream_give_the_tokens_of_generate(ckpt, plan):
    want = _reference(ckpt, plan, 8)
    with teesplit.Runner(server="local", model=str(ckpt), plan=plan, device="cpu", dtype="float32") as r:
        assert isinstance(r.model.gpu, VerifiedPort), "the trusted-parameter check applies here too"
        result = r.generate(QUESTION, chat=True, max_new_tokens=8)
        assert result.tokens == want
        assert result.stats["plan"] == plan and result.stats["decode"]["steps"] == len(want) - 1
        pieces = list(r.stream(QUESTION, chat=True, max_new_tokens=8))
        assert "".join(pieces) == result.text and len(pieces) > 1


@pytest.mark.slow
def test_a_runner_against_a_server_process_verifies(ckpt):
    address = free_tcp_address()
    proc = start_server(ckpt, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    try:
        with teesplit.Runner(server=address, model=str(ckpt), plan="v2-fused", verify=True) as r:
            result = r.generate(QUESTION, chat=True, max_new_tokens=6)
            assert result.tokens == _reference(ckpt, "v2-fused", 6)
            assert result.stats["verify"]["checks"] > 0
    finally:
        stop_server(proc)


def test_bad_settings_are_usage_errors(ckpt):
    with pytest.raises(UsageError, match="unknown plan"):
        teesplit.Runner(server="local", model=str(ckpt), plan="v9")
    with pytest.raises(UsageError, match="two non-colluding"):
        teesplit.Runner(server="local", model=str(ckpt), plan="private-2party")
