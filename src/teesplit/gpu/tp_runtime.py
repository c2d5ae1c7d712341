"""Running a tensor-parallel GPU server: launch, the process group, rank 0's hand-over of each
request, the other ranks' loop, and what happens when a rank fails (UNTRUSTED side).

Launch. `teesplit serve --tp N` starts N ranks on this host through torch.distributed's elastic
launcher, the machinery behind torchrun (a rendezvous, and an agent that supervises the ranks:
when one fails it stops the others, and restarts them all if --max-restarts allows).
`torchrun --nproc-per-node N -m teesplit serve --tp N ...` starts the same ranks from outside,
on one host or, with a rendezvous endpoint, on several. Each rank loads only its shard (tp.py).

Serving. Rank 0 owns the socket (ZeroMQ or shm), validation, the reply cache and the session
bookkeeping: it runs the ordinary `RequestHandler` (handler.py), whose `run` it overrides. For
an operation in tp.SHARDING, rank 0
1. splits the request: its slice, and the checks only the whole model can make;
2. runs the operation on its own shard. The service calls `_checked()` once every check of the
   request has passed, and only then does rank 0 broadcast the request to the other ranks: a
   request that fails validation never reaches them. What can still fail afterwards (NaN
   computed into a KV cache write) is decided by all ranks together (`_agree`);
3. combines the ranks' outputs on rank 0.
The other ranks loop: receive, run the same operation on their shard, join its collectives.
Control messages (requests, heartbeats, dropped sessions, stop) travel on a gloo group on the
CPU; activations on the data group: NCCL with --device cuda (one GPU per rank, LOCAL_RANK),
else the same gloo group. Requests are re-encoded with the wire codec (protocol.encode): no
pickle crosses between ranks either.

Failures are bounded, and never hang rank 0:
- every collective has a timeout (--tp-timeout); a rank that dies breaks its peers' sockets
  at once, one that hangs is noticed when the timeout runs out;
- an idle rank 0 sends a heartbeat, a round trip through every rank, every HEARTBEAT_S;
- a watchdog thread on every rank ends its process when one request takes longer than the
  timeout plus WATCHDOG_GRACE_S (a collective stuck where its timeout cannot fire, as a CUDA
  synchronization can), or when its parent, the launcher, is gone (no orphans);
- when the group breaks, rank 0 answers the request in flight (and any already queued) with an
  `internal` error naming the cause, and exits non-zero; the launcher then stops every rank.
  If the launcher will restart the group (restarts left), rank 0 exits without answering, so
  the runner's retry reaches the restarted group and replays its sessions (tee/generate.py);
- SIGTERM/SIGINT: rank 0 finishes the request in flight, then tells the other ranks to stop;
  they ignore the signals themselves and follow rank 0 (or die with it).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from teesplit.config import ModelConfig
from teesplit.gpu.capacity import default_max_message_bytes
from teesplit.gpu.handler import Call, RequestHandler, configure_logging
from teesplit.gpu.handler import log_event as _log_event
from teesplit.gpu.service import TORCH_DTYPES, SessionLimits
from teesplit.gpu.tp import (
    LOCAL,
    SHARDING,
    ShardedService,
    ShardPlan,
    TPConfigError,
    check_tp_size,
    init_payload,
    load_shard,
)
from teesplit.protocol import OPS, Limits, OpSpec, ProtocolError, decode, encode, validate_request
from teesplit.quant import weight_bits

HEARTBEAT_S = 1.0  # an idle rank 0 checks on the other ranks this often
WATCHDOG_GRACE_S = 10.0  # past --tp-timeout, before a rank stuck in one request ends itself
STARTUP_TIMEOUT_S = 1800.0  # loading (and converting a GGUF file) before the group serves
EXIT_GROUP_FAILED = 3
EXIT_STUCK = 4
EXIT_ORPHANED = 5

# Control messages from rank 0, each a broadcast of one SLOT (and of the rest of a longer
# request): a head of HEAD_WORDS int64 (kind, frame count, frame lengths), then the frames.
REQUEST, HEARTBEAT, DROP, STOP = 1, 2, 3, 4
SLOT = 16 << 10
HEAD_WORDS = 16
_HEAD_BYTES = 8 * HEAD_WORDS

log = logging.getLogger("teesplit.tp")


def log_event(event: str, message: str | None = None, level: int = logging.INFO, **fields: Any) -> None:
    """A line of the tensor-parallel runtime (logger teesplit.tp: the other ranks keep it on
    while they silence the session lines rank 0 already writes)."""
    _log_event(event, message, level, logger=log, **fields)


class GroupFailure(RuntimeError):
    """A rank of the tensor-parallel group is gone or stuck: the group cannot serve any more."""


@dataclass(frozen=True)
class TPSettings:
    """What every rank needs to serve (built by the CLI; crosses to the ranks by spawn)."""

    model: str  # a model directory, or a spec each rank resolves (under torchrun)
    tp: int
    bind: str
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    max_tensor_bytes: int | None = None  # None: what this model's largest message needs
    session_idle_timeout_s: float | None = None
    log_format: str = "text"
    curve_secret: str | None = None
    allow_keys: str | None = None
    timeout_s: float = 120.0  # --tp-timeout: every collective
    max_restarts: int = 0
    private_weights: str | None = None  # --private-weights: int16 or int8, quantized at start


# ---- the group's collectives ------------------------------------------------------------------------
class Group:
    """The serving groups: `ctrl` (gloo, CPU) for control messages and flags, `data` for
    activations (NCCL on CUDA, else `ctrl`). Every call is a collective: every rank makes the
    same calls in the same order."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float):
        self.rank, self.world, self.device = rank, world, device
        timeout = timedelta(seconds=timeout_s)
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout)
        self.data = self.ctrl if device.type == "cpu" else dist.new_group(backend="nccl", timeout=timeout)
        self._slot = torch.zeros(SLOT, dtype=torch.uint8)
        self._slot_np = self._slot.numpy()
        self._flag = torch.zeros(1, dtype=torch.int32)

    # control: rank 0 -> the other ranks
    def send(self, kind: int, frames: list | tuple = ()) -> None:
        lens = [len(f) for f in frames]
        head = np.zeros(HEAD_WORDS, np.int64)
        head[:2] = kind, len(lens)
        head[2 : 2 + len(lens)] = lens
        payload = b"".join(frames)
        first = min(len(payload), SLOT - _HEAD_BYTES)
        self._slot_np[:_HEAD_BYTES] = head.view(np.uint8)
        if first:
            self._slot_np[_HEAD_BYTES : _HEAD_BYTES + first] = np.frombuffer(payload, np.uint8, count=first)
        dist.broadcast(self._slot, src=0, group=self.ctrl)
        if len(payload) > first:
            dist.broadcast(
                torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8), src=0, group=self.ctrl
            )

    def recv(self) -> tuple[int, list[memoryview]]:
        dist.broadcast(self._slot, src=0, group=self.ctrl)
        head = self._slot_np[:_HEAD_BYTES].view(np.int64).copy()
        kind, n = int(head[0]), int(head[1])
        lens = [int(x) for x in head[2 : 2 + n]]
        total = sum(lens)
        first = min(total, SLOT - _HEAD_BYTES)
        buf = bytearray(total)
        buf[:first] = self._slot_np[_HEAD_BYTES : _HEAD_BYTES + first].tobytes()
        if total > first:
            rest = torch.empty(total - first, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.ctrl)
            buf[first:] = rest.numpy().tobytes()
        view, frames, at = memoryview(buf), [], 0
        for length in lens:
            frames.append(view[at : at + length])
            at += length
        return kind, frames

    def agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank."""
        self._flag[0] = int(ok)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MIN, group=self.ctrl)
        return bool(self._flag[0])

    def max_over_ranks(self, a: np.ndarray) -> np.ndarray:
        """The elementwise maximum of every rank's `a` (same shape; float64 on the CPU)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl)
        return t.numpy()

    # data
    def _on_data_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.data is self.ctrl or t.device == self.device else t.to(self.device)

    def all_reduce(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """The sum over the ranks, in place where the input allows (a numpy array stays numpy)."""
        t = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
        if not t.is_contiguous():
            t = t.contiguous()
        moved = self._on_data_device(t)
        dist.all_reduce(moved, group=self.data)
        if moved is not t:
            t.copy_(moved)
        return y if isinstance(y, np.ndarray) and t.data_ptr() == y.ctypes.data else t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's t (equal shapes) on rank 0, on t's device; None on the other ranks."""
        moved = self._on_data_device(t.contiguous())
        parts = [torch.empty_like(moved) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(moved, parts, dst=0, group=self.data)
        if parts is None or moved is t:
            return parts
        return [p.to(t.device) for p in parts]


# ---- rank 0 ---------------------------------------------------------------------------------------------
class Rank0Handler(RequestHandler):
    """The request handler of rank 0: validates, then shares each operation with the other ranks."""

    def __init__(
        self,
        service: ShardedService,
        group: Group,
        limits: Limits,
        stop: threading.Event,
        watchdog: Watchdog,
        restarts_left: bool = False,
    ):
        super().__init__(service, limits)
        self.group, self.stop, self.watchdog = group, stop, watchdog
        self.restarts_left = restarts_left
        self.failure: GroupFailure | None = None
        self._last_sent = time.monotonic()

    def run(self, spec: OpSpec, call: Call) -> Any:
        if self.failure is not None:
            raise self.failure
        if call.op not in SHARDING:
            raise ProtocolError(f"{call.op} is not served by a tensor-parallel server", "unknown_op")
        sharding = SHARDING[call.op]
        if sharding is LOCAL:
            return super().run(spec, call)
        if call.op == "OpenSession":
            call.new_sid = secrets.randbits(62)  # the other ranks open it under the same id
        s = self.service
        local = call if sharding.split is None else sharding.split(s, call)
        sent: list[bool] = []

        def commit() -> None:
            sent.append(True)  # from here a failure is the group's, even one of this broadcast
            self._send_request(call)

        s.commit = commit
        self.watchdog.busy(call.op)
        try:
            out = super().run(spec, local)
            s._checked()  # an operation that never called it still reaches the other ranks
            return sharding.combine(self.group, s.plan, call, out)
        except ProtocolError:
            raise  # refused before the hand-over, or by every rank together (`_agree`)
        except Exception as e:
            if not sent:
                raise  # nothing was shared: an ordinary error of this request
            raise self._fail(f"{type(e).__name__}: {e}", call.op) from e
        finally:
            s.commit = None
            self.watchdog.idle()

    def _send_request(self, call: Call) -> None:
        header = {"id": 0, "op": call.op, "sid": call.sid, "nsid": call.new_sid, "args": call.args}
        header["owner"] = call.owner  # every rank counts a client's sessions against its own caps
        self.group.send(REQUEST, encode(header, call.tensors))
        self._last_sent = time.monotonic()

    def _fail(self, cause: str, op: str | None = None) -> GroupFailure:
        """The group is broken: answer errors from now on, stop serving, exit non-zero."""
        if self.failure is None:
            during = f" during {op}" if op else ""
            self.failure = GroupFailure(
                f"the tensor-parallel group ({self.group.world} ranks) failed{during}: {cause[:300]}; "
                "a rank died or stopped answering, and this server stops (restart it; with "
                "--max-restarts the launcher does)"
            )
            log_event("tp_group_failed", str(self.failure), level=logging.ERROR, op=op, cause=cause[:300])
            self.stop.set()
            if self.restarts_left:  # unanswered: the runner's retry reaches the restarted group
                logging.shutdown()
                os._exit(EXIT_GROUP_FAILED)
        return self.failure

    def tick(self) -> None:
        """Idle: a heartbeat through every rank now and then, so a lost rank is noticed."""
        if self.failure is not None or time.monotonic() - self._last_sent < HEARTBEAT_S:
            return
        self.watchdog.busy("heartbeat")
        try:
            self.group.send(HEARTBEAT)
            self.group.agree(True)
            self._last_sent = time.monotonic()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", "heartbeat")
        finally:
            self.watchdog.idle()

    def sessions_dropped(self, sids: list[int]) -> None:
        if self.failure is not None or not sids:
            return
        try:
            self.group.send(DROP, [msgpack.packb(sids)])
            self._last_sent = time.monotonic()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", "session drop")

    def close(self) -> None:
        """Tell the other ranks to stop (when they can still hear it)."""
        if self.failure is None:
            try:
                self.group.send(STOP)
            except Exception as e:
                log_event("tp_stop_failed", level=logging.WARNING, msg=f"{type(e).__name__}: {e}")


# ---- the other ranks ----------------------------------------------------------------------------------
def serve_worker(service: ShardedService, group: Group, limits: Limits, watchdog: Watchdog) -> int:
    """Follow rank 0 until it says stop; returns the exit code. A failure of the group (rank 0
    gone, a collective timed out) raises."""
    handler = RequestHandler(service, limits)  # the dispatch table and f32, as on rank 0
    served = refused = 0
    while True:
        kind, frames = group.recv()
        if kind == STOP:
            break
        if kind == HEARTBEAT:
            group.agree(True)
            continue
        if kind == DROP:
            for sid in msgpack.unpackb(bytes(frames[0])):
                service.sessions.pop(sid, None)
            continue
        header, tensors = decode(frames, limits)
        _, op, args = validate_request(header, tensors)
        owner = header.get("owner")
        call = Call(op, args, tensors, sid=header.get("sid"), new_sid=header.get("nsid"), owner=owner)
        spec, sharding = OPS[op], SHARDING[op]
        watchdog.busy(op)
        try:
            if spec.session != "none" and call.sid is not None:
                call.session = service.session(call.sid, owner)
            local = call if sharding.split is None else sharding.split(service, call)
            out = handler.run(spec, local)
            sharding.combine(group, service.plan, call, out)
            served += 1
        except ProtocolError:
            refused += 1  # rank 0 refused it too: by the same check, or together (`_agree`)
        finally:
            watchdog.idle()
    leaked = refused - service.agreed_refusals  # refusals a check before the hand-over should have made
    log_event("tp_worker_stop", rank=group.rank, served=served, refused=refused, leaked=leaked)
    return 0


# ---- the watchdog ---------------------------------------------------------------------------------------
class Watchdog:
    """Ends this rank's process when one request runs past `limit_s`, or when its parent (the
    launcher that supervises the group) is gone."""

    def __init__(self, limit_s: float, rank: int):
        self.limit_s, self.rank = limit_s, rank
        self._since: float | None = None
        self._op: str | None = None
        self._parent = os.getppid()
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    def busy(self, op: str) -> None:
        self._op, self._since = op, time.monotonic()

    def idle(self) -> None:
        self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            since = self._since
            if since is not None and time.monotonic() - since > self.limit_s:
                self._exit(EXIT_STUCK, f"stuck in {self._op} for more than {self.limit_s:g} s")
            if os.getppid() != self._parent:
                self._exit(EXIT_ORPHANED, "the launcher is gone")

    def _exit(self, code: int, why: str) -> None:
        message = f"rank {self.rank}: {why}; exiting"
        log_event("tp_watchdog", message, logging.CRITICAL, rank=self.rank, why=why)
        logging.shutdown()
        os._exit(code)


# ---- one rank, start to end -------------------------------------------------------------------------
def run_rank(s: TPSettings) -> int:
    """The whole life of one rank (started by torchrun or `launch`); returns the exit code."""
    configure_logging(s.log_format)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != s.tp:
        raise TPConfigError(f"the launcher started {world} ranks but --tp is {s.tp}: pass --tp {world}")
    device = _device(s.device, local_rank)
    dtype = TORCH_DTYPES[
        s.dtype if s.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ]
    _threads(s.threads, device)
    _init_process_group(rank, world)
    if rank:
        # The other ranks follow rank 0 and stop with it (rank 0 handles the signals).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logging.getLogger("teesplit.server").setLevel(logging.WARNING)  # rank 0 logs the sessions
    model_dir = _resolve(s, local_rank)
    plan = ShardPlan(ModelConfig.from_dir(model_dir), world, rank)
    weights = load_shard(model_dir, plan, device, dtype)
    group = Group(rank, world, device, s.timeout_s)
    init = init_payload(model_dir, plan.config) if rank == 0 else (torch.empty(0), {})
    bits = None if s.private_weights is None else weight_bits(s.private_weights)
    service = ShardedService(weights, plan, group, device, dtype, init, s.limits, private_weights=bits)
    log_event(
        "tp_rank_ready",
        rank=rank,
        world=world,
        pid=os.getpid(),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        private_weights=s.private_weights,
        weight_bytes=service.resident_weight_bytes(),
        private_bytes=service.private_weight_bytes,
        rss_bytes=_rss_bytes(),
    )
    dist.barrier()  # every rank loaded: rank 0 may open the socket
    watchdog = Watchdog(s.timeout_s + WATCHDOG_GRACE_S, rank)
    max_tensor = s.max_tensor_bytes
    if max_tensor is None:
        # the whole model's (a rank's own config has 1/N of the heads and the MLP width)
        whole = service.plan.config
        max_tensor = default_max_message_bytes(whole, s.limits.max_session_tokens, s.limits.max_batch)
    limits = Limits(max_tensor_bytes=max_tensor)
    if rank:
        return _serve_worker_until_stop(service, group, limits, watchdog)
    return _serve_rank0(s, service, group, limits, watchdog, f"{model_dir.name} on {world} x {device.type}")


def _serve_worker_until_stop(
    service: ShardedService, group: Group, limits: Limits, watchdog: Watchdog
) -> int:
    try:
        code = serve_worker(service, group, limits, watchdog)
    except Exception as e:  # rank 0 gone, a collective timed out: the group is over
        log_event(
            "tp_group_failed",
            f"rank {group.rank}: the tensor-parallel group failed ({type(e).__name__}: {str(e)[:300]})",
            level=logging.ERROR,
            rank=group.rank,
        )
        return EXIT_GROUP_FAILED
    dist.destroy_process_group()
    return code


def _serve_rank0(
    s: TPSettings, service: ShardedService, group: Group, limits: Limits, watchdog: Watchdog, desc: str
) -> int:
    stop = threading.Event()
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    restarts_left = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < restarts
    handler = Rank0Handler(service, group, limits, stop, watchdog, restarts_left)
    _log_event(
        "server_start",
        f"serving {desc} at {s.bind}",
        address=s.bind,
        model=desc,
        tp=group.world,
        max_sessions=s.limits.max_sessions,
        max_session_tokens=s.limits.max_session_tokens,
        max_batch=s.limits.max_batch,
        max_kv_bytes=s.limits.max_kv_bytes,
        max_tensor_bytes=limits.max_tensor_bytes,
        max_frame_bytes=handler.max_frame_bytes,
        session_idle_timeout_s=s.session_idle_timeout_s,
        curve=s.curve_secret is not None,
    )
    try:
        if s.bind.startswith("shm://"):
            from teesplit.gpu.shm_server import serve_shm

            serve_shm(handler, s.bind, stop=stop, session_idle_timeout_s=s.session_idle_timeout_s)
        else:
            import zmq

            from teesplit.gpu.zmq_server import serve

            curve = None
            if s.curve_secret is not None:
                from teesplit.transport.curve import CurveServer

                curve = CurveServer.from_files(s.curve_secret, s.allow_keys)
            serve(handler, s.bind, stop=stop, session_idle_timeout_s=s.session_idle_timeout_s, curve=curve)
            zmq.Context.instance().destroy(linger=0)
    finally:
        handler.close()
    if handler.failure is not None:
        return EXIT_GROUP_FAILED
    dist.destroy_process_group()
    return 0


def _init_process_group(rank: int, world: int) -> None:
    """The default group (gloo), on the launcher's store under a prefix of its own for each
    restart of the group: without it, a restarted group reads the addresses its previous
    incarnation left in the store and cannot connect (seen with torch 2.13's elastic agent)."""
    timeout = timedelta(seconds=STARTUP_TIMEOUT_S)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,  # else the launcher's agent holds the store
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"teesplit/attempt-{attempt}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world, timeout=timeout)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TPConfigError("--device cuda but torch sees no CUDA device")
    if local_rank >= torch.cuda.device_count():
        raise TPConfigError(
            f"local rank {local_rank} needs GPU {local_rank}, but this host has {torch.cuda.device_count()}: "
            "start at most one rank per GPU on each host"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _threads(threads: int | None, device: torch.device) -> None:
    """CPU threads per rank: as given, or the host's cores shared out between its ranks."""
    from teesplit.blas import set_blas_threads

    if threads is None and device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
        set_blas_threads(threads)


def _resolve(s: TPSettings, local_rank: int) -> Path:
    """The model directory; a GGUF file is converted once per host (by its local rank 0)."""
    from teesplit.models import resolve_model

    cache = Path(s.cache_dir) if s.cache_dir else None
    if local_rank == 0:
        path = resolve_model(s.model, cache)
    dist.barrier()
    if local_rank:
        path = resolve_model(s.model, cache)
    return path


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- the launcher --------------------------------------------------------------------------------------
def launch(s: TPSettings) -> int:
    """Start s.tp ranks on this host with torch's elastic launcher and supervise them until
    they stop; returns the exit code (non-zero when a rank failed for good)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    configure_logging(s.log_format)
    check_tp_size(ModelConfig.from_dir(s.model), s.tp)  # refused here, before any rank starts
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=s.tp,
        run_id=f"teesplit-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a fresh port for this group's rendezvous store
        rdzv_configs={"timeout": 900},
        max_restarts=s.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, _rank_main)(s)
    except ChildFailedError as e:
        failures = {r: f.exitcode for r, f in e.failures.items()}
        log_event(
            "tp_stopped", f"tensor-parallel server failed: ranks (exit codes) {failures}", level=logging.ERROR
        )
        return EXIT_GROUP_FAILED
    except SignalException as e:  # SIGTERM/SIGINT: every rank was told to stop
        log_event("tp_stopped", f"tensor-parallel server stopped by signal {e.sigval.name}")
    return 0


def _rank_main(s: TPSettings) -> None:
    """The entry point of a rank started by `launch` (a spawned process). It ends the process
    itself: returning would make it wait until the launcher collects its return value, which a
    launcher stopping on a signal never does."""
    code = run_rank(s)
    logging.shutdown()
    os._exit(code)
