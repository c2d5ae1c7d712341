"""API keys for `teesplit api` (TRUSTED side).

With any key configured, every endpoint except /health (and /metrics with `--metrics-open`)
needs `Authorization: Bearer KEY`. Keys are kept as SHA-256 digests and compared in constant
time: a presented key is hashed and compared with every configured digest, without stopping at
the first match, so neither timing nor the length of a key tells which one, or how much of it,
matched. Neither the keys nor the presented tokens are logged or echoed in errors.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from teesplit.errors import UsageError

MIN_KEY_CHARS = 16
KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class APIKeyError(UsageError):
    """A key that cannot be used (too short, or characters a header cannot carry)."""


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS:
        raise APIKeyError(
            f"an API key from {where} has {len(key)} characters; use at least {MIN_KEY_CHARS} ({KEY_HINT})"
        )
    if not all(33 <= ord(c) <= 126 for c in key):
        raise APIKeyError(f"an API key from {where} holds spaces or non-ASCII characters; {KEY_HINT}")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise APIKeyError(f"cannot read --api-key-file {path}: {e.strerror}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise APIKeyError(f"--api-key-file {path} holds no key (one per line)")
    return [_check_key(k, f"--api-key-file {path}") for k in keys]


class APIKeys:
    """The configured keys (as digests). Falsy when none is configured: then no endpoint needs one."""

    def __init__(self, keys: Iterable[str] = (), source: str = "--api-key"):
        self._digests = [hashlib.sha256(_check_key(k, source).encode()).digest() for k in keys]

    @classmethod
    def from_sources(
        cls, keys: Iterable[str] = (), files: Iterable[str | Path] = (), env_value: str | None = None
    ) -> APIKeys:
        """--api-key values, --api-key-file files and the TEESPLIT_API_KEY value (read by the CLI)."""
        out = cls(keys)
        for f in files:
            out._digests += cls(read_key_file(f), f"--api-key-file {f}")._digests
        if env_value:
            out._digests += cls([env_value.strip()], "TEESPLIT_API_KEY")._digests
        return out

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> str | None:
        """None when the `Authorization` header carries a configured key; else why not
        ('missing' or 'invalid')."""
        if not authorization:
            return "missing"
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "missing"
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self._digests:  # every digest, whatever matched before
            ok |= hmac.compare_digest(presented, d)
        return None if ok else "invalid"
