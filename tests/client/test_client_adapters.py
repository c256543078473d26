"""Adapter loading: scaling folded exactly as PEFT applies it, and every refused input's message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from soppu_client.adapters import load_collection
from soppu_client.format.errors import AdapterValidationError


def test_factors_equal_peft_delta_weight(smollm2, peft_adapters):
    """B_i A_i with our folded scaling equals PEFT's own get_delta_weight (rsLoRA, rank/alpha patterns)."""
    from peft import PeftModel

    model, _ = smollm2
    collection = load_collection(peft_adapters)
    assert collection.names == ["alpha", "beta", "gamma"]
    for path in peft_adapters:
        pm = PeftModel.from_pretrained(model, str(path), adapter_name="x")
        try:
            checked = 0
            for module in ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "model.layers.11.self_attn.q_proj"]:
                layer = pm.base_model.model.get_submodule(module)
                reference = layer.get_delta_weight("x").double().numpy()
                idx = collection.names.index(path.name)
                A, B = collection.module_factors(module, dtype=np.float64)[idx]
                assert np.abs(reference).max() > 0
                np.testing.assert_allclose(B @ A, reference, rtol=1e-5, atol=1e-7)
                checked += 1
            assert checked == 3
        finally:
            pm.unload()
    # the rank pattern really gave a different rank to one module
    gamma = collection.adapters[2]
    assert gamma.modules["model.layers.1.self_attn.q_proj"][2] == 3
    assert gamma.modules["model.layers.2.self_attn.q_proj"][2] == 6


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_every_problem_reported_at_once(peft_adapters, tmp_path):
    good = peft_adapters[0]
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    shutil.copy(good / "adapter_config.json", pickle_dir)
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    dora = _copy(good, tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    ia3 = _copy(good, tmp_path / "ia3")
    _edit_config(ia3, peft_type="IA3")
    other_base = _copy(good, tmp_path / "otherbase")
    _edit_config(other_base, base_model_name_or_path="mistralai/Mistral-7B-v0.1")
    nan = _copy(good, tmp_path / "nan")
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    unpaired = _copy(good, tmp_path / "unpaired")
    tensors = load_file(str(unpaired / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, str(unpaired / "adapter_model.safetensors"))

    with pytest.raises(AdapterValidationError) as info:
        load_collection([good, pickle_dir, dora, ia3, other_base, nan, unpaired])
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    assert text.startswith("6 problems with the input adapters:")
    assert (
        f"adapter `pickled` ({pickle_dir}): adapter_model.bin is a pickle file and SOPPU refuses pickle weights; "
        "re-save the adapter with `save_pretrained(dir, safe_serialization=True)` to get adapter_model.safetensors"
    ) in problems
    assert f"adapter `dora` ({dora}): DoRA adapters (use_dora=true) are not supported; train a plain LoRA" in problems
    assert f"adapter `ia3` ({ia3}): peft_type is `IA3`; only LORA adapters can be compressed" in problems
    assert (
        "adapter `otherbase` is for base model `mistralai/Mistral-7B-v0.1` but `alpha` is for "
        "`HuggingFaceTB/SmolLM2-135M-Instruct`; compress adapters of one base model together"
    ) in problems
    assert any(p.startswith(f"adapter `nan` ({nan}): ") and "NaN" in p for p in problems), problems
    assert (
        f"adapter `unpaired` ({unpaired}): module `model.layers.0.self_attn.q_proj` has no lora_B weight "
        "(lora_A/lora_B must come in pairs)"
    ) in problems


def test_mismatched_modules_and_shapes(peft_adapters, tmp_path):
    fewer = _copy(peft_adapters[1], tmp_path / "fewer")
    tensors = load_file(str(fewer / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if "layers.29." not in k}
    # a module of a different shape (v_proj is 192 x 576 in SmolLM2; pretend it is 100 x 576)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key][:100].clone()
    save_file(tensors, str(fewer / "adapter_model.safetensors"))
    with pytest.raises(AdapterValidationError) as info:
        load_collection([peft_adapters[0], fewer])
    assert info.value.problems == [
        "adapter `fewer` targets different modules than `alpha`: lacks `model.layers.29.self_attn.q_proj`, "
        "`model.layers.29.self_attn.v_proj`; compress adapters with the same target modules together",
        "adapter `fewer`: module `model.layers.0.self_attn.v_proj` is [100, 576] (d_out, d_in) but [192, 576] in `alpha`",
    ]


def test_duplicate_names_and_missing_dir(peft_adapters, tmp_path):
    twin = _copy(peft_adapters[0], tmp_path / "x" / "alpha")
    with pytest.raises(AdapterValidationError) as info:
        load_collection([peft_adapters[0], twin, tmp_path / "nope"])
    assert info.value.problems == [
        f"adapter name `alpha` is used by both {peft_adapters[0]} and {twin}; adapter names (directory names) must be unique",
        f"adapter `nope` ({tmp_path / 'nope'}): not a directory; pass a PEFT adapter directory",
    ]


def test_fan_in_fan_out_keeps_factor_layout(peft_adapters, tmp_path):
    """fan_in_fan_out changes the base weight layout only; factors keep [r, d_in] / [d_out, r]."""
    flipped = _copy(peft_adapters[0], tmp_path / "fifo")
    _edit_config(flipped, fan_in_fan_out=True)
    normal = load_collection([peft_adapters[0]])
    fifo = load_collection([flipped])
    assert fifo.shapes == normal.shapes
    module = normal.modules[0]
    a1, b1 = normal.module_factors(module)[0]
    a2, b2 = fifo.module_factors(module)[0]
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)


def test_corrupt_safetensors_is_refused(peft_adapters, tmp_path):
    bad = _copy(peft_adapters[0], tmp_path / "trailing")
    with open(bad / "adapter_model.safetensors", "ab") as f:
        f.write(b"junk")
    with pytest.raises(AdapterValidationError) as info:
        load_collection([bad])
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"adapter `trailing` ({bad}): ")
    assert "trailing" in info.value.problems[0] or "bytes" in info.value.problems[0]
