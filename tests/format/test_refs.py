"""`owner/name[@version]` parsing: the one rule for CLI, fetch, serving and the registry's paths."""

from __future__ import annotations

import pytest

from soppu_client.format.errors import InputError
from soppu_client.format.refs import MAX_VERSION, AdapterRef


def test_parses_latest_and_pinned() -> None:
    assert AdapterRef.parse("alice/support") == AdapterRef("alice", "support", None)
    assert AdapterRef.parse("alice/support@3") == AdapterRef("alice", "support", 3)
    assert AdapterRef.parse("alice/support", revision="7").version == 7
    assert str(AdapterRef.parse(f"alice/support@{MAX_VERSION}")) == f"alice/support@{MAX_VERSION}"


@pytest.mark.parametrize("version", ["²", "0", "-1", "1.5", str(MAX_VERSION + 1), "99999999999999999999999", ""])
def test_bad_versions_are_input_errors(version: str) -> None:
    with pytest.raises(InputError) as e:
        AdapterRef.parse(f"alice/support@{version}")
    assert str(e.value) == (f"soppu adapter id 'alice/support@{version}': version after '@' must be an integer "
                            f"from 1 to {MAX_VERSION}, got {version!r}")


def test_bad_names_are_input_errors() -> None:
    with pytest.raises(InputError, match=r"must look like `owner/name` or `owner/name@version`"):
        AdapterRef.parse("alice")
    with pytest.raises(InputError, match=r"must look like"):
        AdapterRef.parse("al ice/x")
