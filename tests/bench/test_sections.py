"""The extension point of `teesplit bench`: sections found in teesplit.bench.sections, measured
alone (--only-sections) with their own JSON, Markdown and targets."""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

import teesplit.bench.sections as sections
from teesplit.bench import run as bench
from teesplit.bench.sections import Section, SectionContext


def _measure(ctx: SectionContext) -> dict:
    base = ctx.baseline()  # measured on demand when the run has none
    return {"ms": base["decode"]["ms_per_token"], "quick": ctx.settings.quick}


FAKE = Section(
    title="A fake section",
    measure=_measure,
    render=lambda d: [f"monolithic decode {d['ms']:.1f} ms/token"],
    targets=lambda d: [bench.target("fake", "a positive figure", d["ms"], 0.0, " ms")],
)
BROKEN = Section(title="Broken", measure=lambda ctx: 1 / 0, render=lambda d: [])


@pytest.fixture
def fake_sections(monkeypatch):
    monkeypatch.setattr(sections, "discover", lambda: {"fake": FAKE, "broken": BROKEN})


def test_discover_finds_only_sections():
    found = sections.discover()
    assert all(isinstance(s, Section) for s in found.values())


def test_only_sections_writes_json_md_and_targets(tmp_path, fake_sections):
    ckpt = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=2, max_position_embeddings=128)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--quick", "--new-tokens", "3", "--contexts", "8,12", "--out-dir", str(out)]
    assert bench.main([*argv, "--only-sections", "fake"]) == 0
    data = json.loads((out / "fake.json").read_text())
    assert data["sections"]["fake"]["ms"] > 0 and data["sections"]["fake"]["quick"] is True
    assert data["targets"][0]["name"] == "fake" and data["targets"][0]["passed"] is True
    md = (out / "fake.md").read_text()
    assert md.startswith("# A fake section") and "monolithic decode" in md and "## Targets" in md
    # a failing section is reported in its file and makes the exit status non-zero
    assert bench.main([*argv, "--only-sections", "broken"]) == 1
    assert "ZeroDivisionError" in json.loads((out / "broken.json").read_text())["sections"]["broken"]["error"]


def test_unknown_section_is_refused(fake_sections, capsys):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only-sections", "nope"])
    assert "choose from fake, broken" in capsys.readouterr().err


def test_sections_render_in_the_full_report(fake_sections):
    result = {"sections": {"fake": {"ms": 12.5}, "gone": {"x": 1}}}
    lines = bench.md_sections(result)
    assert "## A fake section" in lines and "monolithic decode 12.5 ms/token" in lines
    assert bench.section_targets(result)[0]["measured"] == 12.5
