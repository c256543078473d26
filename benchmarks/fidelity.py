"""Fidelity at high compression: task accuracy of compressed adapters against the originals.

For a collection of task adapters (default: every ``examples/adapters/*/`` with a ``prompts.json``)
it measures exact-match accuracy of greedy decoding on each adapter's held-out ``prompts.json``
(batched, left-padded: ``soppu_client.verify.greedy_answers`` + ``task_accuracy``) for the base
model, the original adapters and the PEFT export of each compressed bundle, over a grid of
k (or byte budget) x bits x method x weighting x calibration (powers a, b), plus the reference
LoRALoLA JD-Full (``benchmarks/reference_jd.py`` with ``LORALOLA_SRC``; else skipped with the
reason). Options the compressor lacks (``CompressConfig`` has no ``bits`` / ``budget``) give
skipped rows too.

Per row: accuracy per adapter, ``accuracy_kept`` = sum of compressed accuracies / sum of original
ones, mean per-module error (unsquared relative Frobenius ||dW - U S V^T||_F / ||dW||_F, of the
stored values), parameters and bytes against the sources (bytes: source tensors at bf16, 2 bytes a
parameter, against the bundle's tensor bytes). Rows are cached in ``--cache-dir`` keyed by the
config and the digests of the adapter files, so reruns only compute new configs. Prints one JSON
object, writes it to ``--out`` and a PNG plot (accuracy kept against byte compression ratio).

    .venv/bin/python benchmarks/fidelity.py                       # full grid on examples/adapters
    .venv/bin/python benchmarks/fidelity.py --quick --adapters examples/adapters/initials examples/adapters/last_word
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VERSION = 1  # bump when the evaluation changes (invalidates the cache)
MAX_NEW_TOKENS = 16
GOAL_KEPT, GOAL_RATIO = 0.99, 9.0


def cfg(rank: int | None = None, method: str = "full", weighting: str = "norm", bits: int | None = None,
        budget: str | None = None, calibration: tuple[float, float] | None = None, kind: str = "soppu",
        group_size: int | None = None) -> dict:
    """One grid point. ``calibration``: (a, b) powers of the weighted fit, None for a plain fit."""
    c = {"kind": kind, "rank": rank, "method": method, "weighting": weighting, "bits": bits, "budget": budget,
         "calibration": list(calibration) if calibration else None}
    if group_size is not None:
        c["group_size"] = group_size
    return c


def label(c: dict) -> str:
    if c["kind"] == "reference":
        return f"reference JD-Full k={c['rank']}"
    parts = [f"k={c['rank']}" if c["budget"] is None else f"budget {c['budget']}", c["method"], c["weighting"]]
    if c["bits"]:
        parts.append(f"{c['bits']}-bit" + (f" g{c['group_size']}" if c.get("group_size") else ""))
    if c["calibration"]:
        parts.append("calib a={:g} b={:g}".format(*c["calibration"]))
    return " ".join(parts)


def grid(quick: bool) -> list[dict]:
    """The configurations measured (quick: a small grid for smoke tests)."""
    if quick:
        return [cfg(4), cfg(4, bits=4)]
    rows = [cfg(8), cfg(16, bits=4), cfg(32, budget="9x")]  # most informative first (slow CPU machines)
    rows += [cfg(8, calibration=ab) for ab in ((0.5, 0), (0.5, 0.5), (1, 0), (0, 0.5), (1, 1))]
    rows += [cfg(16), cfg(16, bits=3), cfg(24, bits=4), cfg(32, bits=3), cfg(32, budget="12x")]
    rows += [cfg(k, weighting="equal") for k in (8, 16)] + [cfg(4), cfg(32, method="diag")]
    rows += [cfg(16, bits=4, calibration=(0.5, 0)), cfg(16, bits=4, calibration=(0.5, 0.5))]
    rows += [cfg(8, kind="reference"), cfg(16, kind="reference")]
    # the default weighting (equal) kept more than norm at k=8 (95.7% against 92.4%): its budget rows
    rows += [cfg(32, budget="9x", weighting="equal"), cfg(16, bits=4, weighting="equal"),
             cfg(32, budget="12x", weighting="equal"), cfg(8, weighting="equal", calibration=(1, 1)),
             cfg(32, budget="9x", weighting="equal", calibration=(1, 1))]
    return rows


# ---------------------------------------------------------------------------------------- inputs


def adapter_dirs(paths: list[Path] | None, limit: int | None) -> list[Path]:
    dirs = paths or sorted(p for p in (ROOT / "examples" / "adapters").iterdir() if (p / "prompts.json").is_file())
    dirs = [Path(p) for p in dirs]
    missing = [str(p) for p in dirs if not (p / "prompts.json").is_file()]
    if missing:
        raise SystemExit(f"no prompts.json (held-out {{prompt, answer}} list) in {', '.join(missing)}")
    return dirs[:limit] if limit else dirs


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def adapter_digest(d: Path) -> str:
    return digest([d / f for f in ("adapter_config.json", "adapter_model.safetensors", "prompts.json",
                                   "calibration.jsonl")])


def supported(c: dict) -> str | None:
    """None when this machine/tree can run config ``c``, else the reason it is skipped."""
    from soppu_client.compress import CompressConfig

    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    if c["kind"] == "reference":
        if not (ROOT / "benchmarks" / "reference_jd.py").is_file():
            return "benchmarks/reference_jd.py is not in this tree"
        if not os.environ.get("LORALOLA_SRC"):
            return "LORALOLA_SRC is not set (path of a LoRALoLA checkout)"
        return None
    if c["bits"] is not None and "bits" not in fields:
        return "this soppu has no --bits"
    if c["budget"] is not None and "budget" not in fields:
        return "this soppu has no --budget"
    if c["calibration"] and "calibration" not in fields:
        return "this soppu has no --calibration"
    return None


# ---------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Base model + one PEFT wrapper; accuracy of any set of PEFT adapter dirs on their prompts."""

    def __init__(self, dirs: list[Path], batch_size: int, max_prompts: int | None = None):
        from peft import PeftModel

        from soppu_client.base_model import load_base_model
        from soppu_client.verify import load_prompts

        self.model, self.tok = load_base_model()
        self.items = {d.name: load_prompts(d) for d in dirs}
        self.peft = PeftModel.from_pretrained(self.model, str(dirs[0]), adapter_name="anchor")
        self.peft.eval()
        self.batch_size = batch_size
        self.max_prompts = max_prompts

    def _accuracies(self, names: list[str], adapter_names: list[str] | None) -> dict[str, float]:
        """Accuracy per adapter; every adapter's prompts go through one mixed batch stream."""
        from soppu_client.verify import greedy_answers, task_accuracy

        prompts, owners, answers = [], [], []
        for i, name in enumerate(names):
            items = self.items[name][: self.max_prompts]
            prompts += [it["prompt"] for it in items]
            answers += [it["answer"] for it in items]
            owners += [i] * len(items)
        per_prompt = [adapter_names[o] for o in owners] if adapter_names else None
        gen = greedy_answers(self.peft, self.tok, prompts, MAX_NEW_TOKENS, self.batch_size, per_prompt)
        return {n: task_accuracy([g for g, o in zip(gen, owners) if o == i], [a for a, o in zip(answers, owners) if o == i])
                for i, n in enumerate(names)}

    def base(self) -> dict[str, float]:
        with self.peft.disable_adapter():
            return self._accuracies(list(self.items), None)

    def adapters(self, dirs: dict[str, Path]) -> dict[str, float]:
        slots = [f"candidate{i}" for i in range(len(dirs))]  # PEFT names may not contain '.'
        try:
            for slot, d in zip(slots, dirs.values()):
                self.peft.load_adapter(str(d), adapter_name=slot)
            return self._accuracies(list(dirs), slots)
        finally:
            self.peft.set_adapter("anchor")
            for slot in slots:
                if slot in self.peft.peft_config:
                    self.peft.delete_adapter(slot)


def bundle_row(bundle: Path, ev: Evaluator, work: Path) -> dict:
    """Accuracy of every adapter's PEFT export of ``bundle`` plus its stored error and sizes."""
    from soppu_client.format.bundle import Bundle, export_peft

    b = Bundle.open(bundle)
    dirs = {n: export_peft(b, n, work / "export" / n) for n in ev.items}
    acc = ev.adapters(dirs)
    m = b.manifest
    summary, sizes = m.metrics.summary, m.metrics.sizes
    bf16 = 2 * sizes.params_before
    row = {
        "accuracy": acc,
        "mean_module_error": sum(a["mean_module_error"] for a in summary["adapters"].values()) / len(summary["adapters"]),
        "mean_error": summary["mean_error"],
        "params_before": sizes.params_before,
        "params_after": sizes.params_after,
        "param_ratio": sizes.param_ratio,
        "source_bf16_bytes": bf16,
        "tensor_bytes": sizes.tensor_bytes,
        "byte_ratio": bf16 / sizes.tensor_bytes if sizes.tensor_bytes else None,
    }
    if m.fit.get("storage"):  # per-module k and bits (budget / bits): counted by (k, basis bits, core bits)
        plan = m.fit["storage"]
        mods = plan.get("modules", {}) if isinstance(plan, dict) else {}
        counts: dict[str, int] = {}
        for spec in mods.values():
            key = f"k={spec.get('k')} basis={spec.get('basis_bits')}b core={spec.get('core_bits')}b"
            counts[key] = counts.get(key, 0) + 1
        row["storage"] = {**{k: v for k, v in plan.items() if k != "modules"}, "modules_by_choice": counts}
    if m.fit.get("calibration_used"):
        row["calibration_used"] = m.fit["calibration_used"]
    return row


def compress(c: dict, dirs: list[Path], out: Path, stats_cache: dict) -> float:
    """Write the bundle of config ``c`` to ``out``; return the compressor's seconds."""
    from soppu_client.adapters import load_collection
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_collection

    if c["kind"] == "reference":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from reference_jd import reference_bundle  # type: ignore[import-not-found]

        start = time.perf_counter()
        reference_bundle([str(d) for d in dirs], out, c["rank"], c.get("iters", 10))
        return time.perf_counter() - start
    kw: dict = {"rank": c["rank"], "method": c["method"], "weighting": c["weighting"]}
    if c["bits"] is not None:
        kw["bits"] = c["bits"]
    if c.get("group_size"):
        kw["group_size"] = c["group_size"]
    if c["budget"] is not None:
        kw["budget"] = c["budget"]
    if c["calibration"]:
        a, b = c["calibration"]
        kw.update(calibration="auto", calibration_output_power=float(a), calibration_input_power=float(b))
    else:
        kw["calibration"] = "none"
    config = CompressConfig(**kw)
    collection = load_collection([str(d) for d in dirs])
    stats = None
    if c["calibration"]:
        from soppu_client.compress.calibration import prepare

        if "stats" not in stats_cache:  # the statistics do not depend on the powers: compute once
            start = time.perf_counter()
            stats_cache["stats"] = load_stats(stats_cache["path"])
            if stats_cache["stats"] is None:
                stats_cache["stats"], _ = prepare(collection, config, max_per_adapter=stats_cache["max_per_adapter"])
                save_stats(stats_cache["path"], stats_cache["stats"])
            stats_cache["seconds"] = time.perf_counter() - start
        stats = stats_cache["stats"]
        if stats is None:
            raise RuntimeError("no adapter has calibration.jsonl; write them with examples/train_adapters.py "
                               "--calibration-only")
    start = time.perf_counter()
    compress_collection(collection, out, config, calibration_stats=stats)
    return time.perf_counter() - start


def save_stats(path: Path, stats: dict | None) -> None:
    """Cache calibration statistics (local only: second moments, never prompts) as float32 npz."""
    import numpy as np

    if stats is None:
        return
    arrays = {f"{m}|{k}": getattr(st, k).astype(np.float32) for m, st in stats.items() for k in ("sigma", "gamma")}
    arrays.update({f"{m}|tokens": np.array(st.tokens) for m, st in stats.items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_stats(path: Path) -> dict | None:
    import numpy as np

    from soppu_client.compress.calibration import ModuleStats

    if not path.is_file():
        return None
    with np.load(path) as z:
        modules = sorted({k.split("|")[0] for k in z.files})
        return {m: ModuleStats(sigma=z[f"{m}|sigma"].astype(np.float64), gamma=z[f"{m}|gamma"].astype(np.float64),
                               tokens=int(z[f"{m}|tokens"])) for m in modules}


# ---------------------------------------------------------------------------------------- driver


def cached_path(cache: Path, key: dict) -> Path:
    return cache / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")


def cached(cache: Path, key: dict, compute) -> tuple[dict, bool]:
    path = cached_path(cache, key)
    if path.is_file():
        return json.loads(path.read_text()), True
    row = compute()
    if row.get("status") != "error":
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, sort_keys=True))
        tmp.replace(path)
    return row, False


def summarize(row: dict, original: dict[str, float]) -> dict:
    acc = row.get("accuracy")
    if acc:
        row["mean_accuracy"] = sum(acc.values()) / len(acc)
        row["accuracy_kept"] = sum(acc.values()) / max(sum(original.values()), 1e-12)
    return row


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("byte_ratio"):
            c = r["config"]
            g = ("reference JD-Full" if c["kind"] == "reference" else
                 f"{c['method']}" + (f" {c['bits']}-bit" if c["bits"] else "") + (" budget" if c["budget"] else "")
                 + (" calib" if c["calibration"] else ""))
            groups.setdefault(g, []).append(r)
    for g, rs in sorted(groups.items()):
        ax.scatter([r["byte_ratio"] for r in rs], [100 * r["accuracy_kept"] for r in rs], label=g,
                   marker="*" if g.startswith("reference") else "o", s=80 if g.startswith("reference") else 30)
        for r in rs:
            ax.annotate(r["label"].split(" ")[0] if not r["config"]["budget"] else r["config"]["budget"],
                        (r["byte_ratio"], 100 * r["accuracy_kept"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.axhline(100 * GOAL_KEPT, color="k", lw=0.8, ls="--")
    ax.axvline(GOAL_RATIO, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("byte compression ratio (source tensors at bf16 / bundle tensor bytes)")
    ax.set_ylabel("task accuracy kept (%)")
    ax.set_title("Exact-match accuracy kept vs compression (goal: >= 99% at >= 9x)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", nargs="+", type=Path, help="adapter dirs (default: examples/adapters/*/)")
    ap.add_argument("--max-adapters", type=int, help="use only the first N adapters")
    ap.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    ap.add_argument("--only", help="comma list of substrings (or =exact labels); run only the configs they match")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "soppu" / "fidelity")
    ap.add_argument("--no-cache", action="store_true", help="recompute every row (and do not store)")
    ap.add_argument("--refresh", action="store_true",
                    help="recompute rows computed by other compressor code (each row records a digest of "
                         "soppu_client/compress, format/bundle.py, metrics.py)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "soppu-fidelity" / "fidelity.json",
                    help="JSON output file")
    ap.add_argument("--plot", type=Path, help="PNG plot (default: beside --out)")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per greedy-decoding batch (mixed adapters)")
    ap.add_argument("--calibration-prompts", type=int, default=16,
                    help="calibration prompts used per adapter (of its calibration.jsonl)")
    ap.add_argument("--max-prompts", type=int, help="use only the first N prompts of each prompts.json")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dirs = adapter_dirs(args.adapters, args.max_adapters)
    digests = {d.name: adapter_digest(d) for d in dirs}
    code = digest(sorted((ROOT / "soppu_client" / "compress").glob("*.py"))
                  + [ROOT / "soppu_client" / "format" / "bundle.py", ROOT / "soppu_client" / "metrics.py"])
    base_key = {"v": VERSION, "adapters": digests, "max_new_tokens": MAX_NEW_TOKENS, "max_prompts": args.max_prompts}
    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    ev: Evaluator | None = None

    def evaluator() -> Evaluator:
        nonlocal ev
        if ev is None:
            ev = Evaluator(dirs, args.batch_size, args.max_prompts)
        return ev

    def get(key: dict, compute):
        if args.no_cache:
            return compute(), False
        return cached(cache, {**base_key, **key}, compute)

    base, _ = get({"row": "base"}, lambda: {"status": "ok", "accuracy": evaluator().base()})
    original, _ = get({"row": "original"}, lambda: {"status": "ok", "accuracy": evaluator().adapters(
        {d.name: d for d in dirs})})
    orig_acc = original["accuracy"]
    configs = grid(args.quick)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        configs = [c for c in configs if any(label(c) == w[1:] if w.startswith("=") else w in label(c) for w in wanted)]
    stats_key = hashlib.sha256(json.dumps({**base_key, "per_adapter": args.calibration_prompts,
                                            "damping": 0.01}, sort_keys=True).encode()).hexdigest()[:32]
    stats_cache: dict = {"max_per_adapter": args.calibration_prompts,
                         "path": cache / f"calibration-{stats_key}.npz"}
    rows = []
    for c in configs:
        reason = supported(c)
        if reason:
            rows.append({"label": label(c), "config": c, "status": "skipped", "reason": reason})
            continue

        def compute(c=c) -> dict:
            with tempfile.TemporaryDirectory(prefix="soppu-fidelity-") as tmp:
                try:
                    seconds = compress(c, dirs, Path(tmp) / "bundle", stats_cache)
                except Exception as exc:  # a grid point the compressor refuses is reported, not fatal
                    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                row = bundle_row(Path(tmp) / "bundle", evaluator(), Path(tmp))
            return {"status": "ok", "compress_seconds": round(seconds, 2), "code": code[:12], **row}

        t0 = time.perf_counter()
        row, hit = get({"row": c}, compute)
        if hit and args.refresh and row.get("code") not in (None, code[:12]):
            row, hit = compute(), False
            cached_path(cache, {**base_key, "row": c}).write_text(json.dumps(row, sort_keys=True))
        row = summarize({"label": label(c), "config": c, **row, "cached": hit}, orig_acc)
        print(f"[fidelity] {row['label']}: {row.get('status')} kept={row.get('accuracy_kept', float('nan')):.3f} "
              f"bytes x{row.get('byte_ratio') or float('nan'):.1f} ({time.perf_counter() - t0:.0f}s"
              f"{', cached' if hit else ''})", file=sys.stderr)
        rows.append(row)
    ok = [r for r in rows if r.get("status") == "ok"]
    goal = [r for r in ok if r["accuracy_kept"] >= GOAL_KEPT and (r.get("byte_ratio") or 0) >= GOAL_RATIO]
    best = max(goal, key=lambda r: r["byte_ratio"]) if goal else None
    result = {
        "benchmark": "fidelity",
        "adapters": list(digests),
        "prompts_per_adapter": {n: len(json.loads((d / "prompts.json").read_text())) for n, d in zip(digests, dirs)},
        "accuracy_definition": "exact match of greedy decoding (chat template, max_new_tokens=16) on prompts.json",
        "error_definition": "mean over adapters and modules of ||dW - U S V^T||_F / ||dW||_F (unsquared), stored values",
        "bytes_definition": "byte_ratio = source tensors at bf16 (2 bytes/param) / bundle tensor bytes",
        "base": summarize(dict(base), orig_acc),
        "original": summarize(dict(original), orig_acc),
        "rows": rows,
        "calibration_statistics_seconds": round(stats_cache["seconds"], 1) if "seconds" in stats_cache else None,
        "goal": {"accuracy_kept": GOAL_KEPT, "byte_ratio": GOAL_RATIO, "met": best is not None,
                 "best": best and {"label": best["label"], "accuracy_kept": best["accuracy_kept"],
                                   "byte_ratio": best["byte_ratio"], "param_ratio": best["param_ratio"]}},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(plot(rows, args.plot or args.out.with_suffix(".png")))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
