"""`teesplit.Runner`: the split model from Python, in a few lines (TRUSTED side).

    from teesplit import Runner

    with Runner(server="tcp://gpu-host:5555", model="default", plan="v3-fused", verify=True) as r:
        print(r.generate("What is the capital of France?", chat=True).text)
        for piece in r.stream("Tell me a story.", chat=True, max_new_tokens=64):
            print(piece, end="", flush=True)

It is built by the same assembly as `teesplit generate`, `api` and `chat` (tee/assemble.py),
so it has every protection they have: CURVE keys, the trusted-parameter check, weight pins,
`verify`, the private plans (two servers for "private-2party"), retries and replay.
`server="local"` runs the GPU service in this process (that needs torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from teesplit.tee.assemble import DEFAULT_ADDRESS, Assembly, RunnerSettings, port_stats
from teesplit.tee.decode import Batch, Row, SamplingParams, eos_ids
from teesplit.tee.generate import GenerationResult, Generator
from teesplit.tee.tokenizer import Tokenizer
from teesplit.transport import GPUServerUnavailable


class Runner:
    """A connected runner: `generate` returns the whole answer with its numbers, `stream`
    yields the text as it is produced. Close it (or use `with`) to close the GPU session."""

    def __init__(
        self,
        server: str | list[str] = DEFAULT_ADDRESS,
        model: str = "default",
        plan: str = "v3-fused",
        *,
        verify: bool = False,
        wire_dtype: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        curve_secret: str | None = None,
        server_key: str | None = None,
        weights_sha256: str | None = None,
        weights_manifest: str | None = None,
        pad_pool: int = 32,
        private_weights: str = "int16",
        cache_dir: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ):
        from teesplit.launch import local_service
        from teesplit.models import resolve_model

        model_dir = resolve_model(model, Path(cache_dir) if cache_dir else None)
        settings = RunnerSettings(
            model_dir=model_dir,
            servers=tuple([server] if isinstance(server, str) else server),
            plan=plan,
            wire_dtype=wire_dtype,
            timeout_s=timeout,
            retries=retries,
            curve_secret=curve_secret,
            server_key=server_key,
            verify=verify,
            weights_sha256=weights_sha256,
            weights_manifest=weights_manifest,
            pad_pool=pad_pool,
            private_weights=private_weights,
            device=device,
            dtype=dtype,
        )
        self.tokenizer = Tokenizer.from_dir(model_dir)
        assembly = Assembly(settings, local=lambda _i: local_service(model_dir, device, dtype))
        self.model = assembly.connect()[0]
        self._generator = Generator(self.model, self.tokenizer, prefill_chunk=settings.prefill_chunk)

    def _ids(self, prompt: str | list[int], chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[int], *, chat: bool = False, **sampling) -> GenerationResult:
        """The whole answer to `prompt` (text, or token ids); `chat` wraps text in the model's
        chat template. `sampling`: SamplingParams' fields (max_new_tokens, temperature, top_k,
        top_p, seed, stop). Its `stats` are `teesplit generate --stats-json`'s."""
        params = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop", ()))})
        result = self._generator.generate(self._ids(prompt, chat), params)
        result.stats.update(port_stats(self.model.gpu))
        return result

    def stream(self, prompt: str | list[int], *, chat: bool = False, **sampling) -> Iterator[str]:
        """The answer's text, piece by piece, as each piece is final (the same tokens as
        `generate`)."""
        params = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop", ()))})
        params.validate()
        pieces: list[str] = []
        row = Row(
            self._ids(prompt, chat),
            params,
            self.tokenizer,
            eos_ids(self.model, self.tokenizer),
            pieces.append,
        )
        batch = Batch(self.model, [row])
        reachable = True
        try:
            batch.prefill()
            while True:
                yield from pieces
                pieces.clear()
                if not batch.live:
                    return
                batch.step()
        except GPUServerUnavailable:
            reachable = False
            raise
        finally:
            batch.close(reachable)

    def close(self) -> None:
        self.model.gpu.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
