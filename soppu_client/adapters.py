"""PEFT LoRA adapter directories -> per-module factors, with validation of the whole collection.

For each targeted module ("model.layers.3.self_attn.q_proj") and adapter i, PEFT stores
``lora_A`` [r_i, d_in] and ``lora_B`` [d_out, r_i]; the weight update is

    dW_i = s_i * B_i @ A_i,   s_i = alpha_i / r_i   (rsLoRA: alpha_i / sqrt(r_i))

with r_i and alpha_i possibly overridden per module by ``rank_pattern`` / ``alpha_pattern``.
:meth:`AdapterCollection.module_factors` returns ``(A_i, s_i * B_i)`` so that callers never see
the scaling again. ``fan_in_fan_out`` only changes the layout of the *base* weight; the LoRA
factors keep the shapes above, so dW_i is [d_out, d_in] either way and the flag is carried into
exports unchanged.

Tensors are read lazily with ``safe_open``: one module's factors for all adapters at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soppu_client.format.errors import AdapterValidationError, InputError, SafetensorsFormatError
from soppu_client.format.names import ADAPTER_NAME_RE

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key`` semantics: the first pattern matching the module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class AdapterInfo:
    """One validated PEFT LoRA adapter directory (metadata only; tensors stay on disk)."""

    name: str
    path: Path
    config: dict
    modules: dict[str, tuple[int, int, int]]  # module -> (d_out, d_in, rank)
    keys: dict[str, tuple[str, str]]  # module -> (lora_A key, lora_B key)
    dtypes: frozenset[str] = frozenset()  # safetensors dtypes of the factors, e.g. {"BF16"}

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or ""

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    def scaling(self, module: str) -> float:
        """The factor PEFT multiplies B @ A by for ``module``."""
        r = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.rank))
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.alpha))
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(r)
        return alpha / r

    @property
    def weights_path(self) -> Path:
        return self.path / _WEIGHTS


def default_adapter_name(path: Path) -> str:
    """The adapter's name in a bundle: its directory name."""
    return path.resolve().name


def _read_header(path: Path) -> dict:
    """Parse a safetensors header with the project's validator (structure only; values later)."""
    from soppu_client.format.safetensors_check import validate_safetensors

    return validate_safetensors(path, check_values=False)


def _inspect_adapter(name: str, path: Path, problems: list[str]) -> AdapterInfo | None:
    """Validate one adapter dir; append each problem (naming the adapter and the fix) to ``problems``."""
    where = f"adapter `{name}` ({path})"
    if not path.is_dir():
        problems.append(f"{where}: not a directory; pass a PEFT adapter directory")
        return None
    if not ADAPTER_NAME_RE.match(name):
        problems.append(
            f"{where}: name `{name}` is not allowed; use letters, digits, '.', '_' or '-' "
            "(at most 128 characters, starting with a letter or digit)"
        )
    pickles = [p for p in _PICKLE_NAMES if (path / p).exists()]
    if pickles and not (path / _WEIGHTS).exists():
        problems.append(
            f"{where}: {pickles[0]} is a pickle file and SOPPU refuses pickle weights; re-save the "
            "adapter with `save_pretrained(dir, safe_serialization=True)` to get adapter_model.safetensors"
        )
        return None
    if not (path / _CONFIG).is_file():
        problems.append(f"{where}: {_CONFIG} is missing; is this a PEFT adapter directory?")
        return None
    if not (path / _WEIGHTS).is_file():
        problems.append(f"{where}: {_WEIGHTS} is missing")
        return None
    try:
        config = json.loads((path / _CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{where}: {_CONFIG} is not valid JSON ({exc})")
        return None
    before = len(problems)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        problems.append(
            f"{where}: peft_type is `{config.get('peft_type')}`; only LORA adapters can be compressed"
        )
    if config.get("use_dora"):
        problems.append(f"{where}: DoRA adapters (use_dora=true) are not supported; train a plain LoRA")
    if config.get("modules_to_save"):
        problems.append(
            f"{where}: modules_to_save {config['modules_to_save']} holds full weights that SOPPU "
            "would drop; train without modules_to_save"
        )
    if str(config.get("bias", "none")) != "none":
        problems.append(f"{where}: bias=`{config.get('bias')}` adds bias weights; only bias='none' is supported")
    if len(problems) > before:
        return None
    try:
        header = _read_header(path / _WEIGHTS)
    except SafetensorsFormatError as exc:
        problems.append(f"{where}: {exc}")
        return None

    factors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    dtypes = frozenset(dtype for dtype, _ in header.values())
    for key, (dtype, shape) in header.items():
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            problems.append(f"{where}: tensor `{key}` is not a plain LoRA linear factor (embedding LoRA / DoRA)")
            continue
        m = _KEY_RE.match(key)
        if not m:
            problems.append(f"{where}: unexpected tensor `{key}`; only lora_A / lora_B weights are supported")
            continue
        factors.setdefault(m["module"], {})[m["which"]] = (key, tuple(shape))

    modules: dict[str, tuple[int, int, int]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for module in sorted(factors):
        pair = factors[module]
        missing = [w for w in ("A", "B") if w not in pair]
        if missing:
            problems.append(f"{where}: module `{module}` has no lora_{missing[0]} weight "
                            "(lora_A/lora_B must come in pairs)")
            continue
        (ka, sa), (kb, sb) = pair["A"], pair["B"]
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            problems.append(
                f"{where}: module `{module}` has lora_A {list(sa)} and lora_B {list(sb)}; "
                "expected [r, d_in] and [d_out, r]"
            )
            continue
        modules[module] = (sb[0], sa[1], sa[0])
        keys[module] = (ka, kb)
    if not modules and len(problems) == before:
        problems.append(f"{where}: {_WEIGHTS} holds no LoRA factors")
    return AdapterInfo(name=name, path=path, config=config, modules=modules, keys=keys, dtypes=dtypes)


@dataclass
class AdapterCollection:
    """A validated set of adapters for one base model with identical modules and shapes."""

    adapters: list[AdapterInfo]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (d_out, d_in)
    values_checked: bool = False  # every tensor was scanned for NaN/Inf by load_collection

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def modules(self) -> list[str]:
        return list(self.shapes)

    @property
    def base_model(self) -> str:
        return self.adapters[0].base_model

    @property
    def storage_dtype(self) -> str:
        """The bundle dtype that loses nothing the inputs had: bfloat16/float16 when every adapter
        stores that, else float32."""
        found = set().union(*(a.dtypes for a in self.adapters))
        return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(frozenset(found), "float32")

    def module_factors(self, module: str, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(A_i, s_i * B_i)]`` for ``module`` across all adapters, scaling folded into B."""
        from safetensors import safe_open

        out = []
        for info in self.adapters:
            ka, kb = info.keys[module]
            with safe_open(str(info.weights_path), framework="pt") as f:
                a = f.get_tensor(ka).float().numpy().astype(dtype, copy=False)
                b = f.get_tensor(kb).float().numpy().astype(dtype, copy=False)
            if not self.values_checked and not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise InputError(
                    f"adapter `{info.name}`: module `{module}` has NaN or Inf values in its LoRA "
                    "factors; retrain or fix the adapter"
                )
            out.append((a, b * dtype(info.scaling(module))))
        return out


def _check_values(info: AdapterInfo, problems: list[str]) -> None:
    """NaN/Inf anywhere in the adapter's tensors (one streaming pass)."""
    from soppu_client.format.safetensors_check import validate_safetensors

    try:
        validate_safetensors(info.weights_path, check_values=True)
    except SafetensorsFormatError as exc:
        problems.append(f"adapter `{info.name}` ({info.path}): {exc}")


def load_collection(
    paths: list[str | Path], names: list[str] | None = None, *, check_values: bool = True
) -> AdapterCollection:
    """Validate adapter dirs and return the collection, or raise every problem at once.

    Problems collected: unreadable dirs, pickle weights, non-LoRA / DoRA / modules_to_save / bias
    adapters, malformed safetensors, missing lora_A/lora_B pairs, NaN/Inf values, duplicate names,
    different base models, different target modules, and different shapes for the same module.
    """
    if not paths:
        raise InputError("no adapter directories given; pass one or more PEFT adapter dirs")
    paths = [Path(p) for p in paths]
    names = names or [default_adapter_name(p) for p in paths]
    problems: list[str] = []
    infos: list[AdapterInfo] = []
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        if name in seen:
            problems.append(
                f"adapter name `{name}` is used by both {seen[name]} and {path}; "
                "adapter names (directory names) must be unique"
            )
            continue
        seen[name] = path
        before = len(problems)
        info = _inspect_adapter(name, path, problems)
        if info is not None and check_values and len(problems) == before:
            _check_values(info, problems)
        if info is not None and len(problems) == before:  # cross-checks only between sound adapters
            infos.append(info)

    if infos:
        ref = infos[0]
        for info in infos[1:]:
            if info.base_model != ref.base_model:
                problems.append(
                    f"adapter `{info.name}` is for base model `{info.base_model}` but `{ref.name}` is for "
                    f"`{ref.base_model}`; compress adapters of one base model together"
                )
            only_here = sorted(set(info.modules) - set(ref.modules))
            only_ref = sorted(set(ref.modules) - set(info.modules))
            if only_here or only_ref:
                detail = []
                if only_ref:
                    detail.append(f"lacks {_few(only_ref)}")
                if only_here:
                    detail.append(f"has extra {_few(only_here)}")
                problems.append(
                    f"adapter `{info.name}` targets different modules than `{ref.name}`: "
                    f"{' and '.join(detail)}; compress adapters with the same target modules together"
                )
            for module in sorted(set(info.modules) & set(ref.modules)):
                if info.modules[module][:2] != ref.modules[module][:2]:
                    problems.append(
                        f"adapter `{info.name}`: module `{module}` is {list(info.modules[module][:2])} "
                        f"(d_out, d_in) but {list(ref.modules[module][:2])} in `{ref.name}`"
                    )
    if problems:
        raise AdapterValidationError(problems)
    ref = infos[0]
    shapes = {m: ref.modules[m][:2] for m in _module_order(ref.modules)}
    return AdapterCollection(adapters=infos, shapes=shapes, values_checked=check_values)


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(f"`{x}`" for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _module_order(modules) -> list[str]:
    """Sort module names with layer numbers compared as integers (layers.2 before layers.10)."""

    def key(name: str):
        return [int(p) if p.isdigit() else p for p in name.split(".")]

    return sorted(modules, key=key)
