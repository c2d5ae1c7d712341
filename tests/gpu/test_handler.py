"""The GPU server's dispatch table: every operation declared once in protocol.OPS has one
handler method, and a new operation is served from its entry and its method alone."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_checkpoint

from teesplit import protocol
from teesplit.gpu import handler as handler_module
from teesplit.gpu.handler import OPERATIONS, Reply, RequestHandler, operation
from teesplit.launch import build_service
from teesplit.protocol import OPS, OpSpec, RemoteError, parse_reply, request


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("handler"), "llama")
    h, _ = build_service(path, "cpu", "float32", progress=False)
    return h


def test_every_declared_operation_has_one_handler():
    assert set(OPERATIONS) == set(OPS)
    assert protocol.F32_OPS == tuple(op for op, spec in OPS.items() if spec.f32)
    assert all(OPS[op].args["f32"] == (bool, False) for op in protocol.F32_OPS)


def test_a_handler_for_an_undeclared_operation_is_refused():
    with pytest.raises(ValueError, match="not declared"):
        operation("Nope")
    with pytest.raises(ValueError, match="two handlers"):
        operation("Ping")(lambda self, c: None)


def test_a_new_operation_is_one_entry_and_one_method(handler, monkeypatch):
    """Declared in OPS and registered with @operation: validated by its spec, dispatched through
    the table, its activations returned in the request's wire dtype, resends cached."""
    monkeypatch.setitem(OPS, "Double", OpSpec({"times": (int, True)}, (1, 1), session="optional"))
    calls = []

    def double(self: RequestHandler, c) -> np.ndarray:
        calls.append(c)
        return np.asarray(c.tensors[0], np.float32) * 2 * c.args["times"]

    monkeypatch.setitem(OPERATIONS, "Double", double)
    x = np.ones((1, 2, 3), np.float16)
    header, (y,) = parse_reply(handler.handle(request(7, "Double", {"times": 3}, [x]), b"peer"), "Double")
    assert y.dtype == np.float16 and (y == 6).all() and header["gpu_s"] > 0
    assert calls[-1].session is None and calls[-1].peer == b"peer"
    handler.handle(request(7, "Double", {"times": 3}, [x]), b"peer")  # a resend: from the reply cache
    assert len(calls) == 1
    for args, tensors, code in [({}, [x], "bad_args"), ({"times": 1}, [], "bad_tensor")]:
        with pytest.raises(RemoteError) as e:
            parse_reply(handler.handle(request(8, "Double", args, tensors)), "Double")
        assert e.value.code == code
    with pytest.raises(RemoteError) as e:  # optional session: an unknown one is refused
        parse_reply(handler.handle(request(9, "Double", {"times": 1}, [x], sid=5)), "Double")
    assert e.value.code == "no_session"


def test_a_result_map_comes_back_in_res_and_control_operations_report_no_gpu_time(handler, monkeypatch):
    monkeypatch.setitem(OPS, "Hello", OpSpec(reply="as_is", compute=False, cacheable=False))
    monkeypatch.setitem(OPERATIONS, "Hello", lambda self, c: Reply({"hello": len(self.service.sessions)}))
    header, tensors = parse_reply(handler.handle(request(1, "Hello")), "Hello")
    assert header["res"] == {"hello": 0} and tensors == [] and header["gpu_s"] == 0.0


def test_dispatch_serves_the_shm_loops_warm_up_path(handler):
    """shm_server's warm-up calls dispatch directly with a decoded, validated request."""
    header, tensors = protocol.decode(request(0, "Matmul", {}, (np.ones((1, 1), np.float32),) * 2))
    _, op, args = protocol.validate_request(header, tensors)
    res, out, gpu_s = handler.dispatch(op, args, header, tensors)
    assert res == {} and out[0].shape == (1, 1) and gpu_s >= 0
    assert handler_module.OPERATIONS["Matmul"] is RequestHandler.matmul
