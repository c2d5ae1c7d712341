"""Tokenizer and chat template for the TRUSTED side, without torch or transformers.

Reads a Hugging Face model directory (tokenizer.json, tokenizer_config.json,
chat_template.jinja, config.json, generation_config.json) with the `tokenizers` library and
renders the chat template with a sandboxed jinja2 environment configured like transformers',
so prompts tokenize to exactly the ids `transformers.AutoTokenizer` produces. Prompts and
generated text stay inside the trust boundary: only token ids' embeddings leave it.

Allowed imports here: tokenizers, jinja2, json and the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

from teesplit.errors import UsageError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
RELEASE_GIL_ABOVE = 4096  # characters: longer texts are encoded without holding the GIL
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Message fields a model's reasoning arrives under; transformers copies them onto each other.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(UsageError):
    """The model directory's tokenizer files are missing or unusable."""


class ChatTemplateError(UsageError):
    """The model has no chat template, or the template rejected the conversation."""


class Tokenizer:
    """Encode/decode text and render chat prompts exactly as transformers' fast tokenizer does."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._tok = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids: set[int] = set(eos_token_ids)
        # transformers ignores this flag for BPE models: its cleanup would eat real spaces.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._template: jinja2.Template | None = None
        self._max_token_bytes: int | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model directory (needs tokenizer.json)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(
                f"{tok_file} not found: the trusted side needs a fast-tokenizer file; "
                "convert the model with `python -m teesplit.convert` or save it with a fast tokenizer"
            )
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {tok_file}: {e}") from e
        tok_cfg = _read_json(path / "tokenizer_config.json")
        special = _special_tokens(tok_cfg)
        _apply_config_to_backend(backend, tok_cfg, special)
        model_cfgs = (_read_json(path / "config.json"), _read_json(path / "generation_config.json"))
        eos = _eos_ids(backend, special, *model_cfgs)
        return cls(
            backend,
            chat_template=_find_chat_template(path, tok_cfg),
            special_tokens=special,
            eos_token_ids=eos,
            clean_up_tokenization_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
        )

    # -- basic properties --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= RELEASE_GIL_ABOVE:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # `tokenizers` holds Python's global lock through `encode` (3 s for a MiB of text) but
        # releases it in `encode_batch`: a long prompt must not stop every other thread (the
        # API's scheduler decoding other requests' tokens) while it is tokenized.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes any single token decodes to: a text of N tokens has at most N
        times this many bytes (the API bounds prompts by it before tokenizing them)."""
        if self._max_token_bytes is None:
            vocab = self._tok.get_vocab_size(with_added_tokens=True)
            texts = self._tok.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
            self._max_token_bytes = max(1, max(len(t.encode("utf-8", "replace")) for t in texts))
        return self._max_token_bytes

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat template's text for `messages` (what `apply_chat_template` tokenizes)."""
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        chat = _alias_reasoning_fields([_normalize_message(m) for m in messages])
        # Like transformers: special tokens first, caller's kwargs override them; tools and
        # documents are passed as None, which templates can tell apart from "undefined".
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._compiled_template().render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template rejected the conversation: {e}") from e

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat, matching transformers' ``apply_chat_template``."""
        # transformers tokenizes the rendered chat with add_special_tokens=False: templates
        # write their own BOS, and adding it again would double it.
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            if not self.chat_template:
                raise ChatTemplateError(
                    "this model has no chat template (no chat_template.jinja and no 'chat_template' in "
                    "tokenizer_config.json); use plain completion, or use an instruct/chat model"
                )
            try:
                self._template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"the model's chat template does not parse: {e}") from e
        return self._template


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, print what each returns.

    Decodes only a sliding window: the tokens since the last emitted text plus those already
    emitted just before (the "prefix"), and returns the window's text beyond the prefix's. The
    prefix gives context for decoders whose output depends on neighbours (SentencePiece's
    leading space); holding back while the text ends in U+FFFD avoids printing half a UTF-8
    character. The concatenated output, plus `flush()`, equals ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # end of the already-emitted part of the window

    def add(self, token_id: int) -> str:
        """Append one generated id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text, new_text = self._window_texts()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (e.g. a generation that stopped mid-character)."""
        prefix_text, new_text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _window_texts(self) -> tuple[str, str]:
        window = self.ids[self._prefix_offset :]
        emitted = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.decode(window[:emitted], self._skip) if emitted else ""
        return prefix_text, self._tokenizer.decode(window, self._skip)


# -- loading helpers ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config stores it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tok_cfg: dict[str, Any]) -> dict[str, str]:
    found = {name: _token_content(tok_cfg.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: tok for name, tok in found.items() if tok is not None}


def _apply_config_to_backend(backend: _HFTokenizer, tok_cfg: dict[str, Any], special: dict[str, str]) -> None:
    """Apply the tokenizer_config settings transformers applies on top of tokenizer.json."""
    backend.encode_special_tokens = bool(tok_cfg.get("split_special_tokens", False))
    # transformers rebuilds the post-processor from add_bos_token/add_eos_token when the
    # config names either flag or tokenizer.json has none.
    explicit = "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg
    if not explicit and backend.post_processor is not None:
        return
    bos = _token_if_flag(backend, tok_cfg, special, "add_bos_token", "bos_token")
    eos = _token_if_flag(backend, tok_cfg, special, "add_eos_token", "eos_token")
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    parts = {t: backend.token_to_id(t) for t in (bos, eos) if t}
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(parts.items())
    )


def _token_if_flag(
    backend: _HFTokenizer, tok_cfg: dict[str, Any], special: dict[str, str], flag: str, name: str
) -> str | None:
    """The special token `name` when tokenizer_config sets `flag` and the vocabulary has it."""
    token = special.get(name)
    if tok_cfg.get(flag, False) and token is not None and backend.token_to_id(token) is not None:
        return token
    return None


def _eos_ids(backend: _HFTokenizer, special: dict[str, str], *configs: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    eos_token = special.get("eos_token")
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        ids.add(backend.token_to_id(eos_token))
    for cfg in configs:
        value = cfg.get("eos_token_id")
        ids.update(int(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return ids


def _find_chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.50 layout) wins over tokenizer_config.json's field."""
    jinja_file = path / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None and named:
            raise ChatTemplateError(
                f"{path} has several chat templates ({', '.join(map(str, named))}) and none named 'default'"
            )
    return template if isinstance(template, str) else None


# -- chat template environment (mirrors transformers.utils.chat_template_utils) ----------------


class _GenerationTag(jinja2.ext.Extension):
    """Parses ``{% generation %}...{% endgeneration %}`` (used for assistant masks) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, so templates cannot reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes '<', '>', '&'; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Chat templates are untrusted code from the model file, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env


def _plain(value: Any) -> Any:
    """A JSON-typed copy of `value`, so templates see no objects with dangerous methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, bool, int, float):  # subclasses (enums, numpy scalars) drop to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
    # transformers drops None-valued keys: templates handle a missing key, not content=None.
    return {k: _plain(v) for k, v in message.items() if v is not None}


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _clean_up_tokenization(text: str) -> str:
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text
