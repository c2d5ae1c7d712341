"""Fuzzing a real `teesplit serve` process over tcp loopback: more than 10,000 malformed
messages (hypothesis for structured cases, each with the error code it must get, then a
fast pipelined loop of random mutations). Afterwards the server still computes correct
results and its resident memory has not grown past MAX_RSS_GROWTH over the baseline taken
after startup and a warm-up."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
from helpers import local_model, make_checkpoint, rss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peer import Peer

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.protocol import ERROR_CODES, OPS, PROTOCOL_VERSION, RemoteError, parse_reply, request

MAX_RSS_GROWTH = 64 << 20
STRUCTURED_EXAMPLES = 3000
RAW_MESSAGES = 9000
MESSAGE_MB = 1  # the server's --max-message-mb: larger frames drop the connection
E, F, V, L, HKV, H, D = 64, 96, 128, 2, 2, 4, 16  # the random checkpoint (tests/helpers.py BASE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz"), "llama")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fuzzlog") / "server.log"
    address = free_tcp_address()
    with open(log_path, "w") as log:
        proc = start_server(
            ckpt,
            address,
            ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--max-message-mb", str(MESSAGE_MB)]
            + ["--max-sessions", "4", "--max-kv-gib", "0.01", "--log-format", "json"],
            stderr=log,
        )
    peer = Peer(address, rcvhwm=0, sndhwm=0)
    _warm_up(peer)
    state = {"address": address, "proc": proc, "peer": peer, "log": log_path, "sent": 0}
    state["sid"] = peer.exchange(request(1, "OpenSession", {"batch": 1, "max_tokens": 64}), "OpenSession")[0][
        "res"
    ]["sid"]
    state["rss0"] = rss(proc.pid)
    yield state
    peer.close()
    stop_server(proc)
    assert proc.returncode == 0


def _warm_up(peer: Peer) -> None:
    """One of every operation (and every error path's allocations) before the RSS baseline."""
    x = np.ones((1, 3, E), np.float32)
    res, _ = peer.exchange(request(1, "OpenSession", {"batch": 1, "max_tokens": 64}), "OpenSession")
    sid = res["res"]["sid"]
    pos = np.zeros(1, np.int64)
    for rid, (op, args, tensors, s) in enumerate(
        [
            ("Init", {}, [], None),
            ("Embedding", {}, [np.array([[1, 2, 3]])], None),
            ("Linear", {"layer": 0, "module": "q_proj"}, [x], None),
            ("Matmul", {}, [np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)], None),
            ("LMHead", {"top_k": 4}, [x], None),
            ("LMHead", {}, [x], None),
            ("GateUp", {"layer": 0}, [x], None),
            ("QKV", {"layer": 0}, [x], None),
            ("QKV", {"layer": 0}, [x, pos], sid),
            (
                "AttnScores",
                {"layer": 0},
                [np.ones((1, H, 3, D), np.float32), np.ones((1, HKV, 3, D), np.float32), pos],
                sid,
            ),
            ("AttnOut", {"layer": 0}, [np.full((1, H, 3, 3), 1 / 3, np.float32)], sid),
            ("WriteKV", {"layer": 1}, [np.ones((1, HKV, 3, D), np.float32)] * 2 + [pos], sid),
            ("Ping", {"reply_bytes": 1 << 20}, [], None),
            ("CloseSession", {}, [], sid),
            # The private plans' integers are made on first use: before the memory baseline.
            ("RingSetup", {"bits": 16}, [], None),
            ("RingSetup", {"bits": 8}, [], None),
            (
                "RingOGateUp",
                {"layer": 0, "bits": 16},
                [np.ones((1, 3, H * D), np.int64), x.astype(np.int64)],
                None,
            ),
            ("RingDownLMHead", {"bits": 8}, [np.ones((1, 3, F), np.int64), x.astype(np.int64)], None),
        ],
        start=2,
    ):
        peer.exchange(request(rid, op, args, tensors, s), op)
    for frames in _structured_cases_for_warm_up():
        peer.send(frames)
        peer.recv()


def _structured_cases_for_warm_up() -> list[list]:
    x = np.ones((1, 1, E), np.float32)
    return [
        [b"\xc1"],
        request(1, "Nope", {}, []),
        request(1, "Linear", {"layer": 99, "module": "q_proj"}, [x]),
        request(1, "AttnOut", {"layer": 0}, [x], 12345),
        request(1, "Embedding", {}, [np.array([[V]])]),
    ]


# ---- structured cases: (frames, expected codes, request id echoed or None) --------------------
def header(op: str, args: dict | None = None, t: list | None = None, rid: int = 7, sid=None, **extra) -> dict:
    return {"v": PROTOCOL_VERSION, "id": rid, "op": op, "sid": sid, "args": args or {}, "t": t or [], **extra}


def pack(h: dict, *frames: bytes) -> list:
    return [msgpack.packb(h, use_bin_type=True), *frames]


def f32(shape) -> tuple[list, bytes]:
    return ["float32", list(shape)], np.ones(shape, np.float32).tobytes()


ints64 = st.integers(-(2**63), 2**64 - 1)
# Above the warm-up's ids: the reply cache answers a repeated (id, op) from this peer with the
# cached success reply, which a structured case must not hit.
rids = st.integers(1 << 20, 2**63 - 1)
layers_bad = st.one_of(st.integers(-(2**63), -1), st.integers(L, 2**63 - 1))
bogus_sids = st.integers(0, 2**63 - 1)
dims = st.integers(0, 2**62)


RING_WIDTHS = {
    "RingEmbedQKV": [E],
    "RingOGateUp": [H * D, E],
    "RingDownQKV": [F, E],
    "RingDownLMHead": [F, E],
}


@st.composite
def ring_case(draw, rid: int):
    """A hostile request for one of the private plans' ring operations, one field wrong."""
    op = draw(st.sampled_from(sorted(RING_WIDTHS)))
    widths = RING_WIDTHS[op]
    args = {"bits": draw(st.sampled_from([8, 16]))}
    if op in ("RingOGateUp", "RingDownQKV"):
        args["layer"] = 0
    shapes = [[1, 2, w] for w in widths]
    dtypes = ["int64"] * len(widths)
    fault = draw(st.sampled_from(["bits", "layer", "dtype", "width", "lead", "rank", "count", "arg"]))
    code = "bad_tensor"
    i = draw(st.integers(0, len(widths) - 1))
    if fault == "bits":
        args["bits"] = draw(
            st.one_of(ints64, st.booleans()).filter(lambda b: b not in (8, 16) or type(b) is bool)
        )
        code = "bad_args"
    elif fault == "layer" and "layer" in args:
        args["layer"] = draw(st.one_of(layers_bad, st.just(L - 1) if op == "RingDownQKV" else layers_bad))
        code = "bad_args"
    elif fault == "arg":
        args[
            draw(st.sampled_from(["layer", "site", "top_k"]) if "layer" not in args else st.just("top_k"))
        ] = 0
        code = "bad_args"
    elif fault == "dtype":
        dtypes[i] = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    elif fault == "width":
        shapes[i][-1] = draw(st.integers(1, 200).filter(lambda w: w != widths[i]))
    elif fault == "lead" and len(widths) == 2:
        shapes[i][draw(st.integers(0, 1))] = draw(st.integers(3, 5))
    elif fault == "rank":
        shapes[i] = draw(st.sampled_from([[2, widths[i]], [1, 1, 2, widths[i]]]))
    elif fault == "count":
        n = draw(st.sampled_from([0, len(widths) + 1]))
        shapes, dtypes = [[1, 2, E]] * n, ["int64"] * n
    else:  # "layer" or "lead" where they do not apply: an empty batch instead
        shapes[0][1] = 0
        if len(widths) == 2:
            shapes[1][1] = 0
    t = [[dt, sh] for dt, sh in zip(dtypes, shapes, strict=True)]
    frames = [bytes(DTYPE_SIZE[dt] * math.prod(sh)) for dt, sh in zip(dtypes, shapes, strict=True)]
    return pack(header(op, args, t, rid), *frames), {code}, rid


DTYPE_SIZE = {"int64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@st.composite
def cases(draw, live_sid: int):
    kind = draw(
        st.sampled_from(
            [
                "msgpack",
                "version",
                "unknown_op",
                "truncated",
                "extra_frames",
                "missing_frames",
                "dtype_name",
                "dtype_for_op",
                "shape",
                "huge_dims",
                "layer",
                "module",
                "oov_ids",
                "nan_qkv",
                "nan_scores",
                "bogus_sid",
                "sid_type",
                "arg_type",
                "missing_arg",
                "unexpected_arg",
                "request_id",
                "tensor_count",
                "rank",
                "descriptor",
                "ping_bytes",
                "open_session",
                "init_version",
                "garbage_frames",
                "ring",
                "writekv_shape",
                "writekv_nonfinite",
                "writekv_positions",
                "writekv_dtypes",
                "writekv_session",
                "writekv_layer",
            ]
        )
    )
    rid = draw(rids)
    lin = {"layer": 0, "module": "q_proj"}
    desc, data = f32((1, 1, E))
    if kind == "msgpack":
        head = draw(st.binary(min_size=0, max_size=64).filter(lambda b: not _is_map(b)))
        return [head], {"bad_message"}, None
    if kind == "version":
        v = draw(st.one_of(ints64.filter(lambda v: v != PROTOCOL_VERSION), st.text(max_size=5), st.none()))
        return pack({**header("Linear", lin, [desc], rid), "v": v}, data), {"bad_version"}, rid
    if kind == "unknown_op":
        op = draw(
            st.one_of(
                st.text(max_size=20).filter(lambda o: o not in OPS),
                ints64,
                st.none(),
                st.lists(ints64, max_size=2),
            )
        )
        return pack(header(op, {}, [], rid)), {"unknown_op"}, rid
    if kind == "truncated":
        cut = draw(st.integers(1, len(data)))
        return pack(header("Linear", lin, [desc], rid), data[:-cut]), {"bad_tensor"}, rid
    if kind == "extra_frames":
        n = draw(st.integers(1, 4))
        return pack(header("Linear", lin, [desc], rid), data, *[b"x" * 8] * n), {"bad_message"}, rid
    if kind == "missing_frames":
        return pack(header("Matmul", {}, [desc, desc], rid), data), {"bad_message"}, rid
    if kind == "dtype_name":
        name = draw(
            st.text(max_size=10).filter(
                lambda s: s not in ("float32", "float16", "bfloat16", "int64", "int8")
            )
        )
        return pack(header("Linear", lin, [[name, [1, 1, E]]], rid), data), {"bad_tensor"}, rid
    if kind == "dtype_for_op":  # int64 activations, float token ids
        if draw(st.booleans()):
            return pack(header("Linear", lin, [["int64", [1, 1, E]]], rid), bytes(8 * E)), {"bad_tensor"}, rid
        return pack(header("Embedding", {}, [["float32", [1, 2]]], rid), bytes(8)), {"bad_tensor"}, rid
    if kind == "shape":
        shape = draw(
            st.lists(st.integers(1, 9), min_size=1, max_size=4).filter(lambda s: s[-1] != E or len(s) != 3)
        )
        d, b = f32(shape)
        return pack(header("Linear", lin, [d], rid), b), {"bad_tensor"}, rid
    if kind == "huge_dims":
        shape = draw(
            st.lists(dims, min_size=1, max_size=5).filter(lambda s: 4 * math.prod(s) > MESSAGE_MB << 20)
        )
        return pack(header("Linear", lin, [["float32", shape]], rid), data), {"too_large"}, rid
    if kind == "layer":
        op = draw(st.sampled_from(["Linear", "QKV", "GateUp"]))
        args = {"layer": draw(layers_bad), **({"module": "q_proj"} if op == "Linear" else {})}
        return pack(header(op, args, [desc], rid), data), {"bad_args"}, rid
    if kind == "module":
        module = draw(
            st.text(max_size=12).filter(
                lambda m: (
                    m not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                )
            )
        )
        return pack(header("Linear", {"layer": 0, "module": module}, [desc], rid), data), {"bad_args"}, rid
    if kind == "oov_ids":
        bad = draw(st.one_of(st.integers(-(2**63), -1), st.integers(V, 2**63 - 1)))
        ids = np.array([[1, bad, 2]], np.int64)
        return pack(header("Embedding", {}, [["int64", [1, 3]]], rid), ids.tobytes()), {"bad_args"}, rid
    if kind in ("nan_qkv", "nan_scores"):
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        pos = np.zeros(1, np.int64).tobytes()
        if kind == "nan_qkv":
            x = np.ones((1, 2, E), np.float32)
            x.flat[draw(st.integers(0, x.size - 1))] = bad
            t = [["float32", [1, 2, E]], ["int64", [1]]]
            return pack(header("QKV", {"layer": 0}, t, rid, live_sid), x.tobytes(), pos), {"bad_tensor"}, rid
        k = np.ones((1, HKV, 1, D), np.float32)
        k.flat[draw(st.integers(0, k.size - 1))] = bad
        t = [["float32", [1, H, 1, D]], ["float32", [1, HKV, 1, D]], ["int64", [1]]]
        q = np.ones((1, H, 1, D), np.float32).tobytes()
        return (
            pack(header("AttnScores", {"layer": 0}, t, rid, live_sid), q, k.tobytes(), pos),
            {"bad_tensor"},
            rid,
        )
    if kind == "bogus_sid":
        sid = draw(bogus_sids.filter(lambda s: s != live_sid))
        op = draw(st.sampled_from(["AttnOut", "CloseSession", "QKV", "AttnScores"]))
        if op == "AttnOut":
            d, b = f32((1, H, 1, 1))
            return pack(header(op, {"layer": 0}, [d], rid, sid), b), {"no_session"}, rid
        if op == "QKV":
            t = [desc, ["int64", [1]]]
            return pack(header(op, {"layer": 0}, t, rid, sid), data, bytes(8)), {"no_session"}, rid
        if op == "AttnScores":
            t = [["float32", [1, H, 1, D]], ["float32", [1, HKV, 1, D]], ["int64", [1]]]
            frames = (bytes(4 * H * D), bytes(4 * HKV * D), bytes(8))
            return pack(header(op, {"layer": 0}, t, rid, sid), *frames), {"no_session"}, rid
        return pack(header(op, {}, [], rid, sid)), {"no_session"}, rid
    if kind == "sid_type":
        sid = draw(
            st.one_of(
                st.integers(-(2**63), -1), st.integers(2**63, 2**64 - 1), st.text(max_size=4), st.floats()
            )
        )
        return pack(header("AttnOut", {"layer": 0}, [desc], rid, sid), data), {"bad_args"}, rid
    if kind == "arg_type":
        value = draw(
            st.one_of(
                st.text(max_size=4), st.floats(), st.booleans(), st.none(), st.lists(ints64, max_size=2)
            )
        )
        return (
            pack(header("Linear", {"layer": value, "module": "q_proj"}, [desc], rid), data),
            {"bad_args"},
            rid,
        )
    if kind == "missing_arg":
        return pack(header("Linear", {"module": "q_proj"}, [desc], rid), data), {"bad_args"}, rid
    if kind == "unexpected_arg":
        name = draw(st.text(min_size=1, max_size=8).filter(lambda n: n not in lin))
        return pack(header("Linear", {**lin, name: 1}, [desc], rid), data), {"bad_args"}, rid
    if kind == "request_id":
        bad_rid = draw(
            st.one_of(
                st.integers(-(2**63), -1),
                st.integers(2**63, 2**64 - 1),
                st.text(max_size=3),
                st.none(),
                st.booleans(),
            )
        )
        return pack(header("Linear", lin, [desc], bad_rid), data), {"bad_message"}, None
    if kind == "tensor_count":
        n = draw(st.sampled_from([0, 3]))
        return pack(header("Matmul", {}, [desc] * n, rid), *[data] * n), {"bad_tensor"}, rid
    if kind == "rank":
        shape = [1] * draw(st.integers(6, 12))
        return pack(header("Linear", lin, [["float32", shape]], rid), bytes(4)), {"bad_tensor"}, rid
    if kind == "descriptor":
        d = draw(
            st.one_of(
                st.text(max_size=4),
                ints64,
                st.lists(ints64, max_size=3),
                st.just(["float32", [1.5]]),
                st.just(["float32", [-1]]),
                st.just([["x"], [1]]),
            )
        )
        codes = {"bad_message", "bad_tensor"}
        return pack(header("Linear", lin, [d], rid), data), codes, rid
    if kind == "ping_bytes":
        n = draw(st.one_of(st.integers(-(2**63), -1), st.integers((MESSAGE_MB << 20) + 1, 2**63 - 1)))
        return pack(header("Ping", {"reply_bytes": n}, [], rid)), {"bad_args"}, rid
    if kind == "open_session":
        batch = draw(st.one_of(st.integers(-(2**63), 0), st.integers(65, 2**63 - 1)))
        return pack(header("OpenSession", {"batch": batch, "max_tokens": 8}, [], rid)), {"bad_args"}, rid
    if kind == "init_version":
        v = draw(ints64.filter(lambda v: v != PROTOCOL_VERSION))
        return pack(header("Init", {"version": v}, [], rid)), {"bad_version"}, rid
    if kind == "ring":
        return draw(ring_case(rid))
    if kind.startswith("writekv"):
        return _write_kv_case(draw, kind, rid, live_sid)
    if kind == "garbage_frames":  # a plausible header, then random frames
        frames = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
        return pack(header("Linear", lin, [desc], rid), *frames), {"bad_tensor", "bad_message"}, rid
    raise AssertionError(kind)


def _write_kv_case(draw, kind: str, rid: int, live_sid: int):
    """WriteKV against the live session (batch 1, 64 tokens): every case is refused before
    anything is written, so the session stays as it was for the next."""
    T = draw(st.integers(1, 4))
    k = v = np.ones((1, HKV, T, D), np.float32)
    pos = np.zeros(1, np.int64)
    args, sid, codes = {"layer": 0}, live_sid, {"bad_tensor"}
    if kind == "writekv_shape":
        shape = draw(
            st.lists(st.integers(1, 5), min_size=1, max_size=5).filter(
                lambda s: len(s) != 4 or s[0] != 1 or s[1] != HKV or s[3] != D
            )
        )
        bad = np.ones(shape, np.float32)
        k, v = (bad, v) if draw(st.booleans()) else (k, bad)
    elif kind == "writekv_nonfinite":
        bad = np.ones((1, HKV, T, D), np.float32)
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        k, v = (bad, v) if draw(st.booleans()) else (k, bad)
    elif kind == "writekv_positions":
        choice = draw(st.sampled_from(["gap", "negative", "past_max", "dtype", "shape"]))
        if choice == "gap":  # at most 2 positions cached (the raw loop's template): 3 leaves a gap
            pos, codes = np.array([draw(st.integers(3, 2**62))], np.int64), {"bad_args"}
        elif choice == "negative":
            pos, codes = np.array([draw(st.integers(-(2**63), -1))], np.int64), {"bad_args"}
        elif choice == "past_max":  # 64 tokens per sequence in the live session
            k = v = np.ones((1, HKV, 65, D), np.float32)
            codes = {"too_large"}
        elif choice == "dtype":
            pos = np.zeros(1, np.float32)
        else:
            pos = np.zeros(draw(st.integers(2, 4)), np.int64)
    elif kind == "writekv_dtypes":
        v = v.astype(np.float16)
        if draw(st.booleans()):
            k, v = v, k
    elif kind == "writekv_session":
        if draw(st.booleans()):
            sid, codes = None, {"no_session"}  # as for every operation that requires one
        else:
            sid, codes = draw(bogus_sids.filter(lambda s: s != live_sid)), {"no_session"}
    else:
        args, codes = {"layer": draw(layers_bad)}, {"bad_args"}
    return request(rid, "WriteKV", args, [k, v, pos], sid), codes, rid


def _is_map(b: bytes) -> bool:
    try:
        return isinstance(msgpack.unpackb(b, raw=False, strict_map_key=False), dict)
    except Exception:
        return False


@pytest.mark.slow
def test_structured_malformed_requests_get_the_right_error(server):
    peer = server["peer"]

    @settings(
        max_examples=STRUCTURED_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(server["sid"]))
    def check(case):
        frames, codes, rid = case
        peer.send(frames)
        server["sent"] += 1
        with pytest.raises(RemoteError) as e:
            parse_reply(peer.recv(), "?")
        assert e.value.code in codes, (e.value, frames[0][:200])
        assert e.value.remote_message

    check()
    assert server["sent"] >= STRUCTURED_EXAMPLES


def _templates(sid: int) -> list[list[bytes]]:
    x = np.ones((1, 2, E), np.float32)
    pos = np.zeros(1, np.int64)
    return [
        [bytes(f) for f in frames]
        for frames in (
            request(1, "Linear", {"layer": 1, "module": "down_proj"}, [np.ones((1, 2, F), np.float32)]),
            request(2, "Embedding", {"dtype": "float16"}, [np.array([[3, 4]])]),
            request(3, "QKV", {"layer": 0}, [x, np.zeros(1, np.int64)], sid + 1),
            request(4, "AttnOut", {"layer": 1}, [np.ones((1, H, 2, 2), np.float32)], 99),
            request(5, "Matmul", {}, [np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)]),
            request(6, "LMHead", {"top_k": 3}, [x]),
            request(7, "Ping", {}, [np.zeros(4, np.float32)]),
            request(8, "CloseSession", {}, [], 5),
            request(9, "GateUp", {"layer": 1}, [x.astype(np.float16)]),
            request(
                10,
                "RingOGateUp",
                {"layer": 1, "bits": 16},
                [np.ones((1, 2, H * D), np.int64), x.astype(np.int64)],
            ),
            request(11, "RingDownLMHead", {"bits": 8}, [np.ones((1, 2, F), np.int64), x.astype(np.int64)]),
            request(12, "RingEmbedQKV", {"bits": 16}, [x.astype(np.int64)]),
            request(13, "WriteKV", {"layer": 0}, [np.ones((1, HKV, 2, D), np.float32)] * 2 + [pos], sid),
        )
    ]


def _mutate(rng: np.random.Generator, frames: list[bytes]) -> tuple[list[bytes], bool]:
    """One random mutation; returns the frames and whether to send the delimiter."""
    frames = list(frames)
    kind = rng.integers(10)
    if kind == 0:  # flip bytes in the header
        h = bytearray(frames[0])
        for i in rng.integers(0, len(h), size=rng.integers(1, 6)):
            h[i] = rng.integers(256)
        frames[0] = bytes(h)
    elif kind == 1:  # truncate the header
        frames[0] = frames[0][: rng.integers(0, len(frames[0]))]
    elif kind == 2:  # garbage header
        frames[0] = rng.bytes(int(rng.integers(0, 200)))
    elif kind == 3 and len(frames) > 1:  # truncate or extend a tensor frame
        i = int(rng.integers(1, len(frames)))
        frames[i] = (
            frames[i][: rng.integers(0, len(frames[i]))] if rng.random() < 0.5 else frames[i] + rng.bytes(5)
        )
    elif kind == 4:  # extra frames
        frames += [rng.bytes(int(rng.integers(0, 64))) for _ in range(rng.integers(1, 4))]
    elif kind == 5 and len(frames) > 1:  # drop a frame
        del frames[int(rng.integers(1, len(frames)))]
    elif kind == 6:  # only the header, or only garbage frames
        frames = (
            [frames[0]] if rng.random() < 0.5 else [rng.bytes(int(rng.integers(1, 40))) for _ in range(3)]
        )
    elif kind == 7:  # NaN / Inf / huge values in every float frame
        frames = [frames[0]] + [
            np.full(len(f) // 4, rng.choice([np.nan, np.inf, 3e38]), np.float32).tobytes() for f in frames[1:]
        ]
    elif kind == 8:  # a re-encoded header with one field replaced by a random value
        h = msgpack.unpackb(frames[0], raw=False)
        key = rng.choice(["v", "id", "op", "sid", "args", "t"])
        h[str(key)] = [None, -1, 2**64 - 1, "x" * 50, [], {}, 1.5, [["float32", [2**62, 8]]]][rng.integers(8)]
        frames[0] = msgpack.packb(h)
    return frames, bool(kind != 9 or rng.random() < 0.5)  # kind 9: sometimes no delimiter at all


def test_raw_mutation_loop_every_message_answered(server):
    peer, rng = server["peer"], np.random.default_rng(1234)
    templates = _templates(server["sid"])
    batch, sent, errors = 500, 0, 0
    while sent < RAW_MESSAGES:
        for _ in range(batch):
            frames, delimiter = _mutate(rng, templates[rng.integers(len(templates))])
            if not delimiter and (not frames or frames[0] == b""):
                delimiter = True
            peer.send(frames, delimiter)
        for _ in range(batch):
            reply = peer.recv()
            head = msgpack.unpackb(reply[0], raw=False)
            assert head["v"] == PROTOCOL_VERSION and isinstance(head["ok"], bool)
            if not head["ok"]:
                errors += 1
                assert head["code"] in ERROR_CODES and head["msg"]
                assert head["code"] != "internal", head["msg"]  # hostile input is never a server fault
        sent += batch
    server["sent"] += sent
    assert errors > 0.7 * sent  # most mutations are malformed; a few stay valid


@pytest.mark.slow
def test_oversized_frame_drops_only_that_connection(server):
    """A frame over --max-message-mb: ZeroMQ drops that peer before reading it (nothing is
    allocated for it), the other peers are served on; a request within the limit whose result
    would exceed it gets "too_large" before the product is computed."""
    for nbytes in (3 << 20, 3 << 19):  # 3 MiB and 1.5 MiB: both over the 1 MiB limit
        big = Peer(server["address"], rcvhwm=0, sndhwm=0)
        try:
            x = np.ones((1, nbytes // 4, 1), np.float32)
            big.send(request(1, "Linear", {"layer": 0, "module": "q_proj"}, [x]))
            assert not big.sock.poll(1000), "an over-size frame must not be answered"
        finally:
            big.close()
    a, b = np.ones((1024, 1), np.float32), np.ones((1, 1024), np.float32)  # 4 MiB of result
    with pytest.raises(RemoteError) as e:
        server["peer"].exchange(request(2, "Matmul", {}, [a, b]))
    assert e.value.code == "too_large" and "--max-message-mb" in str(e.value)
    server["sent"] += 3


@pytest.mark.slow  # it counts and checks what the fuzz tests (slow) sent before it
def test_server_still_correct_and_memory_bounded_after_fuzzing(server, ckpt):
    assert server["sent"] >= 10_000, f"only {server['sent']} malformed messages were sent"
    assert server["proc"].poll() is None, "the server died"
    # The correct answer, computed in-process on the same weights.
    from teesplit.launch import build_service

    local, _ = build_service(ckpt, "cpu", "float32", progress=False)
    x = np.random.default_rng(0).standard_normal((2, 3, F)).astype(np.float32)
    req = request(99, "Linear", {"layer": 1, "module": "down_proj"}, [x])
    _, (want,) = parse_reply(local.handle(req), "Linear")
    _, (got,) = server["peer"].exchange(req, "Linear")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A whole greedy generation through the fuzzed server, with a session (plan v3-fused).
    from teesplit.tee.client import GPUClient
    from teesplit.tee.generate import Generator, SamplingParams
    from teesplit.tee.model import TEELlamaModel
    from teesplit.tee.plans import get_plan
    from teesplit.transport.zmq import ZmqTransport

    params = SamplingParams(max_new_tokens=12)
    expected = Generator(local_model(ckpt, "v3-fused"), eos_token_ids=set()).generate([5, 6, 7], params)
    client = GPUClient(ZmqTransport(server["address"], timeout_s=20))
    try:
        # The fuzzed server still holds the session the structured cases wrote NaN at (refused).
        model = TEELlamaModel(client, get_plan("v3-fused"))
        got_tokens = Generator(model, eos_token_ids=set()).generate([5, 6, 7], params).tokens
    finally:
        client.close()
    assert got_tokens == expected.tokens
    growth = rss(server["proc"].pid) - server["rss0"]
    print(f"fuzz: {server['sent']} messages, server RSS growth {growth / (1 << 20):.1f} MiB")
    assert growth < MAX_RSS_GROWTH, f"server RSS grew by {growth / (1 << 20):.1f} MiB"
    # Every log line is one JSON object; error lines are rate-limited, with a count of the rest.
    lines = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
    events = {line.get("event") for line in lines}
    assert {"server_start", "session_open", "error"} <= events
    assert any(line.get("suppressed") for line in lines if line.get("event") == "error")
