"""The on-disk bundle (format ``soppu-bundle/1``), its typed manifest, and export to PEFT.

    <bundle>/manifest.json                  format, base model, method, rank, modules + shapes,
                                            clusters, adapters, per-file sha256 and size, metrics
    <bundle>/basis.safetensors              "<module>.U" [d_out, k], "<module>.V" [d_in, k]
                                            (several clusters: "<module>.c<j>.U" / ".V")
    <bundle>/cores/<adapter>.safetensors    "cores" / "cores.q" / "cores.scale": every module's core S
                                            ([k, k] full, [k] diag) packed (``"cores_layout":
                                            "packed"``, ``packed_cores.py``); bundles written before
                                            it: "<module>.S" per module (``"per-module"``)
    <bundle>/metrics.json                   per-module, per-adapter errors and SVD lower bounds
    <bundle>/signature.json                 added by ``soppu sign`` (not listed in "files")

manifest.json has one producer (``soppu_client.compress.pipeline``, through :class:`BundleBuilder`)
and one reader (:meth:`Manifest.from_json`, used by :meth:`Bundle.open` and by
``signing.check_manifest``); both go through the dataclasses here. A bundle is written into a
temporary sibling directory and renamed into place (``fsutil.staged_dir``), so a failed run
leaves nothing behind. Export of adapter i: r = k, lora_A = V.T, lora_B = U @ S_i (diag:
U * s_i), lora_alpha = k (scaling 1), the source adapters' target modules and layout flags.

Per-module ranks and low-bit storage (optional, same format tag): ``modules[m].rank`` is module
m's k (default: the bundle's ``rank``, which is then the largest k), and ``modules[m].quant``
``{"basis": {"bits", "group_size"}, "cores": {...}}`` stores that role's tensors as packed codes
plus fp16 scales ("<name>.q", "<name>.scale"; see ``quant.py``). Readers dequantize once, in
:meth:`Bundle.bases` / :meth:`Bundle.load_cores`; bundles without these fields read as before.

Sizes count bytes three ways (:class:`Sizes`): the tensors alone, the safetensors files (headers
included), and every file ``soppu compress`` writes (safetensors files, metrics.json and
manifest.json itself; signature.json, added later by ``soppu sign``, is not counted). The writer
records them exactly (``file_bytes`` includes the manifest's own size: a fixed point, see
:meth:`BundleBuilder.write`).

torch is imported lazily: the manifest types serve the registry, which never loads tensors.
"""

from __future__ import annotations

import hmac
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeGuard, cast

from soppu_client.format.errors import BundleError, InputError, VerificationError
from soppu_client.format.file_bytes import safetensors_file_bytes
from soppu_client.format.fsutil import file_digest, staged_dir
from soppu_client.format.names import (
    ADAPTER_NAME_RE,
    BASIS,
    BUNDLE_FORMAT,
    HEX64_RE,
    MANIFEST,
    METRICS,
    SIGNATURE,
    basis_key,
    core_path,
)
from soppu_client.format.packed_cores import (
    CORES_LAYOUTS,
    PACKED,
    SCALES_KEY,
    Segment,
    core_segments,
    pack_cores,
    packed_entries,
    scale_slices,
    unpack_cores,
)
from soppu_client.format.quant import (
    ROLES,
    SCALE_DTYPE,
    QTensor,
    QuantSpec,
    dequantize,
    matrix_view,
    quant_keys,
    scale_problem,
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
    return cast("torch.dtype", getattr(torch, name))


def canonical_dumps(obj: Any) -> str:
    """Deterministic JSON text for files we write (sorted keys, indented, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def is_safe_relpath(rel: object) -> TypeGuard[str]:
    """A plain relative POSIX path inside a bundle: no leading '/', no '..', '.', '' or '\\'."""
    return (isinstance(rel, str) and bool(rel) and not rel.startswith("/") and "\\" not in rel
            and not any(part in ("", ".", "..") for part in rel.split("/")))


def stored_entries(name: str, shape: tuple[int, ...], spec: QuantSpec | None, role: str,
                   float_dtype: str) -> ExpectedTensors:
    """Safetensors entries storing the float tensor ``name`` of ``shape`` (role ``basis`` /
    ``cores``): itself at ``float_dtype`` (a safetensors dtype), or its codes and scales."""
    if spec is None:
        return {name: (float_dtype, shape)}
    rows, cols = matrix_view(shape, role)
    q, s = quant_keys(name)
    return {q: ("U8", (spec.packed_len(rows, cols),)), s: (SCALE_DTYPE, spec.scale_shape(rows, cols))}


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
    is the cores alone, else bases + cores. ``param_ratio`` = before / after.

    Bytes, each of what this bundle adds (with a reused basis, basis.safetensors is left out):
    ``tensor_bytes`` the tensor data as stored; ``safetensors_bytes`` the safetensors files,
    headers included; ``file_bytes`` every file ``soppu compress`` writes: the safetensors
    files, metrics.json and manifest.json (signature.json, added by ``soppu sign``, is not
    counted). ``source_bytes``: the source adapters' weight files; ``source_bf16_bytes``: their
    tensors at bf16 (2 * params_before). Each ratio is source / bundle; ``bf16_byte_ratio`` is the
    file-byte one, what ``--budget Nx`` bounds. Fields are None in bundles written before they
    were recorded (tensor bytes only: before ``safetensors_bytes`` / ``file_bytes``).
    """

    params_before: int
    params_basis: int
    params_cores: int
    basis_reused: bool = False
    source_bytes: int | None = None
    tensor_bytes: int | None = None
    source_bf16_bytes: int | None = None
    safetensors_bytes: int | None = None
    file_bytes: int | None = None

    @staticmethod
    def _ratio(a: int | None, b: int | None) -> float | None:
        return a / b if a and b else None

    @property
    def tensor_bf16_ratio(self) -> float | None:
        """Source tensors at bf16 / this bundle's tensor bytes (headers and JSON not counted)."""
        return self._ratio(self.source_bf16_bytes, self.tensor_bytes)

    @property
    def safetensors_bf16_ratio(self) -> float | None:
        """Source tensors at bf16 / this bundle's safetensors files (headers counted)."""
        return self._ratio(self.source_bf16_bytes, self.safetensors_bytes)

    @property
    def file_bf16_ratio(self) -> float | None:
        """Source tensors at bf16 / every file of this bundle."""
        return self._ratio(self.source_bf16_bytes, self.file_bytes)

    @property
    def bf16_byte_ratio(self) -> float | None:
        """Source tensor bytes at bf16 / this bundle's file bytes: what ``--budget Nx`` bounds."""
        return self.file_bf16_ratio

    @property
    def params_after(self) -> int:
        return self.params_cores + (0 if self.basis_reused else self.params_basis)

    @property
    def param_ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def byte_ratio(self) -> float | None:
        """Source adapter files / this bundle's files (file bytes against file bytes)."""
        return self._ratio(self.source_bytes, self.file_bytes)

    def to_json(self) -> dict[str, Any]:
        """``metrics.sizes`` of manifest.json: the counts, and the ratios that do not depend on
        ``file_bytes`` (which counts manifest.json itself: a ratio of it would make the manifest's
        size depend on a float's digits, with no fixed point; :meth:`report_json` adds them)."""
        out = {
            "params_before": self.params_before, "params_after": self.params_after,
            "params_basis": self.params_basis, "params_cores": self.params_cores,
            "param_ratio": self.param_ratio, "basis_reused": self.basis_reused,
            "source_bytes": self.source_bytes, "tensor_bytes": self.tensor_bytes,
        }
        if self.file_bytes is not None:
            out.update(safetensors_bytes=self.safetensors_bytes, file_bytes=self.file_bytes)
        if self.source_bf16_bytes is not None:
            out.update(source_bf16_bytes=self.source_bf16_bytes, tensor_bf16_ratio=self.tensor_bf16_ratio)
            if self.safetensors_bytes is not None:
                out.update(safetensors_bf16_ratio=self.safetensors_bf16_ratio)
        return out

    def report_json(self) -> dict[str, Any]:
        """:meth:`to_json` plus every ratio (what ``--json`` reports print)."""
        return {**self.to_json(), "byte_ratio": self.byte_ratio, "file_bf16_ratio": self.file_bf16_ratio,
                "bf16_byte_ratio": self.bf16_byte_ratio}

    @classmethod
    def from_json(cls, data: object, label: str) -> Sizes:
        """Parse ``metrics.sizes``; bundles from before ``basis_reused`` named a reused basis
        ``params_basis_reused``. BundleError names the bad field."""
        if not isinstance(data, dict):
            raise BundleError(f"{label}: `metrics.sizes` is not an object")
        reused = "params_basis_reused" in data and "params_basis" not in data
        basis = data.get("params_basis_reused" if reused else "params_basis")
        values: dict[str, Any] = {"params_before": data.get("params_before"), "params_basis": basis,
                  "params_cores": data.get("params_cores")}
        optional = ("source_bytes", "tensor_bytes", "source_bf16_bytes", "safetensors_bytes", "file_bytes")
        bad = [k for k, v in values.items() if not _is_int(v)]
        bad += [k for k in optional if data.get(k) is not None and not _is_int(data[k])]
        if bad:
            raise BundleError(f"{label}: `metrics.sizes.{bad[0]}` is missing or not a non-negative integer")
        extra: dict[str, Any] = {k: data.get(k) for k in optional}
        return cls(**values, basis_reused=bool(data.get("basis_reused", reused)), **extra)


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
    ranks: dict[str, int] = field(default_factory=dict)
    """module -> its k where it differs from ``rank``"""
    quant: dict[str, dict[str, QuantSpec]] = field(default_factory=dict)
    """module -> role (``basis`` / ``cores``) -> how it is stored; absent: float at ``dtype``"""
    cores_layout: str = "per-module"
    """how core files hold the cores: ``packed`` (``packed_cores.py``) or ``per-module`` (absent in
    the manifest: bundles written before ``packed``)"""

    @property
    def packed(self) -> bool:
        return self.cores_layout == PACKED

    def core_segments(self) -> list[Segment]:
        """Where each module's core lies in a packed core file (``packed_cores.core_segments``)."""
        return core_segments({m: self.core_shape(m) for m in self.modules},
                             {m: self.quant_spec(m, "cores") for m in self.modules})

    def is_core_file(self, rel: str) -> bool:
        return rel in {a.core for a in self.adapters.values()}

    def safetensors_bytes(self, rel: str) -> int | None:
        """Exact size of safetensors file ``rel`` as ``BundleBuilder`` writes it (header included),
        from the tensors this manifest implies (None for a file that holds none)."""
        expected = self.expected_tensors(rel)
        return None if expected is None else safetensors_file_bytes(expected, {"format": BUNDLE_FORMAT})

    @property
    def diag(self) -> bool:
        return self.method == "diag"

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def module_rank(self, module: str) -> int:
        """k of ``module`` (its own when the bundle has per-module ranks, else ``rank``)."""
        return self.ranks.get(module, self.rank)

    def served_params(self) -> int:
        """Parameters ONE adapter of this bundle becomes when a host materializes it as PEFT
        factors: sum over modules of k (d_out + d_in) (lora_A [k, d_in], lora_B [d_out, k]),
        whatever its core's size on the wire. With k <= min(d_out, d_in) it is at most twice the
        base weights the adapter targets; registries and hosts cap it (``--max-served-params``)."""
        return sum(self.module_rank(m) * (d_out + d_in) for m, (d_out, d_in) in self.modules.items())

    def quant_spec(self, module: str, role: str) -> QuantSpec | None:
        return self.quant.get(module, {}).get(role)

    def core_shape(self, module: str) -> tuple[int, ...]:
        k = self.module_rank(module)
        return (k,) if self.diag else (k, k)

    def stored_tensors(self, name: str, shape: tuple[int, ...], spec: QuantSpec | None, role: str) -> ExpectedTensors:
        """Entries that store the float tensor ``name`` of ``shape``: itself, or its codes and scales."""
        return stored_entries(name, shape, spec, role, STORAGE_DTYPES[self.dtype])

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
        out: ExpectedTensors = {}
        if rel == BASIS:
            for module, (d_out, d_in) in self.modules.items():
                k, spec = self.module_rank(module), self.quant_spec(module, "basis")
                for c in range(self.clusters):
                    out.update(self.stored_tensors(basis_key(module, "U", c, self.clusters), (d_out, k), spec, "basis"))
                    out.update(self.stored_tensors(basis_key(module, "V", c, self.clusters), (d_in, k), spec, "basis"))
            return out
        if self.is_core_file(rel):
            if self.packed:
                return packed_entries(self.core_segments(), STORAGE_DTYPES[self.dtype])
            for module in self.modules:
                out.update(self.stored_tensors(f"{module}.S", self.core_shape(module),
                                               self.quant_spec(module, "cores"), "cores"))
            return out
        return None

    def to_json(self) -> dict[str, Any]:
        """The manifest.json object (written with :func:`canonical_dumps`)."""
        out: dict[str, Any] = {
            "format": self.format, "base_model": self.base_model, "method": self.method, "rank": self.rank,
            "dtype": self.dtype, "clusters": self.clusters, "peft": self.peft, "fit": self.fit,
            "modules": {m: self._module_json(m) for m in self.modules},
            "adapters": {n: a.to_json() for n, a in self.adapters.items()},
            "files": {rel: f.to_json() for rel, f in self.files.items()},
        }
        if self.packed:
            out["cores_layout"] = self.cores_layout
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_json()
        return out

    def _module_json(self, module: str) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.modules[module])}
        if module in self.ranks:
            out["rank"] = self.ranks[module]
        if self.quant.get(module):
            out["quant"] = {role: spec.to_json() for role, spec in self.quant[module].items()}
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
        if data.get("cores_layout", CORES_LAYOUTS[0]) not in CORES_LAYOUTS:
            p.append(f"`cores_layout` {data['cores_layout']!r} is not one of {', '.join(CORES_LAYOUTS)}")
        if data["dtype"] not in STORAGE_DTYPES:
            p.append(f"`dtype` {data['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}")
        for key in ("peft", "fit"):
            if not isinstance(data.get(key, {}), dict):
                p.append(f"`{key}` is not an object")
        modules, ranks, quant = _parse_modules(data["modules"], p)
        if _is_int(data["rank"], 1):
            _check_rank_fits(data["rank"], modules, ranks, p)
        files = _parse_files(data["files"], p)
        adapters = _parse_adapters(data["adapters"], files, data["clusters"], p)
        _check_no_foreign_files(files, data["adapters"], p)
        if p:
            raise BundleError(f"{label} is invalid:\n" + "\n".join(f"  - {x}" for x in p))
        return cls(base_model=data["base_model"], method=data["method"], rank=data["rank"], dtype=data["dtype"],
                   clusters=data["clusters"], modules=modules, adapters=adapters, files=files,
                   peft=data["peft"], fit=data.get("fit", {}),
                   metrics=BundleMetrics.from_json(data.get("metrics"), label), format=data["format"],
                   ranks=ranks, quant=quant, cores_layout=data.get("cores_layout", CORES_LAYOUTS[0]))


def _parse_modules(raw: object, p: list[str]
                   ) -> tuple[dict[str, tuple[int, int]], dict[str, int], dict[str, dict[str, QuantSpec]]]:
    """modules -> (shapes, per-module ranks, per-module quantization); problems appended to ``p``."""
    if not isinstance(raw, dict) or not raw:
        p.append("`modules` is not a non-empty object")
        return {}, {}, {}
    out, ranks, quant = {}, {}, {}
    for module, meta in raw.items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d, 1) for d in shape)):
            p.append(f"module `{module}` needs `shape` [d_out, d_in] of positive integers, not {shape!r}")
            continue
        out[module] = (shape[0], shape[1])
        if "rank" in meta:
            if _is_int(meta["rank"], 1):
                ranks[module] = meta["rank"]
            else:
                p.append(f"module `{module}`: `rank` {meta['rank']!r} is not a positive integer")
        q = meta.get("quant", {})
        if not isinstance(q, dict) or set(q) - set(ROLES):
            p.append(f"module `{module}`: `quant` must be an object with keys among {', '.join(ROLES)}, not {q!r}")
            continue
        specs = {role: QuantSpec.parse(v, f"module `{module}` quant.{role}", p) for role, v in q.items()}
        if specs and all(specs.values()):
            quant[module] = cast("dict[str, QuantSpec]", specs)  # all() above: no None
    return out, ranks, quant


def _check_rank_fits(rank: int, modules: dict[str, tuple[int, int]], ranks: dict[str, int], p: list[str]) -> None:
    """Each module's k <= min(d_out, d_in) (a larger k adds nothing a rank-min(d_out, d_in) basis
    cannot express, only bytes) and <= the bundle's ``rank`` (the largest k)."""
    too_small = [(ranks.get(m, rank), f"`{m}` ({d_out} x {d_in})") for m, (d_out, d_in) in modules.items()
                 if ranks.get(m, rank) > min(d_out, d_in)]
    if too_small:
        more = f" and {len(too_small) - 1} more" if len(too_small) > 1 else ""
        p.append(f"`rank` {too_small[0][0]} exceeds min(d_out, d_in) of module {too_small[0][1]}{more}")
    p.extend(f"module `{m}`: `rank` {k} exceeds the bundle's `rank` {rank}" for m, k in ranks.items() if k > rank)


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


def bundle_file_paths(adapter_names: Iterable[str]) -> set[str]:
    """Every file a bundle of these adapters may list in ``files``: basis.safetensors, metrics.json
    and each adapter's core file (manifest.json and signature.json are never listed)."""
    return {BASIS, METRICS, *(core_path(n) for n in adapter_names)}


def _check_no_foreign_files(files: dict[str, FileEntry], adapters: object, p: list[str]) -> None:
    """A file that is not part of the format is refused: it would be signed and published bytes
    no reader checks (a way to keep arbitrary bytes on a registry past its unpublished quota)."""
    names = [n for n in adapters if isinstance(n, str)] if isinstance(adapters, dict) else []
    foreign = sorted(set(files) - bundle_file_paths(names))
    if foreign:
        p.append(f"`files` lists {', '.join(f'`{f}`' for f in foreign)}, which a bundle does not hold (only "
                 f"{BASIS}, {METRICS} and cores/<adapter>.safetensors of its adapters); remove "
                 f"{'it' if len(foreign) == 1 else 'them'}")


METRICS_BYTES_BASE = 64 << 10
"""metrics.json bytes allowed besides its per-(module, adapter) entries."""
METRICS_BYTES_PER_ENTRY = 1 << 10
"""metrics.json bytes allowed per (module, adapter) pair (a real entry, indented, is ~70 bytes)."""


def metrics_cap(m: Manifest) -> int:
    """Largest metrics.json a bundle with ``m``'s modules and adapters may have."""
    return METRICS_BYTES_BASE + METRICS_BYTES_PER_ENTRY * len(m.modules) * len(m.adapters)


def metrics_problems(data: object, m: Manifest) -> list[str]:
    """metrics.json (parsed) holds only what ``compress`` writes there, for ``m``'s own modules and
    adapters: ``{"error_definition": str, "modules": [{"module", "error": {adapter: number},
    "lower_bound": {adapter: number}}]}``. Empty when it does."""
    if not (isinstance(data, dict) and set(data) <= {"error_definition", "modules"}
            and isinstance(data.get("error_definition", ""), str) and len(data.get("error_definition", "")) <= 1024
            and isinstance(data.get("modules", []), list)):
        return [f"{METRICS} must be an object with `error_definition` (a short string) and `modules` (a list)"]
    problems = []
    for i, e in enumerate(data.get("modules", [])):
        if not (isinstance(e, dict) and set(e) == {"module", "error", "lower_bound"} and e["module"] in m.modules
                and all(isinstance(e[k], dict) and set(e[k]) <= set(m.adapters)
                        and all(_is_num(v) for v in e[k].values()) for k in ("error", "lower_bound"))):
            problems.append(f"{METRICS}: entry {i} is not {{module, error, lower_bound}} of this bundle's modules "
                            "and adapters with numbers")
            break
    return problems


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
    """Accumulates bases and cores module by module, then writes the bundle atomically.

    Core files are written in the packed layout (``cores_layout="packed"``, the default); the
    per-module layout of bundles written before it stays writable (``cores_layout="per-module"``)
    so tests can make such bundles with the same code path."""

    def __init__(self, names: list[str], rank: int, diag: bool, n_clusters: int, dtype: torch.dtype,
                 reuse_basis: Path | None = None, cores_layout: str = PACKED):
        """``reuse_basis``: copy this basis.safetensors byte for byte instead of writing one."""
        if cores_layout not in CORES_LAYOUTS:
            raise InputError(f"`cores_layout` {cores_layout!r} is not one of {', '.join(CORES_LAYOUTS)}")
        self.reuse_basis = reuse_basis
        self.names = names
        self.rank = rank
        self.diag = diag
        self.n_clusters = n_clusters
        self.dtype = dtype
        self.cores_layout = cores_layout
        self.basis: dict[str, torch.Tensor] = {}
        self.cores: dict[str, dict[str, torch.Tensor | QTensor]] = {n: {} for n in names}  # adapter -> module -> S
        self.shapes: dict[str, tuple[int, int]] = {}
        self.ranks: dict[str, int] = {}
        self.quant: dict[str, dict[str, QuantSpec]] = {}

    def _put(self, out: dict[str, torch.Tensor], name: str, value: torch.Tensor | QTensor) -> None:
        import torch

        if isinstance(value, QTensor):
            q, s = quant_keys(name)
            out[q] = torch.from_numpy(value.packed.copy())
            out[s] = torch.from_numpy(value.scale.astype("float16"))
        else:
            out[name] = value.to(self.dtype).contiguous()

    def add_module(self, module: str, U: list[torch.Tensor | QTensor], V: list[torch.Tensor | QTensor],
                   cores: torch.Tensor | list[QTensor]) -> None:
        """Store one module: float tensors at the builder's dtype, :class:`QTensor` as codes + scales.
        k of the module is U's column count (it may differ between modules)."""
        self.shapes[module] = (int(U[0].shape[0]), int(V[0].shape[0]))
        self.ranks[module] = int(U[0].shape[1])
        specs = {role: x[0].spec for role, x in (("basis", U), ("cores", cores)) if isinstance(x[0], QTensor)}
        if specs:
            self.quant[module] = specs
        for c in range(self.n_clusters if self.reuse_basis is None else 0):
            self._put(self.basis, basis_key(module, "U", c, self.n_clusters), U[c])
            self._put(self.basis, basis_key(module, "V", c, self.n_clusters), V[c])
        for i, name in enumerate(self.names):
            self.cores[name][module] = cores[i]

    def manifest_fields(self) -> dict[str, Any]:
        """``rank`` (the largest k), per-module ``ranks`` where they differ from it, ``quant``, ``cores_layout``."""
        top = max(self.ranks.values())
        return {"rank": top, "ranks": {m: k for m, k in self.ranks.items() if k != top}, "quant": dict(self.quant),
                "cores_layout": self.cores_layout}

    def _core_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter ``name``'s core file, in this builder's layout."""
        cores = self.cores[name]
        if self.cores_layout == PACKED:
            shapes = {m: tuple(c.shape) for m, c in cores.items()}
            specs = {m: c.spec if isinstance(c, QTensor) else None for m, c in cores.items()}
            return pack_cores(core_segments(shapes, specs), cores, self.dtype)
        out: dict[str, torch.Tensor] = {}
        for module, value in cores.items():
            self._put(out, f"{module}.S", value)
        return out

    def tensor_bytes(self) -> int:
        """Bytes of tensor payload this bundle adds (basis unless reused, all cores), as stored."""
        tensors = [*self.basis.values(), *(t for n in self.names for t in self._core_tensors(n).values())]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def write(self, out: Path, manifest: Manifest, *, extra_files: dict[str, bytes] | None = None,
              force: bool = False) -> Manifest:
        """Write basis, cores, ``extra_files`` and ``manifest`` (with every file's digest filled
        in) to ``out`` all-or-nothing; return the manifest as written.

        With metrics, the manifest's ``sizes`` get ``safetensors_bytes`` and ``file_bytes`` of
        what this bundle adds (a reused basis is not counted). ``file_bytes`` includes
        manifest.json itself: n = listed files + len(manifest naming n). The manifest's length
        depends on n only through its digits (no ratio of it is stored), so iterating from 0
        rises to the fixed point in a few rounds."""
        from safetensors.torch import save_file

        with staged_dir(out, force=force) as tmp:
            (tmp / "cores").mkdir()
            if self.reuse_basis is not None:
                shutil.copyfile(self.reuse_basis, tmp / BASIS)
            else:
                save_file(self.basis, str(tmp / BASIS), metadata={"format": BUNDLE_FORMAT})
            for name in self.names:
                save_file(self._core_tensors(name), str(tmp / core_path(name)), metadata={"format": BUNDLE_FORMAT})
            for rel, data in (extra_files or {}).items():
                (tmp / rel).write_bytes(data)
            files = {}
            for rel in [BASIS, *(core_path(n) for n in self.names), *(extra_files or {})]:
                digest, size = file_digest(tmp / rel)
                files[rel] = FileEntry(sha256=digest, size=size)
            manifest = replace(manifest, files=files)
            text = canonical_dumps(manifest.to_json())
            if manifest.metrics is not None:
                reused = manifest.metrics.sizes.basis_reused  # the basis is another bundle's: not counted
                counted = {rel: f.size for rel, f in files.items() if not (rel == BASIS and reused)}
                st = sum(size for rel, size in counted.items() if rel.endswith(".safetensors"))
                total, seen = sum(counted.values()), 0
                while True:
                    sizes = replace(manifest.metrics.sizes, safetensors_bytes=st, file_bytes=total + seen)
                    manifest = replace(manifest, metrics=replace(manifest.metrics, sizes=sizes))
                    text = canonical_dumps(manifest.to_json())
                    n = len(text.encode("utf-8"))
                    if n == seen:
                        break
                    seen = n
            (tmp / MANIFEST).write_text(text, encoding="utf-8")
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
        """The float tensors of file ``rel`` (validated; quantized ones checked and dequantized)."""
        from safetensors.torch import load_file

        from soppu_client.format.safetensors_check import validate_safetensors

        validate_safetensors(self.path / rel, expected=self.manifest.expected_tensors(rel))
        raw = load_file(str(self.path / rel))
        check_scales(self.manifest, rel, raw, f"bundle {self.path}")
        return dequantize_file(self.manifest, rel, raw)

    def load_basis(self) -> dict[str, torch.Tensor]:
        """All basis tensors (validated, dequantized, read once per Bundle), keyed as :func:`basis_key` names them."""
        if self._basis is None:
            self._basis = self._load(BASIS)
        return self._basis

    def load_cores(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s cores {"<module>.S": [k_m, k_m] or [k_m]} (dequantized: float32)."""
        return self._load(self.adapter_entry(name).core)

    def bases(self, module: str, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d_out, k], V [d_in, k]) of ``module`` for ``cluster``, in the stored dtype (float32 if quantized)."""
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


# --------------------------------------------------------------------------- quantized tensors


def _quantized_entries(manifest: Manifest, rel: str) -> Iterator[tuple[str, str, str, tuple[int, ...], QuantSpec]]:
    """(module, tensor name, role, logical shape, spec) of each quantized tensor file ``rel`` holds."""
    for module, (d_out, d_in) in manifest.modules.items():
        k = manifest.module_rank(module)
        if rel == BASIS and (spec := manifest.quant_spec(module, "basis")) is not None:
            for c in range(manifest.clusters):
                yield module, basis_key(module, "U", c, manifest.clusters), "basis", (d_out, k), spec
                yield module, basis_key(module, "V", c, manifest.clusters), "basis", (d_in, k), spec
        elif rel != BASIS and (spec := manifest.quant_spec(module, "cores")) is not None:
            yield module, f"{module}.S", "cores", manifest.core_shape(module), spec


def _packed_core_file(manifest: Manifest, rel: str) -> bool:
    return manifest.packed and manifest.is_core_file(rel)


def scale_tensor_names(manifest: Manifest, rel: str) -> list[str]:
    """Names of the scale tensors file ``rel`` holds (none for a bundle without quantization)."""
    if _packed_core_file(manifest, rel):
        return [SCALES_KEY] if any(s.spec for s in manifest.core_segments()) else []
    return [quant_keys(name)[1] for _m, name, _r, _s, _q in _quantized_entries(manifest, rel)]


def check_scales(manifest: Manifest, rel: str, tensors: dict[str, Any], label: str) -> None:
    """Every scale tensor of file ``rel`` is finite and > 0 (``tensors``: name -> array-like, at
    least the scale tensors). One BundleError names the file, each bad tensor and its module."""
    import numpy as np

    problems = []
    if _packed_core_file(manifest, rel):
        if SCALES_KEY in tensors:
            t = tensors[SCALES_KEY]
            scales = t.float().numpy() if hasattr(t, "float") else np.asarray(t)
            problems = [f"module `{seg.module}`: `{SCALES_KEY}`[{seg.scale_offset}:{seg.scale_offset + seg.scale_size}]"
                        f" (cores scales) {why}" for seg, x in scale_slices(manifest.core_segments(), scales)
                        if (why := scale_problem(x))]
    for module, name, role, _shape, _spec in ([] if _packed_core_file(manifest, rel)
                                              else _quantized_entries(manifest, rel)):
        key = quant_keys(name)[1]
        if key not in tensors:
            continue  # presence, dtype and shape are validate_safetensors' (expected_tensors)
        t = tensors[key]
        why = scale_problem(t.float().numpy() if hasattr(t, "float") else np.asarray(t))
        if why:
            problems.append(f"module `{module}`: `{key}` ({role} scales) {why}")
    if problems:
        raise BundleError(f"{label}: {rel} has malformed quantization scales:\n"
                          + "\n".join(f"  - {x}" for x in problems)
                          + "\nre-run `soppu compress --bits ...` to write the bundle again")


def dequantize_file(manifest: Manifest, rel: str, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``raw`` with each quantized tensor's codes + scales replaced by its float32 values; a packed
    core file unpacked to ``{"<module>.S": tensor}`` (the per-module layout's names)."""
    import torch

    if _packed_core_file(manifest, rel):
        return unpack_cores(manifest.core_segments(), raw)
    out = dict(raw)
    for _module, name, role, shape, spec in _quantized_entries(manifest, rel):
        q, s = quant_keys(name)
        out[name] = torch.from_numpy(dequantize(out.pop(q).numpy(), out.pop(s).float().numpy(), spec, shape, role))
    return out


# --------------------------------------------------------------------------- PEFT


def peft_config_for(bundle: Bundle) -> dict[str, Any]:
    """adapter_config.json of an exported adapter: r = k, lora_alpha = k (scaling 1). With
    per-module ranks, r is the largest k and PEFT's ``rank_pattern`` / ``alpha_pattern`` give every
    other module its own k (alpha = k: scaling 1 everywhere); keys are the full module names."""
    k = bundle.rank
    peft = bundle.manifest.peft
    pattern = {m: r for m in bundle.modules if (r := bundle.manifest.module_rank(m)) != k}
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
        "rank_pattern": dict(pattern),
        "alpha_pattern": dict(pattern),
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
