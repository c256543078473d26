"""Signing: keys, canonical statements, tamper detection, golden statement bytes, CLI, fuzz.

Real files, real Ed25519 (cryptography), real safetensors bundles written by hand
(tests/conftest_bundles.py); no mocks.  Update the golden file with SOPPU_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest_bundles import make_bundle
from soppu_client.format import signing
from soppu_client.cli.signing import COMMANDS, keygen, sign, verify_signature
from soppu_client.format.errors import BundleError, InputError, SignatureError

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_statement.json"
EXPIRES = "2099-01-01T00:00:00Z"
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    priv, pub = signing.generate_keypair(tmp_path / "key")
    return signing.load_private_key(priv), pub


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[Ed25519PrivateKey, Path]) -> Path:
    bundle = make_bundle(tmp_path / "bundle")
    signing.sign_bundle(bundle, keys[0], "alice", 3, EXPIRES)
    return bundle


def verify_error(bundle: Path, pub: object, **kw: object) -> str:
    with pytest.raises(SignatureError) as exc:
        signing.verify_bundle(bundle, pub, now=NOW, **kw)
    return str(exc.value)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- keys


def test_keygen_modes_and_reload(tmp_path: Path) -> None:
    priv, pub = signing.generate_keypair(tmp_path / "k")
    assert pub == tmp_path / "k.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    key = signing.load_private_key(priv)
    kid = signing.public_key_id(pub)
    assert kid == signing.public_key_id(key) and kid.startswith("ed25519:") and len(kid) == 8 + 32
    raw = signing.load_public_key(pub).public_bytes_raw()
    assert kid == "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]
    b64 = base64.b64encode(raw).decode()
    assert signing.public_key_id(b64) == signing.public_key_id(raw) == signing.public_key_id(pub.read_text()) == kid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temp files left


def test_encrypted_key_needs_the_right_passphrase(tmp_path: Path) -> None:
    priv, _ = signing.generate_keypair(tmp_path / "k", b"correct horse")
    assert b"ENCRYPTED" in priv.read_bytes()
    with pytest.raises(InputError) as exc:
        signing.load_private_key(priv)
    assert str(exc.value) == (f"private key {priv} is encrypted; give its passphrase with "
                              "--passphrase-file or the SOPPU_KEY_PASSPHRASE environment variable")
    with pytest.raises(InputError, match="wrong passphrase"):
        signing.load_private_key(priv, b"wrong")
    assert isinstance(signing.load_private_key(priv, b"correct horse"), Ed25519PrivateKey)


def test_keygen_refuses_overwrite_and_failed_run_leaves_nothing(tmp_path: Path) -> None:
    signing.generate_keypair(tmp_path / "k")
    with pytest.raises(InputError, match="already exists; choose another path or pass --force"):
        signing.generate_keypair(tmp_path / "k")
    (tmp_path / "j.pub").mkdir()  # the public key cannot be written: a directory is in the way
    with pytest.raises(InputError, match="cannot write key"):
        signing.generate_keypair(tmp_path / "j", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.pub", "k", "k.pub"]


def test_bad_private_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "k"
    path.write_text("garbage")
    with pytest.raises(InputError) as exc:
        signing.load_private_key(path)
    assert str(exc.value) == (f"{path} is not a usable private key (PEM PKCS#8 or OpenSSH); create one "
                              "with `soppu keygen`")
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(InputError, match="is ECPrivateKey, not Ed25519"):
        signing.load_private_key(path)
    with pytest.raises(InputError, match="does not exist"):
        signing.load_private_key(tmp_path / "missing")


def test_bad_public_keys(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(InputError, match="is not an Ed25519 public key"):
        signing.load_public_key(tmp_path / "junk.pub")
    with pytest.raises(InputError, match="neither an existing file nor a base64 Ed25519 key"):
        signing.load_public_key(str(tmp_path / "missing.pub"))


# --------------------------------------------------------------------------- statements


def test_canonical_json() -> None:
    assert signing.canonical_json({"b": [1, {"d": 1, "c": "é"}], "a": None}) == \
        '{"a":null,"b":[1,{"c":"é","d":1}]}'.encode()
    with pytest.raises(ValueError):
        signing.canonical_json({"x": float("nan")})


def _golden_bundle(root: Path) -> Path:
    """A bundle whose bytes are fixed here (not by any library version)."""
    (root / "cores").mkdir(parents=True)
    files = {"basis.safetensors": b"basis-bytes", "cores/a.safetensors": b"core-a",
             "cores/b.safetensors": b"core-b"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    manifest = {"format": "soppu-bundle/1", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "adapters": {"b": {"core": "cores/b.safetensors"}, "a": {"core": "cores/a.safetensors"}},
                "files": {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for rel, d in files.items()}}
    (root / "manifest.json").write_bytes(signing.canonical_json(manifest))
    return root


def test_golden_statement_bytes(tmp_path: Path) -> None:
    statement = signing.build_statement(_golden_bundle(tmp_path / "g"), "alice", 7, EXPIRES)
    got = signing.canonical_json(statement)
    if os.environ.get("SOPPU_UPDATE_GOLDEN") == "1":
        DATA.mkdir(exist_ok=True)
        GOLDEN.write_bytes(got)
    assert GOLDEN.exists(), f"{GOLDEN} missing; create it with SOPPU_UPDATE_GOLDEN=1"
    assert got == GOLDEN.read_bytes()
    assert list(statement) == ["format", "owner", "adapters", "version", "base_model", "expires_at", "files"]
    assert statement["adapters"] == ["a", "b"] and statement["version"] == 7
    assert [f["path"] for f in statement["files"]] == sorted(f["path"] for f in statement["files"])
    # Ed25519 is deterministic: a fixed key gives a fixed, verifiable signature over those bytes
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    doc = signing.sign_statement(json.loads(GOLDEN.read_bytes()), key)
    assert doc == signing.sign_statement(statement, key)
    assert signing.verify_statement(doc, key.public_key(), now=NOW) == statement


def test_build_statement_refuses_inconsistent_bundles(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "notes.txt").write_text("x")
    (bundle / "cores" / "a.safetensors").write_bytes(b"changed")
    with pytest.raises(BundleError) as exc:
        signing.build_statement(bundle, "alice", 1, "1d")
    msg = str(exc.value)
    assert msg.startswith(f"cannot sign bundle {bundle}:\n")
    assert "`cores/a.safetensors` has sha256" in msg and "rebuild the bundle" in msg
    assert "file `notes.txt` is in the bundle but not in manifest `files`; remove it" in msg


@pytest.mark.parametrize("owner, version, expires, match", [
    ("al ice", 1, "1d", "owner name 'al ice' is invalid"),
    ("alice", 0, "1d", "version 0 is invalid"),
    ("alice", True, "1d", "version True is invalid"),
    ("alice", 1, "2001-01-01", "is not in the future"),
    ("alice", 1, "soon", "is not a duration"),
])
def test_sign_rejects_bad_input(tmp_path: Path, keys: tuple, owner: str, version: int,
                                expires: str, match: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(InputError, match=match):
        signing.sign_bundle(bundle, keys[0], owner, version, expires)
    assert not (bundle / "signature.json").exists()


def test_parse_expiry() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert signing.parse_expiry("90d", now=now) == now + timedelta(days=90)
    assert signing.parse_expiry("12h", now=now) == now + timedelta(hours=12)
    assert signing.format_timestamp(signing.parse_expiry("2027-02-21", now=now)) == "2027-02-21T00:00:00Z"
    assert signing.format_timestamp(signing.parse_expiry("2027-02-21T03:00:00+02:00", now=now)) == \
        "2027-02-21T01:00:00Z"


# --------------------------------------------------------------------------- verification


def test_roundtrip(signed: Path, keys: tuple) -> None:
    st_ = signing.verify_bundle(signed, keys[1], now=NOW, owner="alice", adapter="a", version=3)
    assert st_["owner"] == "alice" and st_["adapters"] == ["a", "b"] and st_["expires_at"] == EXPIRES
    assert [f["path"] for f in st_["files"]] == ["basis.safetensors", "cores/a.safetensors",
                                                 "cores/b.safetensors", "manifest.json"]
    doc = json.loads((signed / "signature.json").read_text())
    assert set(doc) == {"statement", "signature", "key_id", "public_key"}
    assert doc["key_id"] == signing.public_key_id(keys[1])


def test_tampered_core_byte_names_file_and_digests(signed: Path, keys: tuple) -> None:
    core = signed / "cores" / "a.safetensors"
    before = core.read_bytes()
    expected = digest(core)
    data = bytearray(before)
    data[-3] ^= 0x01
    core.write_bytes(bytes(data))
    assert core.read_bytes() != before and len(core.read_bytes()) == len(before)  # non-vacuity
    actual = digest(core)
    assert verify_error(signed, keys[1]) == (
        f"bundle {signed} does not match its signed statement:\n"
        f"  - file `cores/a.safetensors` was modified: expected sha256 {expected} ({len(before)} bytes), "
        f"actual sha256 {actual} ({len(before)} bytes)")
    core.write_bytes(before)
    signing.verify_bundle(signed, keys[1], now=NOW)  # restoring the byte restores validity


def test_added_removed_renamed_files(signed: Path, keys: tuple) -> None:
    (signed / "cores" / "evil.safetensors").write_bytes(b"x")
    assert "extra file `cores/evil.safetensors` is not covered by the signature" in verify_error(signed, keys[1])
    (signed / "cores" / "evil.safetensors").unlink()
    moved = (signed / "basis.safetensors").read_bytes()
    (signed / "basis.safetensors").unlink()
    msg = verify_error(signed, keys[1])
    assert "file `basis.safetensors` is missing (expected sha256" in msg
    (signed / "basis.safetensors").write_bytes(moved)
    os.rename(signed / "cores" / "b.safetensors", signed / "cores" / "c.safetensors")
    msg = verify_error(signed, keys[1])
    assert msg.endswith("  - file `cores/b.safetensors` was renamed to `cores/c.safetensors`")


def test_wrong_key(signed: Path, keys: tuple, tmp_path: Path) -> None:
    _, other = signing.generate_keypair(tmp_path / "other")
    assert verify_error(signed, other) == (
        f"wrong key: the bundle was signed with key {signing.public_key_id(keys[1])}, "
        f"but the trusted public key is {signing.public_key_id(other)}")


def test_wrong_key_disguised_as_right_key(signed: Path, keys: tuple, tmp_path: Path) -> None:
    """An attacker re-signs with their key but claims the owner's key id: the signature fails."""
    doc = json.loads((signed / "signature.json").read_text())
    evil = Ed25519PrivateKey.generate()
    doc["signature"] = signing.sign_statement(doc["statement"], evil)["signature"]
    (signed / "signature.json").write_text(json.dumps(doc))
    assert verify_error(signed, keys[1]).startswith("signature does not verify with key ")


def test_expired(signed: Path, keys: tuple) -> None:
    late = datetime(2099, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(SignatureError) as exc:
        signing.verify_bundle(signed, keys[1], now=late)
    assert str(exc.value) == ("statement expired at 2099-01-01T00:00:00Z (now 2099-01-01T00:00:00Z); "
                              "re-sign the bundle with a later --expires")
    signing.verify_bundle(signed, keys[1], now=late - timedelta(seconds=1))


def test_owner_adapter_version_mismatch(signed: Path, keys: tuple) -> None:
    assert verify_error(signed, keys[1], owner="bob") == \
        "owner mismatch: the statement is signed for owner 'alice', not 'bob'"
    assert verify_error(signed, keys[1], adapter="c") == \
        "adapter name mismatch: the statement covers adapters ['a', 'b'], not 'c'"
    assert verify_error(signed, keys[1], version=4) == \
        "version mismatch: the statement is signed for version 3, not 4"


def _edit_statement(bundle: Path, **changes: object) -> None:
    doc = json.loads((bundle / "signature.json").read_text())
    doc["statement"].update(changes)
    (bundle / "signature.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("changes", [{"owner": "bob"}, {"version": 4}, {"adapters": ["a", "x"]},
                                     {"expires_at": "2199-01-01T00:00:00Z"}, {"base_model": "gpt2"}])
def test_editing_any_statement_value_breaks_the_signature(signed: Path, keys: tuple, changes: dict) -> None:
    _edit_statement(signed, **changes)
    assert verify_error(signed, keys[1]) == (
        f"signature does not verify with key {signing.public_key_id(keys[1])}: the statement was "
        "changed after signing, or it was signed with another key")


def test_name_swap_between_bundles(tmp_path: Path, keys: tuple) -> None:
    """A valid signature for adapter x never verifies adapter y, even with identical weights."""
    bx = make_bundle(tmp_path / "x", adapters=("x",), seed=1)
    by = make_bundle(tmp_path / "y", adapters=("y",), seed=1)
    assert (bx / "cores/x.safetensors").read_bytes() == (by / "cores/y.safetensors").read_bytes()
    signing.sign_bundle(bx, keys[0], "alice", 1, EXPIRES)
    assert verify_error(bx, keys[1], adapter="y").startswith("adapter name mismatch")
    shutil.copy(bx / "signature.json", by / "signature.json")
    msg = verify_error(by, keys[1])
    assert "file `manifest.json` was modified" in msg
    assert "file `cores/x.safetensors` was renamed to `cores/y.safetensors`" in msg
    assert verify_error(by, keys[1], adapter="y").startswith("adapter name mismatch")


def test_owner_swap(tmp_path: Path, keys: tuple) -> None:
    bundle = make_bundle(tmp_path / "b")
    signing.sign_bundle(bundle, keys[0], "alice", 1, EXPIRES)
    assert verify_error(bundle, keys[1], owner="bob").startswith("owner mismatch")
    doc = json.loads((bundle / "signature.json").read_text())
    with pytest.raises(SignatureError, match="owner mismatch"):
        signing.verify_statement(doc, keys[1], now=NOW, owner="bob")
    assert signing.verify_statement(doc, keys[1], now=NOW, owner="alice")["owner"] == "alice"


def test_reformatting_signature_json_still_verifies(signed: Path, keys: tuple) -> None:
    path = signed / "signature.json"
    doc = json.loads(path.read_text())

    def reverse(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: reverse(obj[k]) for k in reversed(list(obj))}
        return [reverse(x) for x in obj] if isinstance(obj, list) else obj

    text = json.dumps(reverse(doc), indent=7, ensure_ascii=True)
    assert text != path.read_text() and json.loads(text) == doc  # really reordered, same values
    path.write_text(text)
    signing.verify_bundle(signed, keys[1], now=NOW)


def test_malformed_signature_documents(signed: Path, keys: tuple) -> None:
    path = signed / "signature.json"
    doc = json.loads(path.read_text())
    path.write_text("{not json")
    assert "signature.json is not readable JSON" in verify_error(signed, keys[1])
    path.write_text(json.dumps({**doc, "key_id": "ed25519:" + "0" * 32}))
    assert "`key_id` 'ed25519:00000000000000000000000000000000' does not match" in verify_error(signed, keys[1])
    path.unlink()
    assert verify_error(signed, keys[1]) == (f"bundle {signed} is not signed: signature.json is "
                                             "missing; sign it with `soppu sign`")


def test_failed_sign_keeps_the_old_signature(signed: Path, keys: tuple) -> None:
    before = (signed / "signature.json").read_bytes()
    (signed / "junk.bin").write_bytes(b"x")
    with pytest.raises(BundleError):
        signing.sign_bundle(signed, keys[0], "alice", 4, EXPIRES)
    assert (signed / "signature.json").read_bytes() == before
    (signed / "junk.bin").unlink()
    (signed / "signature.json").unlink()
    (signed / "signature.json").mkdir()  # the rename cannot happen
    with pytest.raises(InputError, match="cannot write"):
        signing.sign_bundle(signed, keys[0], "alice", 4, EXPIRES)
    assert not [p for p in signed.iterdir() if p.name.endswith(".tmp")]


def test_diff_files_constant_time_compare_reports_everything() -> None:
    want = [{"path": "a", "sha256": "1" * 64, "size": 1}, {"path": "b", "sha256": "2" * 64, "size": 2}]
    actual = {"a": ("f" * 64, 1), "c": ("2" * 64, 2), "d": ("3" * 64, 3)}
    assert signing.diff_files(want, actual) == [
        f"file `a` was modified: expected sha256 {'1' * 64} (1 bytes), actual sha256 {'f' * 64} (1 bytes)",
        "file `b` was renamed to `c`",
        "extra file `d` is not covered by the signature",
    ]


# --------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ed25519PrivateKey]:
    root = tmp_path_factory.mktemp("fuzz")
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(root / "b")
    signing.sign_bundle(bundle, key, "alice", 1, EXPIRES)
    return bundle, key


FUZZ_FILES = ["manifest.json", "basis.safetensors", "cores/a.safetensors", "cores/b.safetensors",
              "signature.json"]


def _semantics(doc: dict) -> tuple:
    """The document's values, base64 strings as written: only their one canonical spelling verifies."""
    return doc["statement"], doc["signature"], doc["public_key"], doc["key_id"]


@settings(max_examples=80, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_sign_mutate_one_byte_verify_fails(fuzz_bundle: tuple, data: st.DataObject) -> None:
    bundle, key = fuzz_bundle
    rel = data.draw(st.sampled_from(FUZZ_FILES), label="file")
    path = bundle / rel
    original = path.read_bytes()
    i = data.draw(st.integers(0, len(original) - 1), label="offset")
    mutated = bytearray(original)
    mutated[i] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        path.write_bytes(bytes(mutated))
        try:
            signing.verify_bundle(bundle, key.public_key(), now=NOW)
        except SignatureError:
            return
        # Only signature.json may survive a mutation, and only one that changes no value (JSON
        # whitespace between tokens): unused base64 bits no longer survive (issue 19 finding 3).
        assert rel == "signature.json", f"mutating {rel} byte {i} still verified"
        assert _semantics(json.loads(mutated)) == _semantics(json.loads(original))
    finally:
        path.write_bytes(original)


def test_fuzz_bundle_verifies_unmutated(fuzz_bundle: tuple) -> None:
    bundle, key = fuzz_bundle
    signing.verify_bundle(bundle, key.public_key(), now=NOW)


# --------------------------------------------------------------------------- CLI


def invoke(cmd, args: list[str], **kw):  # noqa: ANN001, ANN201
    result = CliRunner().invoke(cmd, args, **kw)
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def test_cli_commands_exported() -> None:
    assert [c.name for c in COMMANDS] == ["keygen", "sign", "verify-signature"]


def test_cli_keygen_sign_verify_roundtrip(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    key = tmp_path / "k"
    r = invoke(keygen, ["-o", str(key), "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["ok"] and out["encrypted"] is False
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    r = invoke(sign, [str(bundle), "--key", str(key), "--owner", "alice", "--version", "5", "--expires", "90d"])
    assert r.exit_code == 0 and f"wrote {bundle / 'signature.json'}" in r.stdout
    r = invoke(verify_signature, [str(bundle), "--public-key", f"{key}.pub", "--owner", "alice",
                                  "--adapter", "a", "--version", "5", "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["ok"] and out["adapters"] == ["a", "b"] and out["version"] == 5
    r = invoke(verify_signature, [str(bundle), "--public-key", f"{key}.pub"])
    assert r.stdout.startswith(f"OK: {bundle} is signed by ed25519:")


def test_cli_failed_verification_exit_1_never_says_ok(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    key = tmp_path / "k"
    invoke(keygen, ["-o", str(key)])
    invoke(sign, [str(bundle), "--key", str(key), "--owner", "alice", "--version", "1"])
    core = bundle / "cores" / "b.safetensors"
    core.write_bytes(core.read_bytes()[:-1] + bytes([core.read_bytes()[-1] ^ 0xFF]))
    r = invoke(verify_signature, [str(bundle), "--public-key", f"{key}.pub"])
    assert r.exit_code == 1 and r.stdout == "" and "OK" not in r.output
    assert r.stderr.startswith(f"error: bundle {bundle} does not match its signed statement:\n"
                               "  - file `cores/b.safetensors` was modified: expected sha256 ")
    r = invoke(verify_signature, [str(bundle), "--public-key", f"{key}.pub", "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["ok"] is False and out["error"]["type"] == "SignatureError"
    r = invoke(verify_signature, [str(bundle), "--public-key", f"{key}.pub", "--owner", "bob"])
    assert r.exit_code == 1
    assert r.stderr == "error: owner mismatch: the statement is signed for owner 'alice', not 'bob'\n"


def test_cli_passphrase_from_file_and_env(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    key = tmp_path / "k"
    assert invoke(keygen, ["-o", str(key), "--passphrase-file", str(pw)]).exit_code == 0
    assert b"ENCRYPTED" in key.read_bytes()
    r = invoke(sign, [str(bundle), "--key", str(key), "--owner", "alice", "--version", "1"],
               env={"SOPPU_KEY_PASSPHRASE": None})
    assert r.exit_code == 2 and "is encrypted; give its passphrase" in r.stderr
    r = invoke(sign, [str(bundle), "--key", str(key), "--owner", "alice", "--version", "1"],
               env={"SOPPU_KEY_PASSPHRASE": "s3cret"})
    assert r.exit_code == 0
    r = invoke(sign, [str(bundle), "--key", str(key), "--owner", "alice", "--version", "2",
                      "--passphrase-file", str(pw)])
    assert r.exit_code == 0
    # a passphrase is never a plain command-line value
    assert not [o for c in COMMANDS for p in c.params for o in p.opts if o == "--passphrase"]


@pytest.mark.parametrize("args, needle", [
    (["--version", "0"], "Invalid value for '--version'"),
    (["--version", "1", "--expires", "soon"], "error: --expires 'soon' is not a duration"),
    (["--version", "1", "--owner", "bad owner"], "error: owner name 'bad owner' is invalid"),
])
def test_cli_bad_input_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    invoke(keygen, ["-o", str(tmp_path / "k")])
    base = [str(bundle), "--key", str(tmp_path / "k"), "--owner", "alice"]
    r = invoke(sign, base + args)
    assert r.exit_code == 2 and needle in r.output
    assert not (bundle / "signature.json").exists()


def test_cli_missing_files_exit_2(tmp_path: Path) -> None:
    r = invoke(sign, [str(tmp_path / "nope"), "--key", str(tmp_path / "k"), "--owner", "a", "--version", "1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    r = invoke(verify_signature, [str(tmp_path), "--public-key", str(tmp_path / "missing.pub")])
    assert r.exit_code == 2 and "neither an existing file nor a base64 Ed25519 key" in r.stderr


def test_soppu_group_registers_commands() -> None:
    """The signing commands work through the `soppu` group."""
    from soppu_client.cli import cli

    assert {"keygen", "sign", "verify-signature"} <= set(cli.commands)
    r = CliRunner().invoke(cli, ["verify-signature", "--help"])
    assert r.exit_code == 0 and "--public-key" in r.output


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `soppu` script: keygen, sign, tamper, verify-signature -> exit 1, no traceback."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "soppu"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    bundle = make_bundle(tmp_path / "b")
    key = tmp_path / "k"

    def soppu(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SOPPU_KEY_PASSPHRASE"}
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=60)

    assert soppu("keygen", "-o", str(key)).returncode == 0
    assert soppu("sign", str(bundle), "--key", str(key), "--owner", "alice", "--version", "1").returncode == 0
    ok = soppu("verify-signature", str(bundle), "--public-key", f"{key}.pub", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    manifest = bundle / "manifest.json"
    text = manifest.read_text()
    assert '"rank": 2' in text  # non-vacuity: the edit below really changes the manifest
    manifest.write_text(text.replace('"rank": 2', '"rank": 3'))
    bad = soppu("verify-signature", str(bundle), "--public-key", f"{key}.pub")
    assert bad.returncode == 1 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert "file `manifest.json` was modified" in bad.stderr


# --------------------------------------------------------------------------- error codes, one manifest check


def _code(bundle: Path, pub: object, **kw: object) -> str | None:
    with pytest.raises(SignatureError) as exc:
        signing.verify_bundle(bundle, pub, **{"now": NOW, **kw})
    return exc.value.code


def test_signature_errors_carry_codes(signed: Path, keys: tuple, tmp_path: Path) -> None:
    assert _code(signed, keys[1], owner="bob") == "owner_mismatch"
    assert _code(signed, keys[1], adapter="zeta") == "name_mismatch"
    assert _code(signed, keys[1], version=4) == "version_mismatch"
    assert _code(signed, keys[1], now=datetime(2100, 1, 1, tzinfo=timezone.utc)) == "expired"
    other = Ed25519PrivateKey.generate().public_key()
    assert _code(signed, other) == "wrong_key"
    core = signed / "cores" / "a.safetensors"
    before = core.read_bytes()
    core.write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    assert _code(signed, keys[1]) == "files_mismatch"
    core.write_bytes(before)
    unsigned = make_bundle(tmp_path / "unsigned")
    assert _code(unsigned, keys[1]) == "unsigned"
    doc = signing.read_signature(signed)
    month13 = signing.sign_statement({**doc["statement"], "expires_at": "2099-13-01T00:00:00Z"}, keys[0])
    with pytest.raises(SignatureError) as exc:  # a regex-shaped but impossible time is malformed, not a crash
        signing.verify_statement(month13, keys[1], now=NOW)
    assert exc.value.code == "bad_statement" and "expires_at must be an RFC 3339 UTC time" in str(exc.value)


def test_manifest_disagreeing_with_a_valid_statement_is_bad_manifest(signed: Path, keys: tuple) -> None:
    """The owner signs a statement whose base model differs from manifest.json: the signature and
    every digest verify, the one manifest check does not (same rule for verify_bundle and fetchers)."""
    doc = signing.read_signature(signed)
    statement = {**doc["statement"], "base_model": "other/model"}
    (signed / "signature.json").write_text(json.dumps(signing.sign_statement(statement, keys[0])))
    with pytest.raises(SignatureError) as exc:
        signing.verify_bundle(signed, keys[1], now=NOW)
    assert exc.value.code == "bad_manifest"
    assert str(exc.value) == (f"bundle {signed} does not match its signed statement:\n"
                              "  - manifest base_model 'HuggingFaceTB/SmolLM2-135M-Instruct' != statement 'other/model'")
    manifest = json.loads((signed / "manifest.json").read_text())
    with pytest.raises(SignatureError) as exc:
        signing.check_manifest(manifest, statement, "adapter alice/a@3", ["basis.safetensors"], adapter="a")
    assert exc.value.code == "bad_manifest"
    assert str(exc.value).startswith("adapter alice/a@3: manifest does not match its signature: manifest base_model")
    good = signing.check_manifest(manifest, doc["statement"], "x", ["basis.safetensors"], adapter="a")
    assert good.names == ["a", "b"] and good.files["basis.safetensors"].size > 0
    manifest["files"]["basis.safetensors"]["size"] += 1
    with pytest.raises(SignatureError, match=r"`basis.safetensors`: manifest records sha256 \w+ \(\d+ bytes\), "
                                             r"the statement signs"):
        signing.check_manifest(manifest, doc["statement"], "x", ["basis.safetensors"])
