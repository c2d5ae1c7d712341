"""The official `openai` Python client against `teesplit api` serving the real SmolLM2 weights
through a real `teesplit serve` process: chat and completions, streaming and not, errors."""

from __future__ import annotations

import threading

import pytest
from apihelpers import APIProcess
from helpers import local_model

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def client(smollm2_dir, tmp_path_factory):
    address = free_tcp_address()
    gpu = start_server(smollm2_dir, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    api = APIProcess(smollm2_dir, address, tmp_path_factory.mktemp("log") / "api.log")
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{api.port}/v1", api_key="unused", max_retries=0)
    finally:
        api.stop()
        stop_server(gpu)


@pytest.fixture(scope="module")
def expected(smollm2_dir):
    tok = Tokenizer.from_dir(smollm2_dir)
    gen = Generator(local_model(smollm2_dir, "v2-merged"), tok)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    return gen.generate(ids, SamplingParams(max_new_tokens=16))


@pytest.mark.slow
def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.slow
def test_chat_completion(client, expected):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
    )
    assert r.choices[0].message.content == expected.text
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_tokens)
    assert r.usage.completion_tokens == len(expected.tokens)


def test_chat_completion_streaming(client, expected):
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == expected.text
    assert len([p for p in pieces if p]) >= len(expected.tokens) // 2, "streamed piece by piece"
    assert finish == expected.finish_reason and usage.completion_tokens == len(expected.tokens)


def test_concurrent_openai_clients_match_solo(client, expected):
    texts = [None] * 3

    def ask(i):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
        )
        texts[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == [expected.text] * 3


@pytest.mark.slow
def test_completions(client, smollm2_dir):
    tok = Tokenizer.from_dir(smollm2_dir)
    want = Generator(local_model(smollm2_dir, "v2-merged"), tok).generate(
        tok.encode("The capital of France is"), SamplingParams(max_new_tokens=5)
    )
    r = client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.choices[0].text == want.text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == want.text


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(client):
    def ask():
        return (
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Say something."}],
                max_tokens=8,
                temperature=0.8,
                top_p=0.9,
                seed=1234,
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_errors_raise_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=3
        )
