"""The vectorized "torch" backend of shared_basis_lora (CPU serving path) against the fp32 reference,
over the shared case grid (dtype x rank x odd sizes x adapters x clusters x popularity x index -1)."""

from __future__ import annotations

import pytest
import torch

import soppu_kernels as sk
from soppu_kernels import reference as R

from tests.kernels.kernel_cases import Case, assert_matches_reference, case_grid, make_inputs


@pytest.mark.parametrize("case", case_grid(30), ids=lambda c: c.id)
def test_torch_backend_matches_reference(case: Case) -> None:
    inp = make_inputs(case, seed=5)
    y0 = inp["y"].clone()
    ref = R.shared_basis_lora_ref(y0.clone(), inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
                                  inp["cluster_of_adapter"], diag=case.diag)
    out = sk.shared_basis_lora(inp["y"], inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
                               inp["cluster_of_adapter"], diag=case.diag, backend="torch")
    assert out is inp["y"], "the op must work in place and return y"
    assert_matches_reference(out, ref, y0, inp["adapter_index"], case.dtype)


def test_torch_backend_writes_into_a_column_slice() -> None:
    """vLLM's packed layers add each module's delta into a column slice of one output."""
    case = case_grid(4)[1]
    inp = make_inputs(case, seed=6)
    wide = torch.randn(case.T, case.d_out + 10).to(inp["y"].dtype)
    before = wide.clone()
    view = wide[:, 5:5 + case.d_out]
    ref = R.shared_basis_lora_ref(view.clone(), inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
                                  inp["cluster_of_adapter"], diag=case.diag)
    sk.shared_basis_lora(view, inp["x"], inp["U"], inp["V"], inp["S"], inp["adapter_index"],
                         inp["cluster_of_adapter"], diag=case.diag, backend="torch")
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 5 + case.d_out:], before[:, 5 + case.d_out:])
    assert_matches_reference(wide[:, 5:5 + case.d_out], ref, before[:, 5:5 + case.d_out], inp["adapter_index"],
                             case.dtype)


def test_torch_backend_only_for_shared_basis_lora() -> None:
    h = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="core_gather_mv has no 'torch' backend"):
        sk.core_gather_mv(h, torch.zeros(1, 4, 4), torch.zeros(2, dtype=torch.long), diag=False, backend="torch")
