"""The safetensors size predictor against files the safetensors library itself writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save
from safetensors.torch import save as torch_save

from soppu_client.format.file_bytes import entry_bytes, header_bytes, safetensors_file_bytes

NP = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32}


@pytest.mark.parametrize("seed", range(4))
def test_predicted_size_equals_the_librarys_file(seed: int) -> None:
    rng = np.random.default_rng(seed)
    checked = 0
    for trial in range(60):
        entries, arrays = {}, {}
        for j in range(int(rng.integers(1, 9))):
            dtype = list(NP)[int(rng.integers(len(NP)))]
            shape = tuple(int(x) for x in rng.integers(1, 400, size=int(rng.integers(1, 3))))
            name = f"model.layers.{int(rng.integers(0, 40))}.self_attn.{'qv'[j % 2]}_proj.{'UVS'[j % 3]}{j}"
            entries[name], arrays[name] = (dtype, shape), np.zeros(shape, NP[dtype])
        metadata = {"format": "soppu-bundle/1"} if trial % 2 else None
        assert safetensors_file_bytes(entries, metadata) == len(save(arrays, metadata=metadata))
        checked += 1
    assert checked == 60


def test_torch_writer_and_bf16_agree_with_the_prediction() -> None:
    tensors = {"cores": torch.zeros(1234, dtype=torch.bfloat16), "cores.q": torch.zeros(77, dtype=torch.uint8),
               "cores.scale": torch.zeros(30, dtype=torch.float16)}
    entries = {"cores": ("BF16", (1234,)), "cores.q": ("U8", (77,)), "cores.scale": ("F16", (30,))}
    data = torch_save(tensors, metadata={"format": "soppu-bundle/1"})
    assert safetensors_file_bytes(entries, {"format": "soppu-bundle/1"}) == len(data)
    assert header_bytes(entries, {"format": "soppu-bundle/1"}) % 8 == 0
    assert header_bytes(entries, {"format": "soppu-bundle/1"}) == 8 + int.from_bytes(data[:8], "little")


def test_entry_bytes_is_one_entry_of_the_header() -> None:
    one = {"a.U": ("F32", (3, 4))}
    two = {"a.U": ("F32", (3, 4)), "b.U": ("F32", (5,))}
    n1 = len(save({"a.U": np.zeros((3, 4), np.float32)})) - 48
    n2 = len(save({"a.U": np.zeros((3, 4), np.float32), "b.U": np.zeros(5, np.float32)})) - 68
    # unpadded header growth from the second entry is exactly entry_bytes (padding aside)
    assert abs((n2 - n1) - entry_bytes("b.U", "F32", (5,), 48, 68)) < 8
    assert header_bytes(two) - header_bytes(one) <= entry_bytes("b.U", "F32", (5,), 48, 68) + 7
