"""API keys (tee/apikeys.py): sources, checks, and what is refused."""

from __future__ import annotations

import pytest

from teesplit.tee.apikeys import APIKeyError, APIKeys, read_key_file

K1 = "k1-0123456789abcdef"
K2 = "k2-fedcba9876543210"


def test_no_keys_means_none_configured():
    keys = APIKeys.from_sources()
    assert not keys and len(keys) == 0


def test_each_configured_key_is_accepted_and_nothing_else(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# the team's keys\n\n  {K2}  \n")
    keys = APIKeys.from_sources([K1], [f], env_value="env-key-0123456789")
    assert len(keys) == 3
    for k in (K1, K2, "env-key-0123456789"):
        assert keys.check(f"Bearer {k}") is None
        assert keys.check(f"bearer  {k} ") is None
    assert keys.check(None) == "missing" and keys.check("") == "missing"
    assert keys.check("Bearer ") == "missing" and keys.check(f"Basic {K1}") == "missing"
    assert keys.check(f"Bearer {K1}x") == "invalid"
    assert keys.check(f"Bearer {K1[:-1]}") == "invalid"
    assert keys.check("Bearer \udcff" + K1) == "invalid"  # undecodable bytes do not crash


def test_keys_are_not_kept_in_the_clear():
    keys = APIKeys([K1])
    assert K1 not in repr(vars(keys)) and K1.encode() not in b"".join(keys._digests)


@pytest.mark.parametrize("bad", ["short", "has a space inside it", "ünïcode-0123456789"])
def test_unusable_keys_are_refused(bad):
    with pytest.raises(APIKeyError):
        APIKeys([bad])


def test_key_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(APIKeyError, match="holds no key"):
        read_key_file(empty)
    with pytest.raises(APIKeyError, match="cannot read"):
        read_key_file(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(APIKeyError, match="at least 16"):
        read_key_file(short)
