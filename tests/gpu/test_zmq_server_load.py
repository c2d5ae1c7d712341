"""Load: 16 runners, each on its own connection, generate at once against one server process;
every one finishes with the tokens of its solo run, no errors, no leftover sessions, and the
server's resident memory stays within a bound."""

from __future__ import annotations

import threading

import pytest
from helpers import local_model, make_checkpoint, rss

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.tee.client import GPUClient
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.transport.zmq import ZmqTransport

RUNNERS = 16
PARAMS = SamplingParams(max_new_tokens=16)
MAX_RSS_GROWTH = 64 << 20


def prompt(i: int) -> list[int]:
    return [(7 * i + j * j) % 128 for j in range(3 + i % 5)]


def plan(i: int) -> str:
    return "v3-fused" if i % 2 == 0 else "v2-fused"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load"), "llama")


@pytest.mark.slow
def test_sixteen_concurrent_runners_match_solo_runs(ckpt):
    solo = {}
    for p in ("v3-fused", "v2-fused"):
        gen = Generator(local_model(ckpt, p), eos_token_ids=set())
        solo.update({i: gen.generate(prompt(i), PARAMS).tokens for i in range(RUNNERS) if plan(i) == p})
    address = free_tcp_address()
    proc = start_server(ckpt, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    clients = [GPUClient(ZmqTransport(address, timeout_s=30), retries=2) for _ in range(RUNNERS)]
    try:
        # Warm up (one generation), then take the memory baseline.
        Generator(TEELlamaModel(clients[0], get_plan("v3-fused")), eos_token_ids=set()).generate(
            [1, 2], PARAMS
        )
        rss0 = rss(proc.pid)
        start = threading.Barrier(RUNNERS)

        def run(i: int) -> None:
            try:
                model = TEELlamaModel(clients[i], get_plan(plan(i)))
                start.wait(30)
                results[i] = Generator(model, eos_token_ids=set()).generate(prompt(i), PARAMS).tokens
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(RUNNERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert results == solo
        assert sum(c.retried for c in clients) == 0
        res, _ = clients[0].call("Ping")
        assert res["sessions"] == 0, "every runner closed its session"
        growth = rss(proc.pid) - rss0
        print(f"load: {RUNNERS} runners, server RSS growth {growth / (1 << 20):.1f} MiB")
        assert growth < MAX_RSS_GROWTH
    finally:
        for c in clients:
            c.close()
        stop_server(proc)
    assert proc.returncode == 0
