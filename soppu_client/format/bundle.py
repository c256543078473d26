"""The on-disk bundle (format ``soppu-bundle/1``) and its export to a standard PEFT adapter.

    <bundle>/manifest.json                  format, base model, method, rank, modules + shapes,
                                            clusters, adapters, per-file sha256 and size, metrics
    <bundle>/basis.safetensors              "<module>.U" [d_out, k], "<module>.V" [d_in, k]
                                            (several clusters: "<module>.c<j>.U" / ".V")
    <bundle>/cores/<adapter>.safetensors    "<module>.S" [k, k] (full) or [k] (diag)
    <bundle>/metrics.json                   per-module, per-adapter errors and SVD lower bounds
    <bundle>/signature.json                 added by ``soppu sign`` (not listed in "files")

A bundle is written into a temporary sibling directory and renamed into place, so a failed run
leaves nothing behind. Export of adapter i: r = k, lora_A = V.T, lora_B = U @ S_i (diag: U * s_i),
lora_alpha = k (scaling 1), the source adapters' target modules and layout flags.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from soppu_client.format.names import ADAPTER_NAME_RE
from soppu_client.format.errors import BundleError, InputError, VerificationError
from soppu_client.format.fsutil import file_digest, fsync_dir, fsync_tree

FORMAT = "soppu-bundle/1"
MANIFEST = "manifest.json"
BASIS = "basis.safetensors"
SIGNATURE = "signature.json"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PEFT_KEYS_KEPT = ("target_modules", "fan_in_fan_out", "task_type", "layers_to_transform", "layers_pattern")


def sha256_file(path: Path) -> str:
    return file_digest(path)[0]


def core_path(name: str) -> str:
    return f"cores/{name}.safetensors"


def basis_key(module: str, side: str, cluster: int, n_clusters: int) -> str:
    """Tensor name of a basis factor: "<module>.U" or, with clusters, "<module>.c<j>.U"."""
    return f"{module}.{side}" if n_clusters == 1 else f"{module}.c{cluster}.{side}"


def canonical_dumps(obj) -> str:
    """Deterministic JSON text for files we write (sorted keys, indented, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def publish_dir(tmp: Path, out: Path, *, force: bool) -> None:
    """Atomically move a fully written directory ``tmp`` to ``out`` (replacing it when ``force``)."""
    fsync_tree(tmp)
    if out.exists():
        if not force:
            raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


@contextmanager
def staged_dir(out: str | Path, *, force: bool) -> Iterator[Path]:
    """An empty temp dir beside ``out`` to write into; when the block ends without an error it is
    published at ``out`` (fsynced, renamed; an existing ``out`` replaced only with ``force``), and
    in every case nothing half-written is left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class BundleBuilder:
    """Accumulates bases and cores module by module, then writes the bundle atomically."""

    def __init__(self, names: list[str], rank: int, diag: bool, n_clusters: int, dtype: torch.dtype,
                 reuse_basis: Path | None = None):
        """``reuse_basis``: copy this basis.safetensors byte for byte instead of writing one."""
        self.reuse_basis = reuse_basis
        self.names = names
        self.rank = rank
        self.diag = diag
        self.n_clusters = n_clusters
        self.dtype = dtype
        self.basis: dict[str, torch.Tensor] = {}
        self.cores: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        self.shapes: dict[str, list[int]] = {}

    def add_module(self, module: str, U: list[torch.Tensor], V: list[torch.Tensor], cores: torch.Tensor) -> None:
        self.shapes[module] = [int(U[0].shape[0]), int(V[0].shape[0])]
        for c in range(self.n_clusters if self.reuse_basis is None else 0):
            self.basis[basis_key(module, "U", c, self.n_clusters)] = U[c].to(self.dtype).contiguous()
            self.basis[basis_key(module, "V", c, self.n_clusters)] = V[c].to(self.dtype).contiguous()
        for i, name in enumerate(self.names):
            self.cores[name][f"{module}.S"] = cores[i].to(self.dtype).contiguous()

    def tensor_bytes(self) -> int:
        """Bytes of tensor payload (basis + all cores), as stored."""
        tensors = [*self.basis.values(), *(t for c in self.cores.values() for t in c.values())]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def write(self, out: Path, manifest: dict, *, extra_files: dict[str, bytes] | None = None, force: bool = False) -> dict:
        """Write basis, cores, ``extra_files`` and the manifest (listing every file's digest) to
        ``out`` all-or-nothing; return the manifest as written."""
        with staged_dir(out, force=force) as tmp:
            (tmp / "cores").mkdir()
            if self.reuse_basis is not None:
                shutil.copyfile(self.reuse_basis, tmp / BASIS)
            else:
                save_file(self.basis, str(tmp / BASIS), metadata={"format": FORMAT})
            for name, tensors in self.cores.items():
                save_file(tensors, str(tmp / core_path(name)), metadata={"format": FORMAT})
            for rel, data in (extra_files or {}).items():
                (tmp / rel).write_bytes(data)
            files = {}
            for rel in [BASIS, *(core_path(n) for n in self.names), *(extra_files or {})]:
                files[rel] = {"sha256": sha256_file(tmp / rel), "size": (tmp / rel).stat().st_size}
            manifest = dict(manifest, modules={m: {"shape": s} for m, s in self.shapes.items()}, files=files)
            (tmp / MANIFEST).write_text(canonical_dumps(manifest), encoding="utf-8")
        return manifest


_REQUIRED = ("format", "base_model", "method", "rank", "clusters", "modules", "adapters", "files", "peft", "dtype")


@dataclass
class Bundle:
    """A bundle directory opened for reading; tensors are read on demand."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, *, verify_digests: bool = True) -> "Bundle":
        """Read and check manifest.json; with ``verify_digests`` also every file's size and sha256."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path} is not a SOPPU bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath} must hold a JSON object")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise BundleError(f"{mpath} lacks the field(s) {', '.join(missing)}")
        if manifest["format"] != FORMAT:
            raise BundleError(f"{mpath}: format is `{manifest['format']}`, expected `{FORMAT}`")
        if manifest["method"] not in ("full", "diag"):
            raise BundleError(f"{mpath}: method `{manifest['method']}` is not `full` or `diag`")
        for name, entry in manifest["adapters"].items():
            if not ADAPTER_NAME_RE.match(name) or entry.get("core") != core_path(name):
                raise BundleError(f"{mpath}: adapter `{name}` has an invalid name or core path `{entry.get('core')}`")
            if entry["core"] not in manifest["files"]:
                raise BundleError(f"{mpath}: core file of adapter `{name}` is not listed in `files`")
        bundle = cls(path=path, manifest=manifest)
        if verify_digests:
            bundle.verify_files()
        return bundle

    # -- manifest views -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.manifest["rank"])

    @property
    def diag(self) -> bool:
        return self.manifest["method"] == "diag"

    @property
    def n_clusters(self) -> int:
        return int(self.manifest["clusters"])

    @property
    def names(self) -> list[str]:
        return list(self.manifest["adapters"])

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["modules"])

    def cluster_of(self, name: str) -> int:
        return int(self.adapter_entry(name).get("cluster", 0))

    def adapter_entry(self, name: str) -> dict:
        try:
            return self.manifest["adapters"][name]
        except KeyError:
            raise InputError(
                f"bundle {self.path} has no adapter `{name}`; it has: {', '.join(self.names)}"
            ) from None

    # -- files ----------------------------------------------------------------------------
    def verify_files(self) -> None:
        """Every listed file exists with the listed size and sha256 (constant-time compare)."""
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file():
                raise VerificationError(f"bundle {self.path}: file {rel} listed in the manifest is missing")
            size = p.stat().st_size
            if size != meta["size"]:
                raise VerificationError(f"bundle {self.path}: {rel} is {size} bytes, the manifest says {meta['size']}")
            digest = sha256_file(p)
            if not hmac.compare_digest(digest, str(meta["sha256"])):
                raise VerificationError(
                    f"bundle {self.path}: {rel} has sha256 {digest}, the manifest says {meta['sha256']}"
                )

    def _load(self, rel: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from soppu_client.format.safetensors_check import validate_safetensors

        validate_safetensors(self.path / rel, expected=self._expected(rel))
        return load_file(str(self.path / rel))

    def _expected(self, rel: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[self.manifest["dtype"]]
        k = self.rank
        out = {}
        for module, meta in self.manifest["modules"].items():
            d_out, d_in = meta["shape"]
            if rel == BASIS:
                for c in range(self.n_clusters):
                    out[basis_key(module, "U", c, self.n_clusters)] = (dtype, (d_out, k))
                    out[basis_key(module, "V", c, self.n_clusters)] = (dtype, (d_in, k))
            else:
                out[f"{module}.S"] = (dtype, (k,) if self.diag else (k, k))
        return out

    def load_basis(self) -> dict[str, torch.Tensor]:
        return self._load(BASIS)

    def load_cores(self, name: str) -> dict[str, torch.Tensor]:
        return self._load(self.adapter_entry(name)["core"])

    def delta_factors(self, name: str, basis: dict[str, torch.Tensor] | None = None):
        """Yield (module, lora_A = V.T [k, d_in], lora_B = U S [d_out, k]) for adapter ``name`` (float32)."""
        basis = basis if basis is not None else self.load_basis()
        cores = self.load_cores(name)
        c = self.cluster_of(name)
        for module in self.modules:
            U = basis[basis_key(module, "U", c, self.n_clusters)].float()
            V = basis[basis_key(module, "V", c, self.n_clusters)].float()
            S = cores[f"{module}.S"].float()
            B = U * S if self.diag else U @ S
            yield module, V.T.contiguous(), B.contiguous()


def peft_config_for(bundle: Bundle) -> dict:
    """adapter_config.json of an exported adapter: r = k, lora_alpha = k (scaling 1)."""
    k = bundle.rank
    peft = bundle.manifest.get("peft", {})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": bundle.manifest["base_model"],
        "r": k,
        "lora_alpha": k,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": peft.get("target_modules"),
        "fan_in_fan_out": bool(peft.get("fan_in_fan_out", False)),
        "task_type": peft.get("task_type") or "CAUSAL_LM",
    }
    for key in ("layers_to_transform", "layers_pattern"):
        if peft.get(key) is not None:
            config[key] = peft[key]
    return config


def export_peft(
    bundle: Bundle | str | Path, name: str, out_dir: str | Path, *, dtype: str = "float32", force: bool = False,
    basis: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``name`` as a standard PEFT LoRA dir (atomic). Returns ``out_dir``."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    torch_dtype = TORCH_DTYPES[dtype]
    out = Path(out_dir)
    if out.exists() and not force:  # before any tensor work
        raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
    tensors = {}
    for module, lora_a, lora_b in bundle.delta_factors(name, basis):
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.to(torch_dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.to(torch_dtype)
    with staged_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(canonical_dumps(peft_config_for(bundle)), encoding="utf-8")
    return out


def peft_fields(configs: list[dict]) -> dict:
    """The PEFT fields a bundle keeps from its source adapters (taken from the first one;
    the collection validator has already checked the adapters agree on modules)."""
    first = configs[0]
    out = {k: first.get(k) for k in _PEFT_KEYS_KEPT if first.get(k) is not None}
    tm = out.get("target_modules")
    if isinstance(tm, (list, set, tuple)):
        out["target_modules"] = sorted(tm)
    return out
