"""Evaluation throughput on CPU (samples/s, generated tokens/s) and how it scales with the generate batch size.

``rpg_core.evaluation.evaluate`` on the embedded default model (SmolLM2-135M-Instruct, ``smollm2-135m``) with the
first ``--problems`` problems of AIME 2024, ``--k`` samples per problem at the paper's sampling (temperature 1,
top-p 1), at most ``--max-new-tokens`` new tokens, with the prefix-sharing sampler (one prefill per prompt, rows
leave the batch at EOS). ``--batch-sizes`` sets ``EvalConfig.batch_size`` (sequences per generate call): below k a
problem's k samples are split into draws of batch_size (one prefill each); at or above k, batch_size // k problems
share one call.

Each (precision, batch size) runs in its own fresh child process (this script with a hidden ``--one``), so its
peak RSS (``ru_maxrss``, model loading included) is its own. A child loads the model, makes one small warm-up
``evaluate()`` call (1 problem, 8 new tokens, same batch size and precision), then times ``--repeats`` full calls
(the median is reported). ``bf16`` is ``torch.autocast(bfloat16)`` over the fp32 weights, as ``rpg eval
--precision bf16`` does.

    .venv/bin/python benchmarks/bench_eval.py                                   # fp32, batch 4..64, 4 x 16 samples
    .venv/bin/python benchmarks/bench_eval.py --precision fp32,bf16
    .venv/bin/python benchmarks/bench_eval.py --batch-sizes 4,16 --problems 1 --k 4 --max-new-tokens 16  # smoke

Sampling is seeded per generate call, so different batch sizes draw different samples (and lengths); tokens/s is
the fairer throughput comparison when the mean response length differs between rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
BENCHMARK = "aime24"
GIB = 1024**3
MARK = "BENCH_EVAL_JSON "
PRECISIONS = ("fp32", "bf16")


def _ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {s!r}")
    return out


def _precisions(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in PRECISIONS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"precision: allowed {list(PRECISIONS)}, got {s!r}")
    return list(dict.fromkeys(out))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mean_at_k(metrics: dict) -> float | None:
    """The Mean@k accuracy, whatever its key's spelling (for information only)."""
    return next((v for key, v in metrics.items() if key.lower().startswith("mean") and not key.endswith("_se")), None)


def _prefills(problems: int, k: int, batch_size: int) -> int:
    """Generate chunks (= prompt prefills) evaluate() makes: see rpg_core.evaluation._calls."""
    if k > batch_size:
        return problems * -(-k // batch_size)
    per_call = batch_size // k
    return -(-problems // per_call)


# -- one configuration, in a fresh process ------------------------------------------------------------------------


def run_one(a: argparse.Namespace, precision: str, batch_size: int) -> dict:
    import torch

    from rpg_core.config import EvalConfig
    from rpg_core.evaluation import evaluate, load_benchmark
    from rpg_core.models import load_model, load_tokenizer

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(MODEL)
    model = load_model(MODEL).eval()
    model.config.use_cache = True
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_bytes()
    autocast = torch.bfloat16 if precision == "bf16" else None
    lb = load_benchmark(BENCHMARK, limit=a.problems)
    if len(lb.problems) < a.problems:
        raise SystemExit(f"{BENCHMARK} has only {len(lb.problems)} problems, asked for {a.problems}")

    warm = load_benchmark(BENCHMARK, limit=1)
    wk = min(a.k, batch_size)
    t0 = time.perf_counter()
    evaluate(model, tok, [warm], EvalConfig(benchmarks=[BENCHMARK], k=wk, batch_size=batch_size, seed=0),
             max_new_tokens=8, autocast=autocast, progress=False)  # fmt: skip
    warmup_s = time.perf_counter() - t0
    rss_warm = _rss_bytes()

    settings = EvalConfig(benchmarks=[BENCHMARK], k=a.k, batch_size=batch_size, seed=a.seed)
    reps = []
    for _ in range(a.repeats):
        c0 = time.process_time()
        r = evaluate(model, tok, [lb], settings, max_new_tokens=a.max_new_tokens, autocast=autocast, progress=False)
        cpu_s = time.process_time() - c0  # ~ threads x seconds on a quiet machine; less: the process was starved
        m = r.results[BENCHMARK].metrics
        reps.append({
            "seconds": r.seconds, "cpu_s": cpu_s, "n_samples": r.n_samples, "n_tokens": r.n_tokens,
            "samples_per_s": r.samples_per_s, "tokens_per_s": r.tokens_per_s,
            "response_length": m["response_length"], "truncated": m["truncated"],
            "mean@k": _mean_at_k(m), "format": m.get("format"),
        })  # fmt: skip
    med = statistics.median(x["seconds"] for x in reps)
    best = min(reps, key=lambda x: abs(x["seconds"] - med))  # the median repeat (sampling is seeded: same tokens)
    return {
        "precision": precision,
        "batch_size": batch_size,
        "prefills": _prefills(a.problems, a.k, batch_size),
        "seconds": med,
        # CPU time / (threads x wall) of the median repeat: ~1.0 on a quiet machine, well below 1 when the process
        # was starved by other load (its row is then not comparable)
        "cpu_use": best["cpu_s"] / (torch.get_num_threads() * best["seconds"]),
        "samples_per_s": best["n_samples"] / med,
        "tokens_per_s": best["n_tokens"] / med,
        "n_samples": best["n_samples"],
        "n_tokens": best["n_tokens"],
        "response_length": best["response_length"],
        "truncated": best["truncated"],
        "mean@k": best["mean@k"],
        "format": best["format"],
        "load_s": load_s,
        "warmup_s": warmup_s,
        "rss_loaded_gib": rss_loaded / GIB,
        "rss_after_warmup_gib": rss_warm / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,  # KiB on Linux
        "threads": torch.get_num_threads(),
        "repeats": reps,
    }


def run_child(a: argparse.Namespace, precision: str, batch_size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{precision}:{batch_size}", "--k", str(a.k),
           "--problems", str(a.problems), "--max-new-tokens", str(a.max_new_tokens), "--threads", str(a.threads),
           "--repeats", str(a.repeats), "--seed", str(a.seed)]  # fmt: skip
    threads = str(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"child {precision}:{batch_size} failed (rc {p.returncode})")
    res = json.loads(lines[-1][len(MARK) :])
    res["child_wall_s"] = time.perf_counter() - t0
    print(f"  {precision} batch {batch_size:>3}: {res['seconds']:7.1f} s, {res['samples_per_s']:6.2f} samples/s, "
          f"{res['tokens_per_s']:7.1f} tok/s, peak RSS {res['peak_rss_gib']:.2f} GiB "
          f"(child {res['child_wall_s']:.0f} s)", flush=True)  # fmt: skip
    return res


# -- report -------------------------------------------------------------------------------------------------------


def add_speedups(runs: list[dict]) -> None:
    """Speedup vs the smallest batch size of the same precision; bf16 vs fp32 at the same batch size."""
    for prec in dict.fromkeys(r["precision"] for r in runs):
        rows = [r for r in runs if r["precision"] == prec]
        base = min(rows, key=lambda r: r["batch_size"])
        for r in rows:
            r["speedup_samples"] = r["samples_per_s"] / base["samples_per_s"]
            r["speedup_tokens"] = r["tokens_per_s"] / base["tokens_per_s"]
    fp32 = {r["batch_size"]: r for r in runs if r["precision"] == "fp32"}
    for r in runs:
        ref = fp32.get(r["batch_size"])
        r["tokens_vs_fp32"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None


def table(runs: list[dict]) -> str:
    head = ["precision", "batch", "prefills", "samples/s", "tokens/s", "seconds", "mean resp tok", "truncated",
            "peak RSS GiB", "CPU use", "speedup samples/s", "speedup tokens/s"]  # fmt: skip
    rows = [[r["precision"], str(r["batch_size"]), str(r["prefills"]), f"{r['samples_per_s']:.2f}",
             f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.1f}", f"{r['response_length']:.1f}",
             f"{100 * r['truncated']:.0f}%", f"{r['peak_rss_gib']:.2f}", f"{100 * r['cpu_use']:.0f}%",
             f"{r['speedup_samples']:.2f}x",
             f"{r['speedup_tokens']:.2f}x"] for r in runs]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx", "avx2")))
    except OSError:
        pass
    return {"processor": model, "bf16_flags": flags}


def _git() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "rpg_core")
    return {"commit": git("rev-parse", "HEAD"), "rpg_core_dirty": bool(status) if status is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=_ints, default=[4, 8, 16, 32, 64], help="comma list (EvalConfig.batch_size)")
    p.add_argument("--k", type=int, default=16, help="samples per problem")
    p.add_argument("--problems", type=int, default=4, help=f"the first N problems of {BENCHMARK}")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--precision", type=_precisions, default=["fp32"], help="comma list of fp32, bf16 (autocast)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of each child")
    p.add_argument("--repeats", type=int, default=1, help="timed evaluate() calls per configuration (median)")
    p.add_argument("--seed", type=int, default=0, help="EvalConfig.seed")
    p.add_argument("--out", default="benchmarks/results/eval_throughput.json", help="JSON with every number")
    p.add_argument("--one", help=argparse.SUPPRESS)  # PRECISION:BATCH, run in this process, print JSON
    a = p.parse_args(argv)
    if min(a.k, a.problems, a.max_new_tokens, a.threads, a.repeats) < 1:
        p.error("--k, --problems, --max-new-tokens, --threads and --repeats must be >= 1")

    if a.one:
        prec, bs = a.one.split(":")
        res = run_one(a, prec, int(bs))
        print(MARK + json.dumps(res), flush=True)
        return 0

    import torch
    import transformers

    print(f"{MODEL} on CPU, {a.threads} threads: {BENCHMARK} first {a.problems} problems x k={a.k} "
          f"= {a.problems * a.k} samples, <= {a.max_new_tokens} new tokens, precision {','.join(a.precision)}, "
          f"batch sizes {','.join(map(str, a.batch_sizes))}, {a.repeats} repeat(s)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    runs = [run_child(a, prec, bs) for prec in a.precision for bs in sorted(a.batch_sizes)]
    add_speedups(runs)
    print()
    print(table(runs))
    starved = [f"{r['precision']}:{r['batch_size']}" for r in runs if r["cpu_use"] < 0.85]
    if starved:
        print(f"WARNING: {', '.join(starved)} got < 85% of {a.threads} cores (other load on the machine); rerun them")
    for r in runs:
        if r["tokens_vs_fp32"] is not None and r["precision"] != "fp32":
            print(f"bf16 / fp32 tokens/s at batch {r['batch_size']}: {r['tokens_vs_fp32']:.2f}x")
    out = {
        "args": {k: v for k, v in vars(a).items() if k != "one"},
        "model": MODEL,
        "benchmark": BENCHMARK,
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "threads": a.threads, "cpu_count": os.cpu_count(),
                 "machine": platform.machine(), **_cpu_info()},  # fmt: skip
        "git": _git(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_wall_s": time.perf_counter() - t0,
        "runs": runs,
    }
    path = Path(a.out)
    if not path.is_absolute():
        path = ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"({out['total_wall_s']:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
