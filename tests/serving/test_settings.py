"""soppu_serving.settings: every SOPPU_* variable read in one place, bad values named with the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from soppu_client.format.errors import InputError
from soppu_serving.settings import Settings


def test_defaults_and_every_variable(tmp_path: Path) -> None:
    assert Settings.from_env({}) == Settings()
    assert (Settings().serve_format, Settings().registry_retries, Settings().registry_timeout,
            Settings().resolve_ttl, Settings().max_json_bytes, Settings().download_deadline) == (
        "peft", 2, 30.0, 5.0, 4 << 20, 600.0)
    env = {
        "SOPPU_REGISTRY_URL": "http://registry:8080/", "SOPPU_REGISTRY_TOKEN": "tok",
        "SOPPU_CACHE_DIR": str(tmp_path / "cache"), "SOPPU_TRUSTED_KEYS": str(tmp_path),
        "SOPPU_SERVE_FORMAT": " Compressed ", "SOPPU_REGISTRY_RETRIES": "0", "SOPPU_REGISTRY_TIMEOUT": "2.5",
        "SOPPU_RESOLVE_TTL": "0", "SOPPU_REGISTRY_MAX_JSON_BYTES": "65536", "SOPPU_DOWNLOAD_DEADLINE": "12.5",
        "SOPPU_UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert s == Settings(registry_url="http://registry:8080", registry_token="tok", cache_dir=tmp_path / "cache",
                         trusted_keys=tmp_path, serve_format="compressed", registry_retries=0,
                         registry_timeout=2.5, resolve_ttl=0.0, max_json_bytes=65536, download_deadline=12.5)
    assert s.client_options() == {"retries": 0, "timeout": 2.5, "max_json_bytes": 65536, "download_deadline": 12.5}
    assert s.cache_root == tmp_path / "cache" and s.require_registry_url() == "http://registry:8080"
    # Empty means unset; explicit overrides win over the environment, None overrides nothing.
    assert Settings.from_env({"SOPPU_SERVE_FORMAT": "", "SOPPU_CACHE_DIR": "  "}) == Settings()
    o = Settings.from_env(env, serve_format="peft", cache_dir=tmp_path / "other", registry_url=None)
    assert (o.serve_format, o.cache_dir, o.registry_url) == ("peft", tmp_path / "other", "http://registry:8080")


def test_default_cache_root_is_under_the_hub_cache() -> None:
    from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE

    assert Settings().cache_root == Path(HUGGINGFACE_HUB_CACHE) / "soppu"


@pytest.mark.parametrize("var, value, message", [
    ("SOPPU_SERVE_FORMAT", "gguf", "SOPPU_SERVE_FORMAT='gguf' is not a serving form; use one of peft, compressed"),
    ("SOPPU_REGISTRY_URL", "registry:8080",
     "SOPPU_REGISTRY_URL='registry:8080' must be an http(s) URL, e.g. http://registry:8080"),
    ("SOPPU_REGISTRY_RETRIES", "two", "SOPPU_REGISTRY_RETRIES='two' must be an integer >= 0"),
    ("SOPPU_REGISTRY_RETRIES", "1.5", "SOPPU_REGISTRY_RETRIES='1.5' must be an integer >= 0"),
    ("SOPPU_REGISTRY_RETRIES", "-1", "SOPPU_REGISTRY_RETRIES='-1' must be an integer >= 0"),
    ("SOPPU_REGISTRY_TIMEOUT", "0", "SOPPU_REGISTRY_TIMEOUT='0' must be a number of seconds > 0"),
    ("SOPPU_REGISTRY_TIMEOUT", "30s", "SOPPU_REGISTRY_TIMEOUT='30s' must be a number of seconds > 0"),
    ("SOPPU_RESOLVE_TTL", "nan", "SOPPU_RESOLVE_TTL='nan' must be a number of seconds >= 0"),
    ("SOPPU_RESOLVE_TTL", "-5", "SOPPU_RESOLVE_TTL='-5' must be a number of seconds >= 0"),
    ("SOPPU_DOWNLOAD_DEADLINE", "0", "SOPPU_DOWNLOAD_DEADLINE='0' must be a number of seconds > 0"),
    ("SOPPU_REGISTRY_MAX_JSON_BYTES", "1MiB",
     "SOPPU_REGISTRY_MAX_JSON_BYTES='1MiB' must be an integer number of bytes >= 1024 (default 4194304)"),
    ("SOPPU_REGISTRY_MAX_JSON_BYTES", "100",
     "SOPPU_REGISTRY_MAX_JSON_BYTES='100' must be an integer number of bytes >= 1024 (default 4194304)"),
])
def test_bad_values_name_the_variable_and_the_value(var: str, value: str, message: str) -> None:
    with pytest.raises(InputError) as e:
        Settings.from_env({var: value})
    assert str(e.value) == message


def test_trusted_keys_must_be_a_dir_and_url_is_required_only_to_fetch(tmp_path: Path) -> None:
    missing = tmp_path / "keys"
    with pytest.raises(InputError) as e:
        Settings.from_env({"SOPPU_TRUSTED_KEYS": str(missing)})
    assert str(e.value) == (f"SOPPU_TRUSTED_KEYS={str(missing)!r} is not a directory; point it at a dir of pinned "
                            "owner keys <owner>.pub or <owner>/*.pub, or unset it to trust the registry's keys")
    with pytest.raises(InputError, match=r"^SOPPU_REGISTRY_URL is not set: set SOPPU_REGISTRY_URL=http://"):
        Settings().require_registry_url()
    # Values given in code are checked like the environment's.
    with pytest.raises(InputError, match=r"^SOPPU_REGISTRY_RETRIES=True must be an integer >= 0$"):
        Settings(registry_retries=True)
