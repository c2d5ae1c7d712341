"""The trust boundary is a folder boundary: nothing under tee/ imports torch or teesplit.gpu,
statically (every import statement) and dynamically (a runner process driving a real server)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import teesplit

PKG = Path(teesplit.__file__).parent
FORBIDDEN = ("torch", "teesplit.gpu", "transformers", "safetensors.torch")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside tee/: resolve against the package
                base = ".".join(["teesplit", "tee"][: max(0, 3 - node.level)])
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module or "")
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_tee_sources_import_nothing_untrusted():
    files = sorted((PKG / "tee").rglob("*.py"))
    assert len(files) >= 6
    assert {"api.py", "serving.py", "chat.py"} <= {f.name for f in files}, "the API and chat are trusted code"
    bad = {f"{f.name}: {m}" for f in files for m in imported_modules(f) if _forbidden(m)}
    assert not bad, f"tee/ imports untrusted modules: {sorted(bad)}"


def test_the_checker_would_catch_a_violation(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import numpy\nfrom torch import nn\nfrom teesplit.gpu.service import X\n")
    assert {m for m in imported_modules(p) if _forbidden(m)} == {"torch", "teesplit.gpu.service"}


def test_importing_the_trusted_side_loads_no_torch():
    code = (
        "import sys, pkgutil, importlib, teesplit.tee as t\n"
        "for m in pkgutil.iter_modules(t.__path__): importlib.import_module('teesplit.tee.' + m.name)\n"
        "import teesplit.transport.zmq, teesplit.transport.local, teesplit.transport.shm, teesplit.models\n"
        "import teesplit.cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'teesplit.gpu'))]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_remote_runner_process_never_loads_torch(smollm2_dir):
    """`teesplit generate` against a real server: the runner process ends with no torch loaded."""
    from teesplit.launch import free_tcp_address, start_server, stop_server

    address = free_tcp_address()
    proc = start_server(smollm2_dir, address, ["--device", "cpu", "--threads", "1"])
    try:
        code = (
            "import sys\nfrom teesplit.cli import main\n"
            f"rc = main(['generate', '--server', {address!r}, '--model', {str(smollm2_dir)!r}, "
            "'--prompt', 'Hi', '--max-new-tokens', '3'])\n"
            "assert rc == 0, rc\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'teesplit.gpu'))]\n"
            "assert not bad, bad\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_api_process_never_loads_torch(smollm2_dir):
    """`teesplit api` against a real server answers a chat completion with no torch loaded."""
    from teesplit.launch import free_tcp_address, free_tcp_port, start_server, stop_server

    address = free_tcp_address()
    port = free_tcp_port()
    proc = start_server(smollm2_dir, address, ["--device", "cpu", "--threads", "1"])
    try:
        code = (
            "import json, sys, threading, time, urllib.request\n"
            "from teesplit.cli import main\n"
            f"argv = ['api', '--server', {address!r}, '--model', {str(smollm2_dir)!r}, '--port', '{port}', "
            "'--served-model-name', 'm']\n"
            "threading.Thread(target=main, args=(argv,), daemon=True).start()\n"
            f"url = 'http://127.0.0.1:{port}/v1/'\n"
            "for _ in range(600):\n"
            "    try:\n"
            "        urllib.request.urlopen(url + 'models'); break\n"
            "    except OSError:\n"
            "        time.sleep(0.2)\n"
            "body = {'model': 'm', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 3}\n"
            "req = urllib.request.Request(url + 'chat/completions', json.dumps(body).encode())\n"
            "reply = json.load(urllib.request.urlopen(req))\n"
            "assert reply['usage']['completion_tokens'] >= 1, reply\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'teesplit.gpu'))]\n"
            "assert not bad, bad\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    finally:
        stop_server(proc)
