"""The one builder: settings -> connection(s) -> port -> model (TRUSTED side).

Every entry point builds its runner here: `teesplit generate`, `api` and `chat`, the Python
`teesplit.Runner`, the benchmark and the tests. So a protection added here reaches every path:

1. settings are checked before anything connects (`RunnerSettings.check`);
2. the runner's own checkpoint is put in charge once (`Assembly.__init__`): pinned files are
   hashed (`--weights-sha256`, `--weights-manifest`), and when the model directory holds
   weights the port takes norm weights and RoPE parameters from them and refuses an Init that
   differs (the trusted-parameter check); `--verify` checks every result against fingerprints
   of them. A directory with the tokenizer only runs unchecked, with a warning;
3. each `connect()` opens the connection(s) (ZeroMQ with CURVE keys, shm, or the GPU service
   in this process), wraps them in the port the plan needs (plain, verified, or private over
   one or two servers), checks that the server serves the local model, picks the plan for
   `--plan auto` from a measurement of the link, and returns the model. The API calls it again
   after the server was unreachable.

numpy only: the GPU service for `--server local` is handed in by the caller (`local`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teesplit.config import ModelConfig
from teesplit.errors import UsageError
from teesplit.protocol import WIRE_DTYPES
from teesplit.tee.client import GPUClient
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import Plan, get_plan
from teesplit.transport import open_transport

DEFAULT_PREFILL_CHUNK = "auto"  # prompt tokens per forward pass: by placement (plans.prefill_chunk)
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
# What a model has to agree on with the server that serves it (the tokenizer is local).
SAME_MODEL_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")

# connection index -> the request handler of a GPU service in this process (--server local)
LocalFactory = Callable[[int], Callable[[Sequence[Any]], list]]


class ModelMismatch(UsageError):
    """The GPU server serves another model than the runner's local copy."""


@dataclass(frozen=True)
class RunnerSettings:
    """Everything that decides how a runner is built. Each field is one flag of `teesplit
    generate`, `api` and `chat` (the same flags for all three)."""

    model_dir: Path
    servers: tuple[str, ...] = (DEFAULT_ADDRESS,)  # two for private-2party; "local": in this process
    plan: str = "v3-fused"  # a plan name, or "auto"
    wire_dtype: str | None = None  # None: float32 (or what --plan auto picks)
    timeout_s: float = 60.0  # per reply, from a server that is connected but slow
    retries: int = 2  # resends of a request that got no reply
    # A request that finds no connection to the server (none listens, it died, its host is gone)
    # fails after this long, whatever timeout_s and retries say.
    connect_timeout_s: float = 5.0
    curve_secret: str | None = None  # this runner's NAME.key_secret
    server_key: str | None = None  # the GPU server's public NAME.key
    verify: bool = False
    weights_sha256: str | None = None
    weights_manifest: str | None = None
    pad_pool: int = 32  # private plans: pads (otp) or server b's shares (2party) made ahead, in tokens
    private_weights: str = "int16"  # private plans: the integer weights the GPU multiplies by
    # Prompt tokens per forward pass (None: a whole prompt in one): both sides' memory for a
    # prefill is bounded by chunk x context.
    prefill_chunk: int | str | None = DEFAULT_PREFILL_CHUNK
    connections: int = 1  # models over their own connections (--pipeline: 2)
    device: str = "auto"  # --server local: the GPU service's device and dtype
    dtype: str = "auto"
    # --plan auto chooses for this many positions and top-k candidates per decode token.
    auto_context: int = 384
    auto_top_k: int | None = 1
    log: Callable[[str], None] | None = field(default=None, compare=False)  # warnings, progress

    @property
    def plan_or_none(self) -> Plan | None:
        return None if self.plan == "auto" else get_plan(self.plan)

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded or connected."""
        plan = self.plan_or_none
        want = plan.servers if plan is not None else 1
        if len(self.servers) != want:
            if want == 2:
                raise UsageError(
                    "plan private-2party needs two non-colluding GPU servers: --server A --server B"
                )
            raise UsageError(
                f"plan {self.plan} talks to one GPU server; --server was given {len(self.servers)} times"
            )
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise UsageError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        private = plan is not None and plan.private is not None
        if private and self.wire_dtype not in (None, "float32"):
            raise UsageError(
                f"the private plans send fixed-point ring elements (int64) on the wire; --wire-dtype "
                f"{self.wire_dtype} does not apply to them (leave it unset)"
            )
        if self.verify:
            from teesplit.tee.verify import RING_VERIFIED_PLANS, VERIFIED_PLANS

            if plan is None or plan.name not in VERIFIED_PLANS + RING_VERIFIED_PLANS:
                raise UsageError(
                    f"--verify supports --plan {', '.join(VERIFIED_PLANS + RING_VERIFIED_PLANS)}"
                )
            if self.wire_dtype not in (None, "float32"):
                raise UsageError("--verify needs float32 on the wire: drop --wire-dtype")
        if (self.curve_secret is None) != (self.server_key is None):
            raise UsageError(
                "CURVE needs both --curve-secret FILE (this runner's NAME.key_secret) and --server-key FILE"
            )
        if self.curve_secret is not None and any(s.startswith("shm://") for s in self.servers):
            raise UsageError("CURVE secures tcp:// and ipc:// links; shm:// never leaves this host")
        if self.timeout_s <= 0 or self.retries < 0 or self.pad_pool < 0 or self.connections < 1:
            raise UsageError("timeout must be > 0, retries and pad pool >= 0, connections >= 1")
        if not self.connect_timeout_s > 0:
            raise UsageError("the connect timeout must be > 0")
        chunk = self.prefill_chunk
        if chunk != "auto" and chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise UsageError(f"--prefill-chunk must be auto or at least 1 token (0: none), got {chunk!r}")
        if self.private_weights not in ("int16", "int8"):
            raise UsageError(f"--private-weights must be int16 or int8, got {self.private_weights!r}")


class Assembly:
    """Builds models from one `RunnerSettings`; the checkpoint's trust is set up once."""

    def __init__(self, settings: RunnerSettings, local: LocalFactory | None = None):
        settings.check()
        self.settings = s = settings
        self.plan = s.plan_or_none
        self._local = local
        self._local_handles: dict[int, Callable] = {}  # connection index -> its in-process service
        self._verifiers: dict[int, Any] = {}  # connection index -> fingerprints, kept across reconnects
        self.choice = None  # what --plan auto picked at the last connect (tee.adaptive.Choice)
        self.checkpoint = self._trusted_checkpoint()
        self.curve = None
        if s.curve_secret is not None:
            from teesplit.transport.curve import CurveClient

            self.curve = CurveClient.from_files(s.curve_secret, s.server_key)
        self.local_weights = None
        if self.plan is not None and self.plan.private is not None:  # embedding and pads from it
            from teesplit.tee.local_weights import load_local_weights

            self.local_weights = load_local_weights(s.model_dir)

    def _say(self, message: str) -> None:
        log = self.settings.log
        if log is not None:
            log(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def _trusted_checkpoint(self):
        """The runner's own checkpoint, after its pins are checked; None when the model
        directory holds no weights (tokenizer only): then the server's Init is taken unchecked,
        and pins and --verify are refused."""
        from teesplit.tee.checkpoint import TrustedCheckpoint, check_pins

        s = self.settings
        pinned = s.weights_sha256 is not None or s.weights_manifest is not None
        if not TrustedCheckpoint.available(s.model_dir):
            if pinned or s.verify:
                raise UsageError(
                    f"{s.model_dir} holds no weights (*.safetensors): --verify and weight pins need the "
                    "checkpoint on the runner"
                )
            self._say(
                f"warning: {s.model_dir} holds no weights; norm weights and RoPE parameters come from the "
                "GPU server unchecked"
            )
            return None
        if pinned:
            manifest = Path(s.weights_manifest) if s.weights_manifest else None
            names = check_pins(s.model_dir, s.weights_sha256, manifest)
            self._say(f"checkpoint pinned: {', '.join(names)} match")
        return TrustedCheckpoint(s.model_dir)

    # ---- connections and ports --------------------------------------------------------------
    def _client(self, index: int, address: str) -> GPUClient:
        """A plain port on a fresh connection to `address` (connection `index`)."""
        s = self.settings
        local = None
        if address == "local":
            if self._local is None:
                raise UsageError("--server local needs the GPU service in this process (torch)")
            if index not in self._local_handles:
                self._local_handles[index] = self._local(index)
            local = self._local_handles[index]
        connect = min(s.connect_timeout_s, s.timeout_s)  # never longer than a reply may take
        transport = open_transport(address, s.timeout_s, self.curve, local=local, connect_timeout_s=connect)
        return GPUClient(transport, s.wire_dtype or "float32", retries=s.retries)

    def _port(self, index: int, address: str):
        """The port for one connection: plain, or verified when the checkpoint is local."""
        client = self._client(index, address)
        if self.checkpoint is None:
            return client
        from teesplit.tee.verify import VerifiedPort

        def progress(i: int, n: int) -> None:
            if i == 0:
                self._say(f"verify: fingerprinting {n} layers of {self.settings.model_dir.name} ...")

        return VerifiedPort(
            client,
            checkpoint=self.checkpoint,
            verify=self.settings.verify,
            progress=progress,
            verifier=self._verifiers.get(index),
        )

    def connect(
        self,
        auto_context: int | None = None,
        auto_top_k: int | None = -1,
        auto_phases: tuple[int, int] | None = None,
    ) -> list[TEELlamaModel]:
        """Fresh connection(s) and a model on each: one per `connections`, or one model over the
        two servers of private-2party. `auto_context`, `auto_top_k`: what `--plan auto` chooses
        for, when the caller knows better than the settings (the prompts' lengths). With
        `auto_phases` (prompt tokens, new tokens) it chooses a plan per phase (prefill, decode)
        for such requests; without, one plan for both (the API's batches share one plan)."""
        s = self.settings
        if self.plan is not None and self.plan.private is not None:
            ports = [self._port(i, a) for i, a in enumerate(s.servers)]
            try:
                from teesplit.tee.private import private_gpu

                gpu = private_gpu(self.plan.name, self.local_weights, ports, s.pad_pool, s.private_weights)
            except BaseException:
                for p in ports:
                    p.close()
                raise
            return [self._model(gpu, 0)]
        models: list[TEELlamaModel] = []
        try:
            for i in range(s.connections):
                models.append(self._model(self._port(i, s.servers[0]), i))
        except BaseException:
            for m in models:
                m.gpu.close()
            raise
        if self.plan is None:
            context = s.auto_context if auto_context is None else auto_context
            top_k = s.auto_top_k if auto_top_k == -1 else auto_top_k
            if auto_phases is not None:
                self.choice = choose_phases(
                    models, *auto_phases, s.prefill_chunk, top_k, s.wire_dtype, self._say
                )
            else:
                self.choice = choose_plan(models, context, top_k, s.wire_dtype, self._say)
        return models

    def _model(self, port, index: int) -> TEELlamaModel:
        try:
            model = TEELlamaModel(port, self.plan or get_plan("v2-fused"))
            check_same_model(model.config, self.settings.model_dir)
        except BaseException:
            port.close()
            raise
        from teesplit.tee.verify import VerifiedPort

        if isinstance(port, VerifiedPort) and port.verifier is not None:
            self._verifiers[index] = port.verifier
        return model


def check_same_model(config: ModelConfig, model_dir: Path) -> None:
    """The tokenizer is local, the weights are remote: refuse to mix two different models."""
    local = ModelConfig.from_dir(model_dir)
    for name in SAME_MODEL_FIELDS:
        if getattr(local, name) != getattr(config, name):
            raise ModelMismatch(
                f"the GPU server serves a different model ({name}={getattr(config, name)!r}, local "
                f"{model_dir} has {getattr(local, name)!r}); pass the server's model with --model"
            )


def choose_plan(
    models: list[TEELlamaModel],
    context: int,
    top_k: int | None,
    wire_dtype: str | None,
    say: Callable[[str], None],
):
    """--plan auto: measure the link once, pick plan and wire dtype, apply to every model;
    returns the choice (tee.adaptive.Choice)."""
    from teesplit.tee.adaptive import choose

    wires = (wire_dtype,) if wire_dtype else ("float32", "float16")
    choice = choose(models[0].gpu, models[0].config, context, top_k, wires)
    _apply_choice(models, choice.plan, None, choice.wire_dtype, choice.link, say)
    return choice


def choose_phases(
    models: list[TEELlamaModel],
    prompt_tokens: int,
    new_tokens: int,
    chunk: int | None,
    top_k: int | None,
    wire_dtype: str | None,
    say: Callable[[str], None],
):
    """--plan auto for known requests: measure once, pick a plan per phase (prefill, decode) and
    the wire dtype, apply to every model; returns the choice (tee.adaptive.PhaseChoice)."""
    from teesplit.tee.adaptive import choose_phases as choose

    wires = (wire_dtype,) if wire_dtype else ("float32", "float16")
    choice = choose(models[0].gpu, models[0].config, prompt_tokens, new_tokens, chunk, top_k, wires)
    _apply_choice(models, choice.prefill, choice.decode, choice.wire_dtype, choice.link, say)
    return choice


def _apply_choice(models: list[TEELlamaModel], plan, decode_plan, wire: str, link, say) -> None:
    """What --plan auto picked, on every model (decode_plan None: `plan` for both phases), and
    one line saying it."""
    for m in models:
        m.plan, m.decode_plan = plan, decode_plan
        m.gpu.wire_dtype = wire
    plans = plan.name if decode_plan in (None, plan) else f"{plan.name} then {decode_plan.name}"
    say(
        f"plan auto: link rtt {link.rtt_s * 1e6:.0f} µs, up {link.up_bytes_per_s / 1e6:.0f} MB/s, "
        f"down {link.down_bytes_per_s / 1e6:.0f} MB/s -> {plans}, wire {wire}"
    )


def port_stats(port) -> dict[str, Any]:
    """What a port adds to the stats JSON: the private plans' pads, --verify's checks."""
    out: dict[str, Any] = {}
    if getattr(port, "private", False):  # the servers' integer weights
        out["private_weights"] = f"int{port.bits}"
        out["server_private_bytes_per_weight"] = port.server_private_bytes_per_weight
        out["private_servers"] = port.server_setup
    pool = getattr(port, "pool", None)
    if pool is not None:
        out["pads"] = pool.stats()  # the trusted side's offline cost
    shares = getattr(port, "share_metrics", None)
    if shares is not None:  # private-2party: server b's work made ahead, off the critical path
        out["shares_ahead"] = {
            "rpc": sum(shares.rpc.values()),
            "bytes": {"to_gpu": shares.bytes_to_gpu, "from_gpu": shares.bytes_from_gpu},
            "gpu_s": shares.gpu_s,
        }
    verifier = getattr(port, "verifier", None)
    if verifier is not None:
        v = verifier.stats
        out["verify"] = {
            "checks": v.checks,
            "by_op": dict(sorted(v.by_op.items())),
            "check_s": v.check_s,
            "setup_s": v.setup_s,
            "fingerprint_bytes": v.fingerprint_bytes,
        }
    return out
