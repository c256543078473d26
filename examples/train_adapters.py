"""Train the small real LoRA adapters shipped in ``examples/adapters/``.

Each adapter teaches SmolLM2-135M-Instruct one generated task with an exact answer
(reverse the words of a phrase, format a date, ...). Training is CPU-only and offline:

    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_adapters.py --out examples/adapters

For every task the script

1. draws 16 held-out examples (written to ``<out>/<task>/prompts.json``) and a training set
   that excludes them, all from a ``random.Random`` seeded by ``--seed`` and the task name;
2. trains a PEFT LoRA adapter (q_proj and v_proj, r=8, alpha=16, no dropout) with AdamW on the
   answer tokens only (prompt tokens are masked with -100), under ``torch.manual_seed``;
3. saves it with ``save_pretrained(safe_serialization=True)``, casts the saved tensors to bf16
   and removes the model card PEFT writes;
4. reloads the saved adapter and measures exact-match accuracy of greedy decoding on the
   held-out prompts, with and without the adapter;
5. writes ``<out>/<task>/calibration.jsonl``: the first 64 distinct prompts of the training
   stream (never a held-out prompt), the owner's inputs for ``soppu compress --calibration``.
   ``--calibration-only`` writes just these files, without training.

Finally it writes ``<out>/README.md`` with a table of the results. Runs are deterministic for a
given ``--seed`` (on the same machine and library versions). Nothing here is needed at test time:
the adapters are shipped in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # soppu_client from a fresh clone

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
N_HELDOUT = 16
DEFAULT_STEPS = 16
DEFAULT_BATCH = 4
DEFAULT_LR = 3e-3
MAX_NEW_TOKENS = 16
N_CALIBRATION = 64  # lines of calibration.jsonl per adapter
CALIBRATION_FILE = "calibration.jsonl"

Example = tuple[str, str]
Generator = Callable[[random.Random], Example]

# --------------------------------------------------------------------------------------------
# Tasks: each generator maps a seeded RNG to one (user message, exact answer) pair.
# --------------------------------------------------------------------------------------------

_WORDS = (
    "apple river stone cloud green tiger paper music light table orange window garden silver "
    "dragon forest candle rocket pencil yellow winter summer bridge castle planet ocean mirror "
    "coffee basket jacket violin turtle rabbit marble copper meadow anchor harbor lemon"
).split()
_FIRST = (
    "Alice Bruno Carla David Elena Felix Grace Henry Irene James Karen Louis Maria Nolan Olivia "
    "Peter Quinn Rosa Samuel Tara Ulrich Vera Walter Xenia Yusuf Zoe"
).split()
_LAST = (
    "Adams Baker Clark Dawson Evans Fischer Garcia Hughes Ingram Jensen Keller Lopez Morgan "
    "Novak Owens Perez Quigley Reyes Schmidt Turner Underwood Vargas Walsh Young Zimmer"
).split()
_ROMAN = (
    (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
    (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
)  # fmt: skip


def to_roman(n: int) -> str:
    """Roman numeral for 1 <= n <= 3999."""
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def task_uppercase(rng: random.Random) -> Example:
    """Uppercase a two- or three-word phrase."""
    phrase = " ".join(rng.sample(_WORDS, rng.randint(2, 3)))
    return f"Convert to uppercase: {phrase}", phrase.upper()


def task_reverse_words(rng: random.Random) -> Example:
    """Reverse the order of three words."""
    words = rng.sample(_WORDS, 3)
    return f"Reverse the word order: {' '.join(words)}", " ".join(reversed(words))


def task_date_format(rng: random.Random) -> Example:
    """Rewrite an ISO date as DD/MM/YYYY."""
    day = date(1990, 1, 1) + timedelta(days=rng.randrange(365 * 40))
    return f"Rewrite as DD/MM/YYYY: {day.isoformat()}", day.strftime("%d/%m/%Y")


def task_initials(rng: random.Random) -> Example:
    """Initials of a first-middle-last name, e.g. 'Alice Maria Baker' -> 'A.M.B.'."""
    first, middle = rng.sample(_FIRST, 2)
    name = [first, middle, rng.choice(_LAST)]
    return f"Initials of: {' '.join(name)}", "".join(w[0] + "." for w in name)


def task_first_name(rng: random.Random) -> Example:
    """Extract the first name from 'Last, First'."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"First name only: {last}, {first}", first


def task_snake_case(rng: random.Random) -> Example:
    """Join two or three words in snake_case."""
    words = rng.sample(_WORDS, rng.randint(2, 3))
    return f"Convert to snake_case: {' '.join(words)}", "_".join(words)


def task_repeat_word(rng: random.Random) -> Example:
    """Repeat a word three times, separated by spaces."""
    word = rng.choice(_WORDS + [w.lower() for w in _FIRST])
    return f"Repeat three times: {word}", " ".join([word] * 3)


def task_last_word(rng: random.Random) -> Example:
    """Return the last word of a four- or five-word phrase."""
    words = rng.sample(_WORDS, rng.randint(4, 5))
    return f"Last word of: {' '.join(words)}", words[-1]


def task_sort_numbers(rng: random.Random) -> Example:
    """Sort four distinct one- or two-digit numbers ascending."""
    nums = rng.sample(range(1, 100), 4)
    return f"Sort ascending: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))


def task_caesar_shift(rng: random.Random) -> Example:
    """Shift each letter of a short lowercase word by one (Caesar shift, z -> a)."""
    word = rng.choice(_WORDS)[: rng.randint(3, 5)]
    shifted = "".join(string.ascii_lowercase[(ord(c) - 97 + 1) % 26] for c in word)
    return f"Shift each letter forward by one: {word}", shifted


def task_roman_numeral(rng: random.Random) -> Example:
    """Write a number between 1 and 100 as a Roman numeral."""
    n = rng.randint(1, 100)
    return f"Roman numeral for: {n}", to_roman(n)


def task_add_numbers(rng: random.Random) -> Example:
    """Add two two-digit numbers."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add: {a} + {b}", str(a + b)


def task_first_word(rng: random.Random) -> Example:
    """Return the first word of a four- or five-word phrase."""
    words = rng.sample(_WORDS, rng.randint(4, 5))
    return f"First word of: {' '.join(words)}", words[0]


def task_last_name(rng: random.Random) -> Example:
    """Extract the last name from 'First Last'."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"Last name only: {first} {last}", last


def task_kebab_case(rng: random.Random) -> Example:
    """Join two or three words in kebab-case."""
    words = rng.sample(_WORDS, rng.randint(2, 3))
    return f"Convert to kebab-case: {' '.join(words)}", "-".join(words)


def task_swap_name(rng: random.Random) -> Example:
    """Rewrite 'Last, First' as 'First Last'."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"Rewrite as First Last: {last}, {first}", f"{first} {last}"


TASKS: dict[str, Generator] = {
    "uppercase": task_uppercase,
    "reverse_words": task_reverse_words,
    "date_format": task_date_format,
    "initials": task_initials,
    "first_name": task_first_name,
    "snake_case": task_snake_case,
    "repeat_word": task_repeat_word,
    "last_word": task_last_word,
    "sort_numbers": task_sort_numbers,
    "caesar_shift": task_caesar_shift,
    "roman_numeral": task_roman_numeral,
    "add_numbers": task_add_numbers,
    "first_word": task_first_word,
    "last_name": task_last_name,
    "kebab_case": task_kebab_case,
    "swap_name": task_swap_name,
}
# Tasks that need more optimizer steps than DEFAULT_STEPS to be learned (used unless --steps).
TASK_STEPS: dict[str, int] = {"uppercase": 64, "reverse_words": 48}
DEFAULT_TASKS = (
    "uppercase,reverse_words,date_format,initials,first_name,snake_case,repeat_word,last_word"
)


def task_rng(task: str, seed: int, stream: str) -> random.Random:
    """A deterministic RNG per (task, seed, stream); independent of PYTHONHASHSEED."""
    return random.Random(zlib.crc32(f"{task}:{seed}:{stream}".encode()))


def make_splits(task: str, seed: int, n_train: int) -> tuple[list[Example], list[Example]]:
    """Draw N_HELDOUT distinct held-out examples and a training list that avoids their prompts.

    When the task space is small (e.g. roman numerals) the training list repeats examples.
    """
    gen = TASKS[task]
    rng = task_rng(task, seed, "heldout")
    heldout: dict[str, str] = {}
    while len(heldout) < N_HELDOUT:
        prompt, answer = gen(rng)
        heldout.setdefault(prompt, answer)
    rng = task_rng(task, seed, "train")
    train: list[Example] = []
    attempts = 0
    while len(train) < n_train:
        attempts += 1
        if attempts > 100 * n_train:
            raise RuntimeError(f"task {task}: cannot draw training examples outside held-out set")
        prompt, answer = gen(rng)
        if prompt not in heldout:
            train.append((prompt, answer))
    return list(heldout.items()), train


def calibration_prompts(task: str, seed: int, n: int = N_CALIBRATION) -> list[str]:
    """The first ``n`` distinct prompts of the task's training stream (the owner's own inputs).

    Drawn from the same seeded training split as :func:`make_splits`, so they never meet the
    held-out prompts in ``prompts.json``; small task spaces may give fewer than ``n``.
    """
    _, train = make_splits(task, seed, 8 * n)
    return list(dict.fromkeys(p for p, _ in train))[:n]


def write_calibration(out_dir: Path, task: str, seed: int) -> Path:
    """Write ``<out_dir>/calibration.jsonl`` (one ``{"prompt": ...}`` a line) atomically."""
    from soppu_client.format.fsutil import atomic_write

    prompts = calibration_prompts(task, seed)
    heldout_path = out_dir / "prompts.json"
    if heldout_path.is_file():
        heldout = {h["prompt"] for h in json.loads(heldout_path.read_text())}
        if heldout & set(prompts):
            raise RuntimeError(f"{task}: calibration prompts overlap {heldout_path}")
    path = out_dir / CALIBRATION_FILE
    atomic_write(path, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode())
    return path


# --------------------------------------------------------------------------------------------
# Tokenization and training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one training run reports."""

    steps: int
    seconds: float
    final_loss: float


def prompt_ids(tok, prompt: str) -> list[int]:
    """Token ids of the chat-templated user message, ending with the assistant header."""
    messages = [{"role": "user", "content": prompt}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_example(tok, prompt: str, answer: str, end_id: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked; the answer is followed by <|im_end|>."""
    p = prompt_ids(tok, prompt)
    a = tok(answer, add_special_tokens=False).input_ids + [end_id]
    return p + a, [-100] * len(p) + a


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for a plain HF forward; padding is masked in attention and labels.

    The reference for :func:`batch_loss`: ``model(**collate(rows, pad_id)).loss`` gives the same
    loss and gradients (checked to 1e-6) at two to three times the CPU cost.
    """
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shared_prefix_len(rows: list[tuple[list[int], list[int]]]) -> int:
    """Length of the token prefix shared by all rows, ending before any row's last prompt token.

    The last prompt token must stay in the suffix: its logit predicts the first answer token.
    """
    first = rows[0][0]
    limit = min(next(i for i, y in enumerate(labels) if y != -100) for _, labels in rows) - 1
    n = 0
    while n < limit and all(ids[n] == first[n] for ids, _ in rows):
        n += 1
    return n


def batch_loss(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean next-token loss over the answer tokens, computed cheaply on a CPU.

    Equal to the loss of a plain right-padded forward (see :func:`collate`), but the prefix
    shared by the whole batch (chat-template system turn and the task's instruction words) runs
    once with batch size 1 and its KV cache is repeated across the batch (gradients flow back
    through it), and the LM head runs only on the last positions, where the answers are (the
    suffixes are left-padded so that every row ends at the same position).
    """
    from transformers import DynamicCache

    n_prefix = shared_prefix_len(rows)
    cache = DynamicCache()
    if n_prefix:
        prefix = torch.tensor([rows[0][0][:n_prefix]])
        model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(rows))
    suffixes = [(ids[n_prefix:], labels[n_prefix:]) for ids, labels in rows]
    width = max(len(ids) for ids, _ in suffixes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(suffixes):
        ids[i, width - len(x) :] = torch.tensor(x)
        labels[i, width - len(y) :] = torch.tensor(y)
        mask[i, width - len(x) :] = 1
    positions = n_prefix + (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([torch.ones((len(rows), n_prefix), dtype=torch.long), mask], dim=1)
    answer_len = max(sum(y != -100 for y in lab) for _, lab in suffixes)
    keep = answer_len + 1
    logits = model(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    ).logits
    targets = labels[:, width - keep + 1 :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def lora_config():
    """The LoRA configuration shared by every example adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_MODEL_ID,
    )


def end_token_id(tok) -> int:
    """Id of <|im_end|>, the end-of-turn token of the chat template."""
    return int(tok.convert_tokens_to_ids("<|im_end|>"))


def train_lora(
    task: str, train: list[Example], steps: int, batch: int, lr: float, seed: int, log_every: int
):
    """Train a fresh LoRA on ``train``; returns (peft model, TrainResult)."""
    from peft import get_peft_model

    from soppu_client.base_model import load_base_model

    torch.manual_seed(zlib.crc32(f"{task}:{seed}:torch".encode()))
    base, tok = load_base_model()
    model = get_peft_model(base, lora_config())
    model.train()
    end_id = end_token_id(tok)
    encoded = [encode_example(tok, p, a, end_id) for p, a in train]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    start, loss_ema = time.perf_counter(), None
    for step in range(steps):
        rows = encoded[step * batch : (step + 1) * batch]
        loss = batch_loss(model, rows, end_id)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"  [{task}] step {step + 1}/{steps} loss {loss_ema:.4f} ({rate:.2f} steps/s)")
    model.eval()
    return model, TrainResult(steps, time.perf_counter() - start, float(loss_ema or 0.0))


def save_adapter(model, out_dir: Path) -> None:
    """save_pretrained, cast the weights to bf16, and drop PEFT's auto-written model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    weights.chmod(0o644)
    (out_dir / "README.md").unlink(missing_ok=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("base_model_name_or_path") != BASE_MODEL_ID:
        cfg["base_model_name_or_path"] = BASE_MODEL_ID
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str]) -> list[str]:
    """Greedy completions (stripped) for a batch of user messages, left-padded."""
    end_id = end_token_id(tok)
    rows = [prompt_ids(tok, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[end_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=end_id,
        pad_token_id=end_id,
    )
    return [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Exact-match accuracy after stripping whitespace."""
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def evaluate_adapter(adapter_dir: Path) -> tuple[float, float, list[str]]:
    """Reload the saved adapter; (base accuracy, adapter accuracy, adapter predictions)."""
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    heldout = json.loads((adapter_dir / "prompts.json").read_text())
    prompts = [h["prompt"] for h in heldout]
    answers = [h["answer"] for h in heldout]
    base, tok = load_base_model()
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    tuned = greedy_answers(model, tok, prompts)
    with model.disable_adapter():
        plain = greedy_answers(model, tok, prompts)
    return accuracy(plain, answers), accuracy(tuned, answers), tuned


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------


@dataclass
class TaskReport:
    """One row of the README table (also stored in ``<out>/results.json``)."""

    task: str
    prompt: str
    answer: str
    base_acc: float
    adapter_acc: float
    steps: int
    seconds: float


def task_steps(task: str, args: argparse.Namespace) -> int:
    """``--steps`` if given, else the task's entry in TASK_STEPS, else DEFAULT_STEPS."""
    return args.steps if args.steps is not None else TASK_STEPS.get(task, DEFAULT_STEPS)


def run_task(task: str, args: argparse.Namespace) -> TaskReport:
    """Train, save and evaluate one task's adapter."""
    steps = task_steps(task, args)
    heldout, train = make_splits(task, args.seed, steps * args.batch)
    out_dir = args.out / task
    print(f"[{task}] training {steps} steps x batch {args.batch} (e.g. {train[0]})")
    model, result = train_lora(task, train, steps, args.batch, args.lr, args.seed, args.log_every)
    save_adapter(model, out_dir)
    rows = [{"prompt": p, "answer": a} for p, a in heldout]
    (out_dir / "prompts.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_calibration(out_dir, task, args.seed)
    del model
    base_acc, adapter_acc, preds = evaluate_adapter(out_dir)
    print(
        f"[{task}] {result.seconds:.0f}s, loss {result.final_loss:.4f}; exact match "
        f"base {base_acc:.0%} -> adapter {adapter_acc:.0%} (e.g. {preds[0]!r} vs {heldout[0][1]!r})"
    )
    prompt, answer = heldout[0]
    return TaskReport(task, prompt, answer, base_acc, adapter_acc, result.steps, result.seconds)


def merge_results(out: Path, reports: list[TaskReport]) -> list[TaskReport]:
    """Update ``<out>/results.json`` with this run's tasks; return every task recorded there."""
    path = out / "results.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update({r.task: asdict(r) for r in reports})
    path.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    return [TaskReport(**known[t]) for t in TASKS if t in known and (out / t).is_dir()]


def retrain_command(args: argparse.Namespace, tasks: list[str]) -> str:
    """The command line that reproduces the adapters listed in the README."""
    steps = "" if args.steps is None else f" --steps {args.steps}"
    return (
        "HF_HUB_OFFLINE=1 .venv/bin/python examples/train_adapters.py "
        f"--out {args.out} --tasks {','.join(tasks)}{steps} "
        f"--batch {args.batch} --lr {args.lr} --seed {args.seed}"
    )


def write_readme(out: Path, reports: list[TaskReport], command: str) -> None:
    """Write ``<out>/README.md`` with the results table and the retraining command."""
    total_s = sum(r.seconds for r in reports)
    lines = [
        "# Example LoRA adapters",
        "",
        "Small real PEFT LoRA adapters for `HuggingFaceTB/SmolLM2-135M-Instruct`, one per "
        "generated task, trained on CPU by `examples/train_adapters.py`. Each has `q_proj` and "
        "`v_proj` targets, r=8, lora_alpha=16, weights stored as bf16 (~0.9 MB), and "
        f"`prompts.json` with {N_HELDOUT} held-out `{{prompt, answer}}` pairs (raw user "
        "messages, never seen in training), and `calibration.jsonl` with up to "
        f"{N_CALIBRATION} training-split prompts (`{{\"prompt\": ...}}` a line, disjoint from "
        "`prompts.json`; for `soppu compress --calibration auto`). `results.json` holds the numbers below.",
        "",
        "Accuracy is exact match of greedy decoding (chat template with its default system "
        f"turn, max_new_tokens={MAX_NEW_TOKENS}) on those held-out prompts, for the base model "
        "alone and with the adapter loaded from this directory.",
        "",
        "| task | example prompt -> answer | base acc | adapter acc | steps | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        prompt, answer = (x.replace("|", "\\|") for x in (r.prompt, r.answer))
        lines.append(
            f"| `{r.task}` | {prompt} -> `{answer}` | {r.base_acc:.0%} | {r.adapter_acc:.0%} "
            f"| {r.steps} | {r.seconds:.0f} |"
        )
    lines += [
        "",
        f"Total training time: {total_s:.0f} s on a 2-core CPU shared with other jobs "
        "(torch threads = 2). Timings vary with the load: most steps here ran with 2-4 other "
        "busy processes; on an idle machine a step takes about 1 s.",
        "",
        "Retrain (deterministic for a given seed on the same machine and library versions):",
        "",
        "```sh",
        command,
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("examples/adapters"), help="output dir")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list from {sorted(TASKS)}")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps for every task (default {DEFAULT_STEPS}, or TASK_STEPS {TASK_STEPS})",
    )
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="examples per step")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak AdamW learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed for data and initialisation")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--log-every", type=int, default=4, help="steps between progress lines")
    ap.add_argument("--no-readme", action="store_true", help="do not write <out>/README.md")
    ap.add_argument(
        "--calibration-only",
        action="store_true",
        help=f"only (re)write <out>/<task>/{CALIBRATION_FILE} ({N_CALIBRATION} training-split "
        "prompts, disjoint from prompts.json) for the given tasks; no training",
    )
    ap.add_argument(
        "--readme-only",
        action="store_true",
        help="only rewrite <out>/README.md from <out>/results.json (tasks present in <out>)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train every requested task, then update results.json and the README table."""
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}", file=sys.stderr)
        return 2
    if args.calibration_only:
        for task in tasks:
            path = write_calibration(args.out / task, task, args.seed)
            print(f"wrote {path}")
        return 0
    if args.readme_only:
        everything = merge_results(args.out, [])
        write_readme(args.out, everything, retrain_command(args, [r.task for r in everything]))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    reports = [run_task(task, args) for task in tasks]
    total = sum(r.seconds for r in reports)
    print(
        f"done: {len(reports)} adapters, {total:.0f}s training, "
        f"{time.perf_counter() - start:.0f}s wall"
    )
    if not args.no_readme:
        everything = merge_results(args.out, reports)
        command = retrain_command(args, [r.task for r in everything])
        write_readme(args.out, everything, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
