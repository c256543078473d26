"""The on-disk bundle (format ``soppu-bundle/1``), its typed manifest, and export to PEFT.

    <bundle>/manifest.json                  format, base model, method, rank, modules + shapes,
                                            clusters, adapters, per-file sha256 and size, metrics
    <bundle>/basis.safetensors              "<module>.U" [d_out, k], "<module>.V" [d_in, k]
                                            (several clusters: "<module>.c<j>.U" / ".V")
    <bundle>/cores/<adapter>.safetensors    "<module>.S" [k, k] (full) or [k] (diag)
    <bundle>/metrics.json                   per-module, per-adapter errors and SVD lower bounds
    <bundle>/signature.json                 added by ``soppu sign`` (not listed in "files")

manifest.json has one producer (``soppu_client.compress.pipeline``, through :class:`BundleBuilder`)
and one reader (:meth:`Manifest.from_json`, used by :meth:`Bundle.open` and by
``signing.check_manifest``); both go through the dataclasses here. A bundle is written into a
temporary sibling directory and renamed into place (``fsutil.staged_dir``), so a failed run
leaves nothing behind. Export of adapter i: r = k, lora_A = V.T, lora_B = U @ S_i (diag:
U * s_i), lora_alpha = k (scaling 1), the source adapters' target modules and layout flags.

torch is imported lazily: the manifest types serve the registry, which never loads tensors.
"""

from __future__ import annotations

import hmac
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from soppu_client.format.errors import BundleError, InputError, VerificationError
from soppu_client.format.fsutil import file_digest, staged_dir
from soppu_client.format.names import (
    ADAPTER_NAME_RE,
    BASIS,
    BUNDLE_FORMAT,
    HEX64_RE,
    MANIFEST,
    SIGNATURE,
    basis_key,
    core_path,
)

if TYPE_CHECKING:
    import torch

ExpectedTensors = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype, shape), as ``validate_safetensors(expected=...)`` takes it."""

STORAGE_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""Manifest ``dtype`` values -> the safetensors dtype of every tensor in the bundle."""
METHODS = ("full", "diag")
_PEFT_KEYS_KEPT = ("target_modules", "fan_in_fan_out", "task_type", "layers_to_transform", "layers_pattern")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest / CLI dtype name (``float32``, ``bfloat16``, ``float16``)."""
    import torch

    if name not in STORAGE_DTYPES:
        raise InputError(f"dtype `{name}` is not one of {', '.join(STORAGE_DTYPES)}")
    return getattr(torch, name)


def canonical_dumps(obj: Any) -> str:
    """Deterministic JSON text for files we write (sorted keys, indented, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def is_safe_relpath(rel: object) -> bool:
    """A plain relative POSIX path inside a bundle: no leading '/', no '..', '.', '' or '\\'."""
    return (isinstance(rel, str) and bool(rel) and not rel.startswith("/") and "\\" not in rel
            and not any(part in ("", ".", "..") for part in rel.split("/")))


# --------------------------------------------------------------------------- manifest types


def _is_int(v: object, minimum: int = 0) -> bool:
    return type(v) is int and v >= minimum


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class FileEntry:
    """One listed file: sha256 (64 lower-case hex) and size in bytes."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of the bundle: its core file, cluster, and the source adapter's rank and alpha."""

    core: str
    cluster: int = 0
    source_rank: int | None = None
    alpha: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"core": self.core, "cluster": self.cluster}
        if self.source_rank is not None:
            out["source_rank"] = self.source_rank
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


@dataclass(frozen=True)
class Sizes:
    """Parameter and byte counts of a bundle against its source adapters.

    ``params_basis``: parameters of the bundle's bases (all clusters); ``basis_reused``: the basis
    was taken from another bundle (``soppu project``), so ``params_after`` (what this bundle adds)
    is the cores alone, else bases + cores. ``param_ratio`` = before / after. ``source_bytes``:
    the source adapters' weight files; ``tensor_bytes``: the tensors this bundle adds, as stored;
    the byte fields are None only in bundles written before they were recorded.
    """

    params_before: int
    params_basis: int
    params_cores: int
    basis_reused: bool = False
    source_bytes: int | None = None
    tensor_bytes: int | None = None

    @property
    def params_after(self) -> int:
        return self.params_cores + (0 if self.basis_reused else self.params_basis)

    @property
    def param_ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def byte_ratio(self) -> float | None:
        if self.source_bytes is None or not self.tensor_bytes:
            return None
        return self.source_bytes / self.tensor_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "params_basis": self.params_basis, "params_cores": self.params_cores,
            "param_ratio": self.param_ratio, "basis_reused": self.basis_reused,
            "source_bytes": self.source_bytes, "tensor_bytes": self.tensor_bytes, "byte_ratio": self.byte_ratio,
        }

    @classmethod
    def from_json(cls, data: object, label: str) -> Sizes:
        """Parse ``metrics.sizes``; bundles from before ``basis_reused`` named a reused basis
        ``params_basis_reused``. BundleError names the bad field."""
        if not isinstance(data, dict):
            raise BundleError(f"{label}: `metrics.sizes` is not an object")
        reused = "params_basis_reused" in data and "params_basis" not in data
        basis = data.get("params_basis_reused" if reused else "params_basis")
        values = {"params_before": data.get("params_before"), "params_basis": basis,
                  "params_cores": data.get("params_cores")}
        bad = [k for k, v in values.items() if not _is_int(v)]
        bad += [k for k in ("source_bytes", "tensor_bytes") if data.get(k) is not None and not _is_int(data[k])]
        if bad:
            raise BundleError(f"{label}: `metrics.sizes.{bad[0]}` is missing or not a non-negative integer")
        return cls(**values, basis_reused=bool(data.get("basis_reused", reused)),
                   source_bytes=data.get("source_bytes"), tensor_bytes=data.get("tensor_bytes"))


@dataclass(frozen=True)
class BundleMetrics:
    """The manifest's ``metrics`` section: ``summary`` and ``layers`` as ``metrics.summarize``
    computes them (unsquared relative Frobenius errors), and the sizes."""

    summary: dict[str, Any]
    layers: list[dict[str, Any]]
    sizes: Sizes

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "layers": self.layers, "sizes": self.sizes.to_json()}

    @classmethod
    def from_json(cls, data: object, label: str) -> BundleMetrics | None:
        """Parse the section; None when a bundle carries no metrics (an empty or absent section)."""
        if data is None or data == {}:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("summary"), dict) \
                or not isinstance(data.get("layers"), list):
            raise BundleError(f"{label}: `metrics` needs a `summary` object, a `layers` list and `sizes`")
        return cls(summary=data["summary"], layers=data["layers"], sizes=Sizes.from_json(data.get("sizes"), label))


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a bundle, parsed and checked. ``modules``: module -> (d_out, d_in)."""

    base_model: str
    method: str
    rank: int
    dtype: str
    clusters: int
    modules: dict[str, tuple[int, int]]
    adapters: dict[str, AdapterEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: BundleMetrics | None = None
    format: str = BUNDLE_FORMAT

    @property
    def diag(self) -> bool:
        return self.method == "diag"

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def adapter(self, name: str, label: str = "bundle") -> AdapterEntry:
        """The entry of adapter ``name``; InputError lists the adapters there are."""
        try:
            return self.adapters[name]
        except KeyError:
            raise InputError(f"{label} has no adapter `{name}`; it has: {', '.join(self.adapters)}") from None

    def expected_tensors(self, rel: str) -> ExpectedTensors | None:
        """The tensors (name -> (dtype, shape)) file ``rel`` must hold: the bases U/V of every
        module and cluster in basis.safetensors, "<module>.S" in each adapter's core file; None for
        a file that holds no tensors the manifest implies."""
        dtype, k = STORAGE_DTYPES[self.dtype], self.rank
        if rel == BASIS:
            out: ExpectedTensors = {}
            for module, (d_out, d_in) in self.modules.items():
                for c in range(self.clusters):
                    out[basis_key(module, "U", c, self.clusters)] = (dtype, (d_out, k))
                    out[basis_key(module, "V", c, self.clusters)] = (dtype, (d_in, k))
            return out
        if rel in {a.core for a in self.adapters.values()}:
            return {f"{module}.S": (dtype, (k,) if self.diag else (k, k)) for module in self.modules}
        return None

    def to_json(self) -> dict[str, Any]:
        """The manifest.json object (written with :func:`canonical_dumps`)."""
        out: dict[str, Any] = {
            "format": self.format, "base_model": self.base_model, "method": self.method, "rank": self.rank,
            "dtype": self.dtype, "clusters": self.clusters, "peft": self.peft, "fit": self.fit,
            "modules": {m: {"shape": list(s)} for m, s in self.modules.items()},
            "adapters": {n: a.to_json() for n, a in self.adapters.items()},
            "files": {rel: f.to_json() for rel, f in self.files.items()},
        }
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_json()
        return out

    @classmethod
    def from_json(cls, data: object, label: str = MANIFEST) -> Manifest:
        """Parse and check a manifest.json object; one BundleError lists every problem."""
        if not isinstance(data, dict):
            raise BundleError(f"{label} must hold a JSON object")
        missing = [k for k in ("format", "base_model", "method", "rank", "clusters", "modules", "adapters",
                               "files", "peft", "dtype") if k not in data]
        if missing:
            raise BundleError(f"{label} lacks the field(s) {', '.join(missing)}")
        p: list[str] = []
        if data["format"] != BUNDLE_FORMAT:
            p.append(f"format is `{data['format']}`, expected `{BUNDLE_FORMAT}`")
        if not isinstance(data["base_model"], str) or not data["base_model"]:
            p.append("`base_model` is not a non-empty string")
        if data["method"] not in METHODS:
            p.append(f"method `{data['method']}` is not `full` or `diag`")
        if not _is_int(data["rank"], 1):
            p.append(f"`rank` {data['rank']!r} is not a positive integer")
        if not _is_int(data["clusters"], 1):
            p.append(f"`clusters` {data['clusters']!r} is not a positive integer")
        if data["dtype"] not in STORAGE_DTYPES:
            p.append(f"`dtype` {data['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}")
        for key in ("peft", "fit"):
            if not isinstance(data.get(key, {}), dict):
                p.append(f"`{key}` is not an object")
        modules = _parse_modules(data["modules"], p)
        if _is_int(data["rank"], 1):
            _check_rank_fits(data["rank"], modules, p)
        files = _parse_files(data["files"], p)
        adapters = _parse_adapters(data["adapters"], files, data["clusters"], p)
        if p:
            raise BundleError(f"{label} is invalid:\n" + "\n".join(f"  - {x}" for x in p))
        return cls(base_model=data["base_model"], method=data["method"], rank=data["rank"], dtype=data["dtype"],
                   clusters=data["clusters"], modules=modules, adapters=adapters, files=files,
                   peft=data["peft"], fit=data.get("fit", {}),
                   metrics=BundleMetrics.from_json(data.get("metrics"), label), format=data["format"])


def _parse_modules(raw: object, p: list[str]) -> dict[str, tuple[int, int]]:
    if not isinstance(raw, dict) or not raw:
        p.append("`modules` is not a non-empty object")
        return {}
    out = {}
    for module, meta in raw.items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d, 1) for d in shape)):
            p.append(f"module `{module}` needs `shape` [d_out, d_in] of positive integers, not {shape!r}")
            continue
        out[module] = (shape[0], shape[1])
    return out


def _check_rank_fits(rank: int, modules: dict[str, tuple[int, int]], p: list[str]) -> None:
    """``rank`` <= min(d_out, d_in) of every module: a larger k adds nothing a rank-min(d_out, d_in)
    basis cannot express, only bytes (a k x k core per adapter, d x k PEFT factors on export)."""
    too_small = [f"`{m}` ({d_out} x {d_in})" for m, (d_out, d_in) in modules.items() if rank > min(d_out, d_in)]
    if too_small:
        more = f" and {len(too_small) - 1} more" if len(too_small) > 1 else ""
        p.append(f"`rank` {rank} exceeds min(d_out, d_in) of module {too_small[0]}{more}")


def _parse_files(raw: object, p: list[str]) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        p.append("`files` is not an object")
        return {}
    out = {}
    for rel, meta in raw.items():
        if not is_safe_relpath(rel) or rel in (MANIFEST, SIGNATURE):
            p.append(f"file path {rel!r} is not a plain relative path of a bundle file")
        elif not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and HEX64_RE.match(meta["sha256"])
                  and _is_int(meta.get("size"))):
            p.append(f"file `{rel}` needs `sha256` (64 lower-case hex) and `size` (bytes), not {meta!r}")
        else:
            out[rel] = FileEntry(sha256=meta["sha256"], size=meta["size"])
    if isinstance(raw, dict) and BASIS not in raw:
        p.append(f"`files` does not list {BASIS}")
    return out


def _parse_adapters(raw: object, files: dict[str, FileEntry], clusters: object,
                    p: list[str]) -> dict[str, AdapterEntry]:
    if not isinstance(raw, dict):
        p.append("`adapters` is not an object")
        return {}
    out = {}
    for name, entry in raw.items():
        core = entry.get("core") if isinstance(entry, dict) else None
        if not ADAPTER_NAME_RE.match(name) or core != core_path(name):
            p.append(f"adapter `{name}` has an invalid name or core path `{core}`")
            continue
        if core not in files:
            p.append(f"core file of adapter `{name}` is not listed in `files`")
        cluster = entry.get("cluster", 0)
        if not _is_int(cluster) or (_is_int(clusters, 1) and cluster >= clusters):
            p.append(f"adapter `{name}`: `cluster` {cluster!r} is not one of the bundle's {clusters} cluster(s)")
            continue
        rank, alpha = entry.get("source_rank"), entry.get("alpha")
        if (rank is not None and not _is_int(rank, 1)) or (alpha is not None and not _is_num(alpha)):
            p.append(f"adapter `{name}`: `source_rank` {rank!r} / `alpha` {alpha!r} are not numbers")
            continue
        out[name] = AdapterEntry(core=core, cluster=cluster, source_rank=rank, alpha=alpha)
    return out


# --------------------------------------------------------------------------- writing


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
        self.shapes: dict[str, tuple[int, int]] = {}

    def add_module(self, module: str, U: list[torch.Tensor], V: list[torch.Tensor], cores: torch.Tensor) -> None:
        self.shapes[module] = (int(U[0].shape[0]), int(V[0].shape[0]))
        for c in range(self.n_clusters if self.reuse_basis is None else 0):
            self.basis[basis_key(module, "U", c, self.n_clusters)] = U[c].to(self.dtype).contiguous()
            self.basis[basis_key(module, "V", c, self.n_clusters)] = V[c].to(self.dtype).contiguous()
        for i, name in enumerate(self.names):
            self.cores[name][f"{module}.S"] = cores[i].to(self.dtype).contiguous()

    def tensor_bytes(self) -> int:
        """Bytes of tensor payload this bundle adds (basis unless reused, all cores), as stored."""
        tensors = [*self.basis.values(), *(t for c in self.cores.values() for t in c.values())]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def write(self, out: Path, manifest: Manifest, *, extra_files: dict[str, bytes] | None = None,
              force: bool = False) -> Manifest:
        """Write basis, cores, ``extra_files`` and ``manifest`` (with every file's digest filled
        in) to ``out`` all-or-nothing; return the manifest as written."""
        from safetensors.torch import save_file

        with staged_dir(out, force=force) as tmp:
            (tmp / "cores").mkdir()
            if self.reuse_basis is not None:
                shutil.copyfile(self.reuse_basis, tmp / BASIS)
            else:
                save_file(self.basis, str(tmp / BASIS), metadata={"format": BUNDLE_FORMAT})
            for name, tensors in self.cores.items():
                save_file(tensors, str(tmp / core_path(name)), metadata={"format": BUNDLE_FORMAT})
            for rel, data in (extra_files or {}).items():
                (tmp / rel).write_bytes(data)
            files = {}
            for rel in [BASIS, *(core_path(n) for n in self.names), *(extra_files or {})]:
                digest, size = file_digest(tmp / rel)
                files[rel] = FileEntry(sha256=digest, size=size)
            manifest = replace(manifest, files=files)
            (tmp / MANIFEST).write_text(canonical_dumps(manifest.to_json()), encoding="utf-8")
        return manifest


# --------------------------------------------------------------------------- reading


@dataclass
class Bundle:
    """A bundle directory opened for reading; tensors are read on demand (the basis once)."""

    path: Path
    manifest: Manifest
    _basis: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, *, verify_digests: bool = True) -> Bundle:
        """Read and check manifest.json; with ``verify_digests`` also every file's size and sha256."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path} is not a SOPPU bundle: {MANIFEST} is missing")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc})") from None
        bundle = cls(path=path, manifest=Manifest.from_json(data, str(mpath)))
        if verify_digests:
            bundle.verify_files()
        return bundle

    # -- manifest views -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.manifest.rank

    @property
    def diag(self) -> bool:
        return self.manifest.diag

    @property
    def n_clusters(self) -> int:
        return self.manifest.clusters

    @property
    def names(self) -> list[str]:
        return self.manifest.names

    @property
    def modules(self) -> list[str]:
        return list(self.manifest.modules)

    def cluster_of(self, name: str) -> int:
        return self.adapter_entry(name).cluster

    def adapter_entry(self, name: str) -> AdapterEntry:
        return self.manifest.adapter(name, f"bundle {self.path}")

    # -- files ----------------------------------------------------------------------------
    def verify_files(self) -> None:
        """Every listed file exists with the listed size and sha256 (constant-time compare)."""
        for rel, meta in self.manifest.files.items():
            p = self.path / rel
            if not p.is_file():
                raise VerificationError(f"bundle {self.path}: file {rel} listed in the manifest is missing",
                                        code="files_mismatch")
            size = p.stat().st_size
            if size != meta.size:
                raise VerificationError(f"bundle {self.path}: {rel} is {size} bytes, the manifest says {meta.size}",
                                        code="files_mismatch")
            digest = file_digest(p)[0]
            if not hmac.compare_digest(digest, meta.sha256):
                raise VerificationError(
                    f"bundle {self.path}: {rel} has sha256 {digest}, the manifest says {meta.sha256}",
                    code="files_mismatch")

    def _load(self, rel: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from soppu_client.format.safetensors_check import validate_safetensors

        validate_safetensors(self.path / rel, expected=self.manifest.expected_tensors(rel))
        return load_file(str(self.path / rel))

    def load_basis(self) -> dict[str, torch.Tensor]:
        """All basis tensors (validated, read once per Bundle), keyed as :func:`basis_key` names them."""
        if self._basis is None:
            self._basis = self._load(BASIS)
        return self._basis

    def load_cores(self, name: str) -> dict[str, torch.Tensor]:
        return self._load(self.adapter_entry(name).core)

    def bases(self, module: str, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, k], V [d_in, k]) of ``module`` for ``cluster``, in the stored dtype."""
        if module not in self.manifest.modules or not 0 <= cluster < self.n_clusters:
            raise InputError(f"bundle {self.path} has no basis for module `{module}`, cluster {cluster}")
        basis = self.load_basis()
        return (basis[basis_key(module, "U", cluster, self.n_clusters)],
                basis[basis_key(module, "V", cluster, self.n_clusters)])

    def delta_factors(self, name: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield (module, lora_A = V.T [k, d_in], lora_B = U S [d_out, k]) for adapter ``name`` (float32)."""
        cores = self.load_cores(name)
        c = self.cluster_of(name)
        for module in self.modules:
            U, V = (x.float() for x in self.bases(module, c))
            S = cores[f"{module}.S"].float()
            B = U * S if self.diag else U @ S
            yield module, V.T.contiguous(), B.contiguous()


# --------------------------------------------------------------------------- PEFT


def peft_config_for(bundle: Bundle) -> dict[str, Any]:
    """adapter_config.json of an exported adapter: r = k, lora_alpha = k (scaling 1)."""
    k = bundle.rank
    peft = bundle.manifest.peft
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": bundle.manifest.base_model,
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


def export_peft(bundle: Bundle | str | Path, name: str, out_dir: str | Path, *, dtype: str = "float32",
                force: bool = False) -> Path:
    """Write adapter ``name`` as a standard PEFT LoRA dir (atomic). Returns ``out_dir``."""
    from safetensors.torch import save_file

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    tdtype = torch_dtype(dtype)
    out = Path(out_dir)
    if out.exists() and not force:  # before any tensor work
        raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
    tensors = {}
    for module, lora_a, lora_b in bundle.delta_factors(name):
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.to(tdtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.to(tdtype)
    with staged_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(canonical_dumps(peft_config_for(bundle)), encoding="utf-8")
    return out


def peft_fields(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The PEFT fields a bundle keeps from its source adapters (taken from the first one;
    the collection validator has already checked the adapters agree on modules)."""
    first = configs[0]
    out = {k: first.get(k) for k in _PEFT_KEYS_KEPT if first.get(k) is not None}
    tm = out.get("target_modules")
    if isinstance(tm, (list, set, tuple)):
        out["target_modules"] = sorted(tm)
    return out
