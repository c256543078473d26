"""Verification that compressed adapters still behave like the originals.

Weight level (no model needed): for every adapter and module, recompute from the *bundle files*
and the *original adapter files* the unsquared relative Frobenius error
||dW_i - U S_i V.T||_F / ||dW_i||_F and the rank-k SVD lower bound, exactly on factors.

Output level (needs the base model): for each adapter, the original adapter and the exported
compressed adapter are loaded into one PEFT model and compared on prompts:
  - mean KL(original || compressed) of next-token distributions over all prompt positions,
  - top-1 agreement of those distributions,
  - exact-match agreement of greedy generations,
  - and, as the non-vacuity check, how often the original adapter's greedy output differs from
    the base model's (an adapter that changes nothing proves nothing).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from soppu_client.adapters import AdapterCollection
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.format.errors import InputError
from soppu_client.metrics import ModuleMetrics, module_metrics, summarize

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Reverse the word: garden",
    "What is 17 + 25?",
    "Translate 'good morning' to Spanish.",
    "List three colors.",
    "Spell the word 'cat' backwards.",
    "What comes after Tuesday?",
]


def exact_match(generated: str, answer: str) -> bool:
    """The task-accuracy rule: the stripped generation equals the stripped answer."""
    return generated.strip() == answer.strip()


def task_accuracy(generated: list[str], answers: list[str]) -> float:
    """Fraction of ``generated`` that :func:`exact_match` their answers."""
    return float(np.mean([exact_match(g, a) for g, a in zip(generated, answers)]))


def verify_weights(
    bundle: Bundle, collection: AdapterCollection, *, progress: Callable | None = None
) -> tuple[dict, list[ModuleMetrics]]:
    """Errors of the bundle against the original adapters, from files alone."""
    missing = [n for n in collection.names if n not in bundle.manifest.adapters]
    if missing:
        raise InputError(
            f"bundle {bundle.path} has no adapter named {', '.join(f'`{m}`' for m in missing)}; "
            f"it has: {', '.join(bundle.names)} (adapter names are directory names)"
        )
    extra = sorted(set(collection.modules) ^ set(bundle.modules))
    if extra:
        raise InputError(
            f"bundle {bundle.path} and the adapters disagree on modules (e.g. `{extra[0]}`); "
            "pass the adapters the bundle was made from"
        )
    cores = {n: bundle.load_cores(n) for n in collection.names}
    clusters = [bundle.cluster_of(n) for n in collection.names]
    metrics = []
    modules = collection.modules
    for module in progress(modules) if progress else modules:
        factors = collection.module_factors(module, dtype=np.float64)
        bases = [bundle.bases(module, c) for c in range(bundle.n_clusters)]
        U = [u.double().numpy() for u, _ in bases]
        V = [v.double().numpy() for _, v in bases]
        S = [cores[n][f"{module}.S"].double().numpy() for n in collection.names]
        # what is stored: quantized tensors come back dequantized, each module at its own k
        metrics.append(module_metrics(module, factors, U, V, S, clusters, bundle.manifest.module_rank(module)))
    return summarize(metrics, collection.names), metrics


@dataclass
class OutputCheck:
    """Output-level agreement of one adapter (compressed vs original)."""

    adapter: str
    prompts: int
    mean_kl: float
    top1_agreement: float
    greedy_exact_match: float
    adapter_changes_output: float  # fraction of prompts where original != base greedy output
    task_accuracy_original: float | None
    task_accuracy_compressed: float | None
    examples: list[dict]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def load_prompts(adapter_dir: Path, override: Path | None = None) -> list[dict]:
    """Prompts for one adapter: ``override`` file, else ``prompts.json`` beside it, else defaults.

    A prompts file is a JSON list of strings or of {"prompt": ..., "answer": ...} objects.
    """
    path = override or (adapter_dir / "prompts.json")
    if path.is_file():
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); expected a list of prompts") from None
        if not isinstance(items, list) or not items:
            raise InputError(f"{path} must hold a non-empty JSON list of prompts")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                out.append({"prompt": item})
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                out.append(item)
            else:
                raise InputError(f"{path}: item {i} is neither a string nor an object with a `prompt` string")
        return out
    return [{"prompt": p} for p in DEFAULT_PROMPTS]


def _encode(tokenizer, prompts: list[str]):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logprobs_and_greedy(model, batch, tokenizer, max_new_tokens: int):
    import torch

    with torch.no_grad():
        logits = model(**batch).logits.float()
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return torch.log_softmax(logits, dim=-1), [t.strip() for t in texts]


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Greedy completions (stripped) of chat-templated ``prompts``, batched with left padding.

    Generation stops at the chat template's end of turn (``<|im_end|>`` where the tokenizer has
    it, else its eos); the task-accuracy path of benchmarks (with :func:`task_accuracy`).
    ``adapter_names``: PEFT mixed-adapter batches, the loaded adapter to use for each prompt.
    """
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    end = end if end is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = _encode(tokenizer, prompts[start : start + batch_size])
        extra = {"adapter_names": adapter_names[start : start + batch_size]} if adapter_names else {}
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                 pad_token_id=tokenizer.pad_token_id, **extra)
        texts = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(t.strip() for t in texts)
    return out


def verify_outputs(
    bundle: Bundle,
    collection: AdapterCollection,
    base_model: str | None = None,
    *,
    prompts_file: Path | None = None,
    max_new_tokens: int = 16,
    max_prompts: int = 16,
    progress: Callable | None = None,
) -> list[OutputCheck]:
    """Compare each original adapter with its compressed export on the base model."""
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    model, tokenizer = load_base_model(base_model)
    checks = []
    with tempfile.TemporaryDirectory(prefix="soppu-verify-") as tmp:
        peft_model = None
        adapters = list(enumerate(collection.adapters))
        for idx, info in progress(adapters) if progress else adapters:
            orig, comp = f"orig{idx}", f"comp{idx}"  # PEFT adapter names may not contain '.'

            exported = export_peft(bundle, info.name, Path(tmp) / info.name)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(info.path), adapter_name=orig)
            else:
                peft_model.load_adapter(str(info.path), adapter_name=orig)
            peft_model.load_adapter(str(exported), adapter_name=comp)
            peft_model.eval()
            items = load_prompts(info.path, prompts_file)[:max_prompts]
            batch = _encode(tokenizer, [it["prompt"] for it in items])
            mask = batch["attention_mask"].bool()
            peft_model.set_adapter(orig)
            lp_orig, gen_orig = _logprobs_and_greedy(peft_model, batch, tokenizer, max_new_tokens)
            peft_model.set_adapter(comp)
            lp_comp, gen_comp = _logprobs_and_greedy(peft_model, batch, tokenizer, max_new_tokens)
            with peft_model.disable_adapter():
                _, gen_base = _logprobs_and_greedy(peft_model, batch, tokenizer, max_new_tokens)
            kl = (lp_orig.exp() * (lp_orig - lp_comp)).sum(-1)[mask].clamp_min(0.0)
            top1 = (lp_orig.argmax(-1) == lp_comp.argmax(-1))[mask].float()
            answers = [it.get("answer") for it in items]
            has_answers = all(isinstance(a, str) for a in answers)
            checks.append(
                OutputCheck(
                    adapter=info.name,
                    prompts=len(items),
                    mean_kl=float(kl.mean()),
                    top1_agreement=float(top1.mean()),
                    greedy_exact_match=float(np.mean([a == b for a, b in zip(gen_orig, gen_comp)])),
                    adapter_changes_output=float(np.mean([a != b for a, b in zip(gen_orig, gen_base)])),
                    task_accuracy_original=(
                        task_accuracy(gen_orig, answers) if has_answers else None
                    ),
                    task_accuracy_compressed=(
                        task_accuracy(gen_comp, answers) if has_answers else None
                    ),
                    examples=[
                        {"prompt": it["prompt"], "original": o, "compressed": c, "base": b}
                        for it, o, c, b in list(zip(items, gen_orig, gen_comp, gen_base))[:3]
                    ],
                )
            )
    return checks


def plot_errors(summary: dict, metrics: list[ModuleMetrics], names: list[str], path: str | Path) -> Path:
    """Per-layer bars (mean error per module type) with per-adapter dots; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from soppu_client.metrics import module_layer, module_type

    types = sorted({module_type(m.module) for m in metrics})
    layers = sorted({module_layer(m.module) or 0 for m in metrics})
    fig, axes = plt.subplots(len(types), 1, figsize=(max(8, len(layers) * 0.35), 2.8 * len(types)), squeeze=False)
    for ax, mtype in zip(axes[:, 0], types):
        rows = [m for m in metrics if module_type(m.module) == mtype]
        xs = np.array([module_layer(m.module) or 0 for m in rows])
        errs = np.stack([m.error for m in rows])  # [layers, N]
        lows = np.stack([m.lower_bound for m in rows])
        ax.bar(xs, errs.mean(1), color="#8fb3d9", label="mean error")
        ax.plot(xs, lows.mean(1), "k_", markersize=10, label="mean rank-k SVD bound")
        for j in range(errs.shape[1]):
            jitter = (j - errs.shape[1] / 2) * 0.6 / max(errs.shape[1], 1)
            ax.plot(xs + jitter, errs[:, j], ".", markersize=3, alpha=0.7, label=names[j] if len(names) <= 10 else None)
        ax.set_title(f"{mtype}: ||dW - U S V^T||_F / ||dW||_F (unsquared relative Frobenius)")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error")
        ax.set_ylim(0, max(1e-3, float(errs.max()) * 1.1))
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
