"""teesplit.tee.tokenizer (trusted side) against transformers' AutoTokenizer on the converted SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import teesplit
from teesplit.tee.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "Unicode: café naïve Ωμέγα Ünïcödé ẞ",
    "emoji 👋🏽🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "CJK 你好，世界！日本語のテキスト 한국어",
    "special tokens in text <|im_start|>user\nhi<|im_end|>",
    "code: `def f(x):\n    return x**2  # 12345`",
]

SYSTEM = {"role": "system", "content": "You are terse."}
CHATS = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [SYSTEM, {"role": "user", "content": "Say hi 👋"}],
    "multi": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 猫."},
    ],
    "multi_system": [
        SYSTEM,
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "  spaced  \n"},
    ],
}


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def hf_chat_ids(hf_tok, messages, add_generation_prompt: bool) -> list[int]:
    return hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf_tok, text, add_special_tokens):
    assert tok.encode(text, add_special_tokens) == hf_tok.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf_tok, text, skip):
    ids = [1, *hf_tok.encode(text), 2]  # wrapped in <|im_start|> ... <|im_end|>
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CHATS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_chat_ids(hf_tok, messages, add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def test_chat_template_text(tok):
    text = tok.render_chat(CHATS["single"])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # The template writes <|im_start|> itself; nothing is prepended or appended to it.
    ids = tok.apply_chat_template(CHATS["single"])
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.bos_token_id) == 3


def test_special_ids(tok, hf_tok):
    assert tok.eos_token_ids == {hf_tok.eos_token_id} == {2}
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.vocab_size == len(hf_tok)


STREAM_TEXTS = [
    "emoji 👋🏽🚀 family 👨‍👩‍👧 flag 🇫🇷!",
    "你好，世界！日本語のテキスト 한국어 🐈‍⬛",
    "plain ascii with  double  spaces\nand newline",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_concatenates_to_decode(tok, text):
    ids = [*tok.encode(text), 2]
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1, "a byte-level BPE splits this emoji over several tokens"
    dec = StreamDecoder(tok)
    pieces = [dec.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀"


def test_stream_decoder_flush_emits_trailing_partial(tok):
    ids = tok.encode("ok 🚀")[:-1]  # stop mid-character
    dec = StreamDecoder(tok)
    streamed = "".join(dec.add(i) for i in ids)
    assert streamed + dec.flush() == tok.decode(ids)


def test_stream_decoder_window_stays_small(tok, monkeypatch):
    ids = tok.encode("word " * 200)
    lengths: list[int] = []
    decode = Tokenizer.decode

    def spy(self, token_ids, skip_special_tokens=True):
        lengths.append(len(token_ids))
        return decode(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", spy)
    dec = tok.stream_decoder()
    for i in ids:
        dec.add(i)
    assert max(lengths) <= 2


def _copy_tokenizer(src: Path, dst: Path, tokenizer_config: dict) -> Path:
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return dst


def test_no_chat_template_is_a_clear_error(smollm2_dir, tmp_path):
    d = _copy_tokenizer(smollm2_dir, tmp_path / "base", {"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(d)
    assert tok.encode("hi")  # plain completion still works
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHATS["single"])


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


FANCY_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif -%}\n"
    "  {%- if m['content'] == 'skip' %}{% continue %}{% endif -%}\n"
    "  {%- set ns.n = ns.n + 1 -%}\n"
    "  {{ bos_token }}{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{%- if tools is none %}[no tools]{% endif -%}\n"
    "{{ ns.n }}{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"
)


def test_template_features_match_transformers(smollm2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": FANCY_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    d = _copy_tokenizer(smollm2_dir, tmp_path / "fancy", cfg)
    ours, theirs = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    messages = [{"role": "user", "content": 'html <b>&</b> "quoted" 😀'}, {"role": "user", "content": "skip"}]
    for agp in (True, False):
        assert ours.render_chat(messages, agp) == theirs.apply_chat_template(
            messages, add_generation_prompt=agp, tokenize=False
        )
        assert ours.apply_chat_template(messages, agp) == hf_chat_ids(theirs, messages, agp)
    with pytest.raises(ChatTemplateError, match="no tools here"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_is_sandboxed(smollm2_dir, tmp_path):
    template = "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}"
    d = _copy_tokenizer(smollm2_dir, tmp_path / "evil", {"chat_template": template})
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_dir(d).render_chat(CHATS["single"])


def test_trusted_imports_do_not_load_torch():
    code = (
        "import sys, teesplit.tee.tokenizer, teesplit.models; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(teesplit.__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_long_text_is_tokenized_without_holding_the_gil(tok, hf_tok):
    """The API tokenizes in its HTTP threads while the scheduler decodes: a long prompt must
    not stop the other threads (`tokenizers`' encode holds the GIL: 3 s for a MiB here)."""
    import threading
    import time

    text = "The quick brown fox jumps over the lazy dog, again and again. " * 10_000  # 620 kB
    gaps, stop = [0.0], threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        ids = tok.encode(text)
    finally:
        stop.set()
        thread.join()
    assert ids == hf_tok.encode(text)
    print(f"encoding {len(text)} characters: the longest pause of another thread {gaps[0] * 1000:.0f} ms")
    assert gaps[0] < 1.0


def test_max_token_bytes_bounds_every_token(tok):
    n = tok.max_token_bytes()
    assert 16 <= n <= 256
    assert all(len(tok.decode([i], skip_special_tokens=False).encode()) <= n for i in range(0, 49152, 97))
