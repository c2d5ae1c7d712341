"""`teesplit chat`: an interactive terminal chat through the split model (TRUSTED side).

The conversation (history) lives here; every turn renders the whole history with the
model's chat template and generates the reply, streamed as it is produced. Commands:
/reset (forget the history), /stats (the last turn's RPC/byte/time table and the session's
totals), /help, /quit. When the history no longer fits the context, the oldest turns are
dropped (a system prompt is kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from teesplit.protocol import ProtocolError, RemoteError
from teesplit.tee.generate import GenerationResult, Generator, SamplingParams
from teesplit.tee.tokenizer import ChatTemplateError
from teesplit.transport import GPUServerUnavailable

HELP = "commands: /reset (forget the conversation), /stats (numbers of the last turn), /help, /quit"


class ChatSession:
    """The history and the numbers of one conversation."""

    def __init__(self, generator: Generator, params: SamplingParams, context: int, system: str | None = None):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.params = params
        self.context = context
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last: GenerationResult | None = None
        self.turns = 0
        self.tokens = 0
        self.rpcs = 0
        self.bytes = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, user: str) -> list[int]:
        """The chat-templated history plus `user`, oldest turns dropped until it fits."""
        history = self.messages + [{"role": "user", "content": user}]
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + history
            ids = self.tokenizer.apply_chat_template(msgs)
            if len(ids) + self.params.max_new_tokens <= self.context or len(history) == 1:
                break
            history = history[2:] if len(history) > 2 else history[-1:]  # drop the oldest exchange
        if len(ids) + 1 > self.context:
            raise ValueError(f"the message is too long for the model's context ({self.context} tokens)")
        self.messages = history[:-1]
        return ids

    def ask(self, user: str, on_text: Callable[[str], None]) -> GenerationResult:
        ids = self.prompt_ids(user)
        budget = min(self.params.max_new_tokens, self.context - len(ids))
        params = dataclasses.replace(self.params, max_new_tokens=budget)
        result = self.generator.generate(ids, params, on_text=on_text)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": result.text}]
        self.last = result
        self.turns += 1
        self.tokens += len(result.tokens)
        self.rpcs += result.stats["rpc"]["total"]
        self.bytes += result.stats["bytes"]["to_gpu"] + result.stats["bytes"]["from_gpu"]
        self.seconds += result.stats["time_s"]["total"]
        return result

    def totals(self) -> str:
        per = (
            f", {self.rpcs / self.tokens:.1f} RPCs and {self.bytes / self.tokens / 1024:.1f} KiB per token"
            if self.tokens
            else ""
        )
        rate = f", {self.tokens / self.seconds:.1f} tok/s" if self.seconds else ""
        return (
            f"session: {self.turns} turn(s), {len(self.messages) // 2} in the history, "
            f"{self.tokens} tokens generated{per}{rate}"
        )


def run_chat(
    session: ChatSession,
    read_line: Callable[[str], str],
    write: Callable[[str], Any],
    format_stats: Callable[[dict[str, Any]], str],
    echo: bool = False,
) -> int:
    """The read-generate-print loop; returns at /quit or end of input. `echo`: write each line
    read after its prompt (input from a pipe is not echoed by a terminal: without this the
    prompt, the question and the answer would share one line)."""
    write(f"teesplit chat ({HELP})\n")
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            write("\n")
            return 0
        if echo:
            write(line + "\n")
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/help":
            write(HELP + "\n")
            continue
        if text == "/reset":
            session.reset()
            write("(conversation reset)\n")
            continue
        if text == "/stats":
            if session.last is not None:
                write(format_stats(session.last.stats) + "\n")
            write(session.totals() + "\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        write("assistant> ")
        try:
            session.ask(line, write)
            write("\n")
        except (GPUServerUnavailable, RemoteError, ProtocolError) as e:
            write(f"\nerror: {e}\n(the message was not added to the conversation; try again)\n")
        except (ValueError, ChatTemplateError) as e:
            write(f"\nerror: {e}\n")
