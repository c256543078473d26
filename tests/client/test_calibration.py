"""Data-aware (calibrated) fit: against a dense numpy/scipy reference, invariants, input checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from soppu_client.compress import CompressConfig, fit_module
from soppu_client.compress.calibration import (
    ModuleStats,
    collect_statistics,
    map_back,
    prepare,
    read_calibration,
    weighted_module_fit,
)
from soppu_client.format.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
D_OUT, D_IN, R, N, K = 12, 10, 3, 5, 3


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    x = rng.standard_normal((d, d)) * rng.uniform(0.1, 3.0, size=d)  # anisotropic, like activations
    return x @ x.T / d + 0.05 * np.eye(d)


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    factors = [(rng.standard_normal((R, D_IN)), rng.standard_normal((D_OUT, R))) for _ in range(N)]
    return factors, ModuleStats(sigma=_spd(rng, D_IN), gamma=_spd(rng, D_OUT), tokens=100)


def _dense_jd(mats: list[np.ndarray], k: int, starts: int = 20, iters: int = 600) -> float:
    """max sum_i ||U^T M_i V||^2 over orthonormal U, V: alternating eigen-solves, best of many starts."""
    rng = np.random.default_rng(1)
    best = -np.inf
    for _ in range(starts):
        V = np.linalg.qr(rng.standard_normal((mats[0].shape[1], k)))[0]
        for _ in range(iters):
            U = np.linalg.eigh(sum(m @ V @ V.T @ m.T for m in mats))[1][:, -k:]
            V = np.linalg.eigh(sum(m.T @ U @ U.T @ m for m in mats))[1][:, -k:]
        best = max(best, sum(np.linalg.norm(U.T @ m @ V) ** 2 for m in mats))
    return best


def _weighted_objective(factors, stats, a, b, U, V, S) -> float:
    g = np.real(scipy.linalg.fractional_matrix_power(stats.gamma, a / 2))
    s = np.real(scipy.linalg.fractional_matrix_power(stats.sigma, b / 2))
    return sum(np.linalg.norm(g @ (B @ A - U @ S[i] @ V.T) @ s) ** 2 for i, (A, B) in enumerate(factors))


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)])
def test_weighted_fit_matches_dense_reference(a: float, b: float) -> None:
    factors, stats = _case()
    config = CompressConfig(rank=K, weighting="norm", float64=True, tol=1e-13, max_iter=2000,
                            calibration_output_power=a, calibration_input_power=b)
    fit = weighted_module_fit(factors, stats, config)
    U, V, S = fit.U[0].numpy(), fit.V[0].numpy(), fit.cores.numpy()
    assert np.allclose(U.T @ U, np.eye(K), atol=1e-10) and np.allclose(V.T @ V, np.eye(K), atol=1e-10)
    # dense reference: W_i' = Gamma^(a/2) dW_i Sigma^(b/2), min sum ||W_i' - U' S V'^T||^2 = total - max
    g = np.real(scipy.linalg.fractional_matrix_power(stats.gamma, a / 2))
    s = np.real(scipy.linalg.fractional_matrix_power(stats.sigma, b / 2))
    mats = [g @ (B @ A) @ s for A, B in factors]
    ref = sum(np.linalg.norm(m) ** 2 for m in mats) - _dense_jd(mats, K)
    ours = _weighted_objective(factors, stats, a, b, U, V, S)
    assert ours == pytest.approx(ref, rel=1e-6)
    # non-vacuity: the plain fit is measurably worse under the weighted objective
    plain = fit_module(factors, CompressConfig(rank=K, weighting="norm", float64=True, tol=1e-13, max_iter=2000))
    worse = _weighted_objective(factors, stats, a, b, plain.U[0].numpy(), plain.V[0].numpy(), plain.cores.numpy())
    assert worse > ref * 1.01


def test_weighted_fit_hands_no_stack_to_the_metrics() -> None:
    """The pipeline computes metrics on ``fit.stack`` when a fit carries one; a weighted fit ran on the
    moved factors Gamma^(a/2) B_i, A_i Sigma^(b/2), so it must carry none (metrics on the adapters' own),
    while a plain fit carries the stack of exactly its factors."""
    from soppu_client.metrics import module_metrics

    factors, stats = _case(3)
    config = CompressConfig(rank=K, weighting="norm", float64=True)
    assert fit_module(factors, config).stack is not None
    fit = weighted_module_fit(factors, stats, config)
    assert fit.stack is None
    U, V, S = fit.U[0].numpy(), fit.V[0].numpy(), list(fit.cores.numpy())
    m = module_metrics("m", factors, [U], [V], S, [0] * N, K, stack=fit.stack)
    dense = [np.linalg.norm(B @ A - U @ S[i] @ V.T) / np.linalg.norm(B @ A) for i, (A, B) in enumerate(factors)]
    np.testing.assert_allclose(m.error, dense, rtol=1e-9)


def test_map_back_reorthonormalizes_without_changing_the_product() -> None:
    rng = np.random.default_rng(3)
    _, stats = _case(3)
    g_inv = np.linalg.inv(scipy.linalg.sqrtm(stats.gamma).real)
    s_inv = np.linalg.inv(scipy.linalg.sqrtm(stats.sigma).real)
    U_ = np.linalg.qr(rng.standard_normal((D_OUT, K)))[0]
    V_ = np.linalg.qr(rng.standard_normal((D_IN, K)))[0]
    S_ = rng.standard_normal((N, K, K))
    U, V, S = map_back(U_, V_, S_, g_inv, s_inv)
    assert np.allclose(U.T @ U, np.eye(K), atol=1e-12) and np.allclose(V.T @ V, np.eye(K), atol=1e-12)
    for i in range(N):
        want = g_inv @ U_ @ S_[i] @ V_.T @ s_inv.T
        assert np.allclose(U @ S[i] @ V.T, want, atol=1e-10)
    assert not np.allclose(g_inv @ U_, U)  # the map really moved the bases


def _adapter(tmp_path: Path, name: str = "initials") -> Path:
    dest = tmp_path / name
    shutil.copytree(ROOT / "examples" / "adapters" / name, dest)
    return dest


def test_calibration_overlapping_evaluation_prompts_is_refused(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    held = [it["prompt"] for it in json.loads((d / "prompts.json").read_text())]
    lines = [{"prompt": "Initials of: Zoe Alice Young"}, {"prompt": held[0]}, {"text": held[1]}]
    (d / "calibration.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InputError) as exc:
        read_calibration(d)
    msg = str(exc.value)
    assert msg.startswith("adapter `initials`: 2 calibration prompt(s) in ") and "prompts.json" in msg


def test_malformed_calibration_line_names_file_and_line(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    (d / "calibration.jsonl").write_text('{"prompt": "Initials of: Zoe Alice Young"}\n{"answer": 3}\n')
    with pytest.raises(InputError, match=r"calibration.jsonl:2 needs a non-empty string `prompt`"):
        read_calibration(d)


def test_shipped_calibration_is_disjoint_and_diag_is_refused(tmp_path: Path) -> None:
    from soppu_client.adapters import load_collection

    dirs = [_adapter(tmp_path, n) for n in ("initials", "last_word")]
    for d in dirs:
        prompts = read_calibration(d)
        assert prompts and len(prompts) == len(set(prompts))  # read_calibration also checked disjointness
    collection = load_collection([str(d) for d in dirs])
    with pytest.raises(InputError, match="calibration applies to --method full only"):
        prepare(collection, CompressConfig(rank=4, method="diag", calibration="auto"))
    assert prepare(collection, CompressConfig(rank=4, calibration="none")) == (None, None)


def test_statistics_on_the_real_base_model() -> None:
    """Sigma of q_proj equals the second moment of the layer's normed input, from hidden states."""
    import torch

    from soppu_client.base_model import load_base_model

    prompts = ["Initials of: Zoe Alice Young", "Last word of: apple river stone cloud"]
    mods = ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    stats = collect_statistics(prompts, mods, damping=0.0)
    model, tok = load_base_model()
    xs = []
    for p in prompts:
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
            xs.append(model.model.layers[2].input_layernorm(hidden)[0].double())
    x = torch.cat(xs).numpy()
    ref = x.T @ x / len(x)
    q, v = stats[mods[0]], stats[mods[1]]
    assert q.tokens == len(x)
    assert np.allclose(q.sigma, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert np.allclose(v.sigma, q.sigma)  # q and v read the same input
    assert v.gamma.shape == (192, 192) and q.gamma.shape == (576, 576)
    assert np.trace(q.gamma) > 0 and np.linalg.eigvalsh(v.gamma).min() > -1e-9 * np.trace(v.gamma)


def test_cli_refuses_calibration_with_diag(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from soppu_client.cli.compress import compress

    dirs = [str(_adapter(tmp_path, n)) for n in ("initials", "last_word")]
    res = CliRunner().invoke(compress, [*dirs, "-o", str(tmp_path / "b"), "-k", "4", "--method", "diag",
                                        "--calibration", "auto", "--json"])
    assert res.exit_code == 2, res.output
    assert "calibration applies to --method full only" in res.output and not (tmp_path / "b").exists()
    res = CliRunner().invoke(compress, [*dirs, "-o", str(tmp_path / "b"), "--calibration-powers", "x"])
    assert res.exit_code == 2 and "--calibration-powers should be two numbers" in res.output
