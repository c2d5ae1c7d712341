"""The one decode loop (tee/decode.py) driven directly: rows of one batch end by their own
rules, a cancelled row ends at the next step, rows join and leave a trusted-side cache, and a
lost GPU session is replayed. Generate (tests/tee/test_generate.py) and the API's scheduler
(tests/tee/test_serving.py) are checked against solo runs of this same loop."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_checkpoint

from teesplit.launch import build_service
from teesplit.tee.assemble import Assembly, RunnerSettings
from teesplit.tee.decode import Batch, Row, SamplingParams

PROMPTS = [[3, 17, 42, 99, 5], [61, 7], [8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("decode"), "llama")


@pytest.fixture(scope="module")
def handler(ckpt):
    return build_service(ckpt, "cpu", "float32", progress=False)[0]


def _model(ckpt, handler, plan):
    rs = RunnerSettings(ckpt, servers=("local",), plan=plan, log=lambda _m: None)
    return Assembly(rs, local=lambda _i: handler.handle).connect()[0]


def _rows(budgets, cls=Row):
    return [
        cls(p, SamplingParams(max_new_tokens=n), None, set()) for p, n in zip(PROMPTS, budgets, strict=True)
    ]


def _solo(model, prompt, n):
    row = Row(prompt, SamplingParams(max_new_tokens=n), None, set())
    batch = Batch(model, [row])
    batch.prefill()
    while batch.live:
        batch.step()
    batch.close()
    return row.tokens


class _Cancellable(Row):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gone = False

    @property
    def cancelled(self) -> bool:
        return self.gone


@pytest.mark.parametrize("plan", ["v2-fused", "v3-fused", "v2-merged"])
def test_rows_end_by_their_own_budgets_and_match_solo_runs(ckpt, handler, plan):
    model = _model(ckpt, handler, plan)
    budgets = [4, 0, 7]
    rows = [
        Row(p, SamplingParams(max_new_tokens=n), None, set()) for p, n in zip(PROMPTS, budgets, strict=True)
    ]
    batch = Batch(model, rows)
    batch.prefill()
    steps = 0
    while batch.live:
        batch.step()
        steps += 1
    batch.close()
    assert steps == max(budgets) - 1, "a finished row never costs a forward pass of its own"
    assert [len(r.tokens) for r in rows] == budgets and {r.finish_reason for r in rows} == {"length"}
    for p, n, r in zip(PROMPTS, budgets, rows, strict=True):
        assert r.tokens == _solo(model, p, n)


def test_eos_ends_a_row_without_adding_the_token(ckpt, handler):
    model = _model(ckpt, handler, "v2-fused")
    first = _solo(model, PROMPTS[0], 3)
    row = Row(PROMPTS[0], SamplingParams(max_new_tokens=3), None, eos={first[1]})
    batch = Batch(model, [row])
    batch.prefill()
    while batch.live:
        batch.step()
    assert row.tokens == first[:1] and row.finish_reason == "stop"


def test_a_cancelled_row_ends_at_the_next_step_and_leaves_a_trusted_cache(ckpt, handler):
    model = _model(ckpt, handler, "v2-fused")
    rows = _rows((6, 6, 6), _Cancellable)
    batch = Batch(model, rows)
    batch.prefill()
    rows[1].gone = True
    batch.step()
    assert rows[1].finish_reason == "cancelled" and len(rows[1].tokens) == 1
    batch.prune()
    assert batch.rows == [rows[0], rows[2]] and batch.cache.lengths.shape == (2,)
    while batch.live:
        batch.step()
    assert rows[0].tokens == _solo(model, PROMPTS[0], 6) and rows[2].tokens == _solo(model, PROMPTS[2], 6)


def test_rows_joining_a_running_batch_get_their_solo_tokens(ckpt, handler):
    model = _model(ckpt, handler, "v2-merged")
    rows = [
        Row(p, SamplingParams(max_new_tokens=n), None, set()) for p, n in zip(PROMPTS, (6, 3, 4), strict=True)
    ]
    first = Batch(model, rows[:1])
    first.prefill()
    first.step()
    late = Batch(model, rows[1:])
    late.prefill()
    first.join(late)
    while first.live:
        first.step()
        first.prune()
    for r, p, n in zip(rows, PROMPTS, (6, 3, 4), strict=True):
        assert r.tokens == _solo(model, p, n)
    with pytest.raises(ValueError, match="trusted-side KV cache"):
        Batch(_model(ckpt, handler, "v3-fused"), [Row(PROMPTS[0], SamplingParams(), None, set())]).join(late)


def test_a_lost_session_is_replayed_to_the_same_tokens(ckpt, handler):
    model = _model(ckpt, handler, "v3-fused")
    want = _solo(model, PROMPTS[2], 6)
    row = Row(PROMPTS[2], SamplingParams(max_new_tokens=6), None, set())
    batch = Batch(model, [row])
    batch.prefill()
    batch.step()
    handler.service.sessions.clear()  # the server forgot every session (a restart, an expiry)
    while batch.live:
        batch.step()
    assert batch.recoveries == 1 and row.tokens == want
    assert np.array_equal(batch.cache.lengths, [len(PROMPTS[2]) + 5])
