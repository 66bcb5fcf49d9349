"""Rollout throughput, vLLM (colocated, in-process, CPU) vs the prefix sampler vs HF generate, and the cost of one
weight sync (+ its log-prob check): the embedded default SmolLM2-135M in fp32, 64 new tokens (EOS ignored: every
engine samples exactly 64 tokens a row), temperature 1. Needs the vLLM venv:

    make install-vllm
    LD_PRELOAD=$PWD/.venv-vllm/lib/libiomp5.so .venv-vllm/bin/python benchmarks/bench_vllm.py

Writes benchmarks/results/vllm.json. Speed numbers live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NOTE = ("vLLM also stops a row at the model config's EOS (id 2), which the other engines were told to ignore: "
        "its row lengths differ, tokens_per_s counts the tokens it sampled")
OUT = Path(__file__).resolve().parent / "results" / "vllm.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch
    import vllm

    from rpg_core import models
    from rpg_core.config import GeneratorKind, RolloutConfig
    from rpg_core.data import arithmetic_problems
    from rpg_core.rollout import SamplingParams, make_generator

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tok = models.load_tokenizer(models.EMBEDDED_DEFAULT)
    model = models.load_model(models.EMBEDDED_DEFAULT, dtype=torch.float32)
    problems = arithmetic_problems("add2", args.prompts, seed=0)
    texts = [tok.apply_chat_template([{"role": "user", "content": p.problem}], add_generation_prompt=True,
                                     tokenize=False) for p in problems]  # fmt: skip
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # never stop early: every engine samples new_tokens a row (EOS is a token id no engine will draw in practice)
    tok = SimpleNamespace(eos_token_id=len(tok) - 1, pad_token_id=tok.pad_token_id)
    batch = args.prompts * args.n
    results: dict[str, dict] = {}

    def timed(gen, label: str) -> None:
        params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
        gen.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = gen.generate(prompts, params, batch_size=batch)
            best = min(best, time.perf_counter() - t)
        toks = sum(len(r) for g in out for r in g)
        results[label] = {"seconds": round(best, 3), "tokens": toks, "tokens_per_s": round(toks / best, 1)}
        print(label, results[label], flush=True)

    model.eval()
    for kind in (GeneratorKind.PREFIX, GeneratorKind.HF):
        timed(make_generator(kind, model, tok, batch_size=batch), kind.value)

    t = time.perf_counter()
    gen = make_generator(GeneratorKind.VLLM, model, tok, batch_size=batch,
                         rollout=RolloutConfig(generator=GeneratorKind.VLLM))  # fmt: skip
    build = time.perf_counter() - t
    timed(gen, "vllm")
    results["vllm"]["build_seconds"] = round(build, 2)

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
    results["sync"] = {"seconds": round(min(syncs), 3), "check_seconds_32_tokens": round(min(checks), 3),
                       "logp_abs_diff_after_sync": diff}  # fmt: skip
    print("sync", results["sync"], flush=True)

    report = {
        "what": "rollout tokens/s at 64 new tokens, fp32, temperature 1, embedded default SmolLM2-135M; "
                "vLLM colocated in-process (CPU); best of repeats; weight sync + log-prob check",
        "note": NOTE,
        "machine": {"cpus": threads, "python": platform.python_version(), "torch": torch.__version__,
                    "vllm": vllm.__version__,  # the preloaded library's name only: no machine path in the results
                    "LD_PRELOAD": " ".join(Path(p).name for p in os.environ.get("LD_PRELOAD", "").split())},
        "settings": {"prompts": args.prompts, "n": args.n, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
