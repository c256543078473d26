"""Fixtures: one real registry on loopback with one compressed, signed, uploaded bundle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


from tests.serving import srckit  # noqa: E402


@dataclass
class Published:
    registry: srckit.Registry
    bundle: Path
    adapters: list[str]
    tmp: Path


@pytest.fixture(scope="session", autouse=True)
def _own_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`soppu project --onto-published` records known owner keys under $SOPPU_CONFIG_DIR: a fresh
    one for this test session (never the user's ~/.config/soppu)."""
    import os

    old = os.environ.get("SOPPU_CONFIG_DIR")
    path = tmp_path_factory.mktemp("soppu-config")
    os.environ["SOPPU_CONFIG_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SOPPU_CONFIG_DIR", None)
    else:
        os.environ["SOPPU_CONFIG_DIR"] = old


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    tmp = tmp_path_factory.mktemp("soppu-source")
    adapters = [srckit.write_adapter(tmp / "adapters" / f"ad{i}", seed=i) for i in range(3)]
    bundle = srckit.compress(adapters, tmp / "bundle", rank=8)
    registry = srckit.start_registry(tmp)
    try:
        registry.publish(bundle, version=1)
        yield Published(registry, bundle, [a.name for a in adapters], tmp)
    finally:
        registry.stop()


@pytest.fixture
def source_env(published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the source at the registry and a fresh cache; returns the cache root."""
    from soppu_serving.session import forget_sessions

    cache = tmp_path / "cache"
    monkeypatch.setenv("SOPPU_REGISTRY_URL", published.registry.url)
    monkeypatch.setenv("SOPPU_CACHE_DIR", str(cache))
    monkeypatch.delenv("SOPPU_REGISTRY_TOKEN", raising=False)
    monkeypatch.delenv("SOPPU_TRUSTED_KEYS", raising=False)
    forget_sessions()
    return cache
