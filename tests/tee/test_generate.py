"""Sampling, stop conditions and streaming in the trusted generation loop."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import local_model

from teesplit.tee.generate import Generator, SamplingParams, sample
from teesplit.tee.tokenizer import Tokenizer


def _draws(logits, params, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([sample(logits, params, rng) for _ in range(n)])


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))


def test_greedy_is_argmax():
    assert sample(np.array([0.1, 3.0, -1.0, 2.9], np.float32), SamplingParams(), None) == 1


def test_temperature_sampling_follows_the_distribution():
    counts = np.bincount(_draws(LOGITS, SamplingParams(temperature=1.0)), minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_low_temperature_sharpens():
    counts = np.bincount(_draws(LOGITS, SamplingParams(temperature=0.2)), minlength=4) / 4000
    assert counts[0] > 0.95


def test_top_k_keeps_only_the_k_best():
    d = _draws(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert set(d) == {0, 1}
    assert abs((d == 0).mean() - 2 / 3) < 0.03


def test_top_p_keeps_the_nucleus():
    # Cumulative mass 0.5, 0.75, 0.9, 1.0: top_p=0.7 keeps tokens 0 and 1.
    d = _draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(d) == {0, 1}
    # top_p=0.5 reaches the mass with token 0 alone.
    assert set(_draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.5), n=200)) == {0}


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0)
    assert (_draws(logits, p, 50, seed=7) == _draws(logits, p, 50, seed=7)).all()
    assert (_draws(logits, p, 50, seed=7) != _draws(logits, p, 50, seed=8)).any()


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=-1),
        dict(temperature=-0.5),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(stop=("",)),
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


@pytest.fixture(scope="module")
def generator(smollm2_dir):
    tok = Tokenizer.from_dir(smollm2_dir)
    return Generator(local_model(smollm2_dir, "v2"), tok), tok


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.slow
def test_stops_at_eos_and_streams_the_same_text(generator):
    gen, tok = generator
    pieces = []
    r = gen.generate(
        _chat(tok, "What is the capital of France?"), SamplingParams(max_new_tokens=64), on_text=pieces.append
    )
    assert r.finish_reason == "stop" and len(r.tokens) < 64
    assert "Paris" in r.text and "".join(pieces) == r.text == tok.decode(r.tokens)
    assert not set(r.tokens) & tok.eos_token_ids


def test_max_new_tokens(generator):
    gen, tok = generator
    r = gen.generate(_chat(tok, "Tell me a long story."), SamplingParams(max_new_tokens=5))
    assert len(r.tokens) == 5 and r.finish_reason == "length"
    assert r.stats["decode"]["steps"] == 4
    assert gen.generate(_chat(tok, "Hi"), SamplingParams(max_new_tokens=0)).tokens == []


def test_stop_string_cuts_text_and_stream(generator):
    gen, tok = generator
    prompt = _chat(tok, "What is the capital of France?")
    full = gen.generate(prompt, SamplingParams(max_new_tokens=64)).text
    assert "Paris" in full
    pieces = []
    r = gen.generate(prompt, SamplingParams(max_new_tokens=64, stop=("Paris",)), on_text=pieces.append)
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index("Paris")]
    assert "".join(pieces) == r.text


def test_seeded_generation_is_reproducible(generator):
    gen, tok = generator
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=11)
    a = gen.generate(_chat(tok, "Write a poem."), p)
    b = gen.generate(_chat(tok, "Write a poem."), p)
    assert a.tokens == b.tokens and len(a.tokens) > 0


def test_empty_prompt_is_an_error(generator):
    gen, _ = generator
    with pytest.raises(ValueError, match="empty"):
        gen.generate([], SamplingParams())
