"""One spelling per value in the trusted core (issue 19, findings 3 and 5): signatures and keys
decode only from canonical base64, and name rules refuse a trailing newline.

Before: a lenient base64 decoder ignored the unused low bits of the last character, so flipping
bit 1, 2 or 3 of the character before ``==`` gave another signature.json that verified; and every
name rule ended with ``$``, which also matches before a final ``\\n``.
"""

from __future__ import annotations

import base64
import json
import string
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from soppu_client.format import signing
from soppu_client.format.errors import InputError, SignatureError
from soppu_client.format.names import ADAPTER_NAME_RE, DIGEST_RE, HEX64_RE, OWNER_RE
from soppu_client.format.refs import AdapterRef
from tests.conftest_bundles import make_bundle

EXPIRES = "2099-01-01T00:00:00Z"
B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


def same_bytes_other_spelling(text: str) -> list[str]:
    """Every other spelling of ``text`` that a lenient decoder maps to the same bytes: the last
    character before the padding with some of its unused low bits flipped."""
    pad = len(text) - len(text.rstrip("="))
    unused = {1: 2, 2: 4}[pad]  # bits of the last character that carry nothing
    i = len(text) - pad - 1
    value = B64.index(text[i])
    out = []
    for flip in range(1, 1 << unused):
        other = text[:i] + B64[value ^ flip] + text[i + 1:]
        assert base64.b64decode(other) == base64.b64decode(text)  # the malleability is real
        out.append(other)
    return out


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp_path / "b")
    signing.sign_bundle(bundle, key, "alice", 1, EXPIRES)
    return bundle, key


def _doc(bundle: Path) -> dict:
    return json.loads((bundle / "signature.json").read_text())


def test_signature_with_flipped_unused_bits_is_refused(signed: tuple) -> None:
    """Issue 19 finding 3 as found: bits 1, 2, 3 of the last character before '==' (and every
    combination of the four unused bits) give another string of the same 64 bytes: refused."""
    bundle, key = signed
    doc = _doc(bundle)
    signing.verify_statement(doc, key.public_key())  # non-vacuous: the original verifies
    assert doc["signature"].endswith("==")
    others = same_bytes_other_spelling(doc["signature"])
    assert len(others) == 15
    for other in others:
        with pytest.raises(SignatureError) as e:
            signing.verify_statement({**doc, "signature": other}, key.public_key())
        assert e.value.code == "malformed"
        assert str(e.value) == ("signature document is malformed: `signature` is not canonical base64 of 64 bytes "
                                "(padded, no whitespace, unused bits zero); sign the bundle again with `soppu sign`")


@pytest.mark.parametrize("spoil", [
    lambda s: s.rstrip("="),             # padding missing
    lambda s: s[:40] + "\n" + s[40:],    # whitespace inside
    lambda s: s + "\n",                  # trailing newline
    lambda s: " " + s,                   # leading space
    lambda s: s.replace("+", "-").replace("/", "_") if ("+" in s or "/" in s) else s[:-3] + "-==",  # urlsafe alphabet
    lambda s: s + "==",                  # extra padding
])
def test_signature_in_any_other_spelling_is_refused(signed: tuple, spoil) -> None:  # noqa: ANN001
    bundle, key = signed
    doc = _doc(bundle)
    bad = spoil(doc["signature"])
    assert bad != doc["signature"]
    with pytest.raises(SignatureError) as e:
        signing.verify_statement({**doc, "signature": bad}, key.public_key())
    assert e.value.code == "malformed"


def test_public_key_with_flipped_unused_bits_is_refused(signed: tuple) -> None:
    """The embedded public key (32 bytes: one '=', two unused bits) has the same rule."""
    bundle, key = signed
    doc = _doc(bundle)
    others = same_bytes_other_spelling(doc["public_key"])
    assert len(others) == 3
    for other in others:
        with pytest.raises(SignatureError) as e:
            signing.verify_statement({**doc, "public_key": other}, key.public_key())
        assert e.value.code == "malformed"
        assert "`public_key` is not canonical base64 of 32 bytes" in str(e.value)
        # And wherever a key is loaded from base64 text (registry key rows, --public-key options).
        with pytest.raises(InputError, match="neither an existing file nor a base64 Ed25519 key"):
            signing.load_public_key(other)
        with pytest.raises(InputError, match="is not an Ed25519 public key"):
            signing.load_public_key(other.encode())
    assert signing.public_key_id(doc["public_key"]) == doc["key_id"]  # the canonical one loads


def test_b64decode_canonical() -> None:
    raw = bytes(range(64))
    text = base64.b64encode(raw).decode()
    assert signing.b64decode_canonical(text) == raw
    assert signing.b64decode_canonical(text, 64) == raw
    assert signing.b64decode_canonical(text, 32) is None
    for bad in [*same_bytes_other_spelling(text), text.rstrip("="), text + "\n", None, 7, "é" + text]:
        assert signing.b64decode_canonical(bad) is None, bad


# --------------------------------------------------------------------------- names (finding 5)


@pytest.mark.parametrize("rule,good", [(ADAPTER_NAME_RE, "evil"), (OWNER_RE, "evil"),
                                       (HEX64_RE, "a" * 64), (DIGEST_RE, "sha256:" + "a" * 64)])
def test_no_name_rule_accepts_a_trailing_newline(rule, good: str) -> None:  # noqa: ANN001
    assert rule.match(good) and rule.fullmatch(good)  # non-vacuous
    for bad in (good + "\n", good + "\r\n", good + "\n\n", "\n" + good):
        assert rule.match(bad) is None and rule.fullmatch(bad) is None, repr(bad)


def test_adapter_refs_and_statements_refuse_a_trailing_newline(tmp_path: Path) -> None:
    assert AdapterRef.parse("alice/evil") == AdapterRef("alice", "evil", None)  # non-vacuous
    for text in ("alice\n/evil", "alice/ev\nil", "alice/evil\n@1"):  # (outer whitespace is stripped)
        with pytest.raises(InputError, match="must look like `owner/name`"):
            AdapterRef.parse(text)
    # A statement signed for a name with a newline (the signer's bytes, not a tamper) is malformed.
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp_path / "b", ("a",))
    st = signing.build_statement(bundle, "alice", 1, EXPIRES)
    for field, value in (("adapters", ["a\n"]), ("owner", "alice\n"), ("expires_at", EXPIRES + "\n")):
        doc = signing.sign_statement({**st, field: value}, key)
        with pytest.raises(SignatureError) as e:
            signing.verify_statement(doc, key.public_key())
        assert e.value.code == "bad_statement", (field, str(e.value))
    doc = signing.sign_statement(st, key)
    assert signing.verify_statement(doc, key.public_key()) == st  # non-vacuous


def test_no_single_bit_flip_of_a_signature_document_verifies(signed: tuple) -> None:
    """Exhaustive form of the registry's fuzz test (which draws 40 of these at random and once
    drew bit 1 of byte 211 -> 200): every bit of the canonical signature document flipped, one at
    a time; none still parses to a document that verifies. So that fuzz test cannot flake."""
    bundle, key = signed
    raw = signing.canonical_json(_doc(bundle))
    signing.verify_statement(json.loads(raw), key.public_key())  # non-vacuous
    survivors = []
    for i in range(len(raw)):
        for bit in range(8):
            mutated = bytearray(raw)
            mutated[i] ^= 1 << bit
            try:
                doc = json.loads(bytes(mutated))
                signing.verify_statement(doc, key.public_key())
            except (ValueError, SignatureError, InputError):
                continue
            survivors.append((i, bit, chr(raw[i])))
    assert survivors == []
