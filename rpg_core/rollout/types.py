"""The typed result of one step's sampling: what the trainer passes on to rewards, advantages and the update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .logprobs import RolloutBatch, build_batch

if TYPE_CHECKING:
    from rpg_core.data import Problem
    from rpg_core.rewards import Score

__all__ = ["Prompt", "Rollout", "SamplingStats"]


@dataclass(frozen=True)
class Prompt:
    problem: Problem
    ids: list[int]  # the rendered, left-truncated prompt's token ids


@dataclass
class SamplingStats:
    """Counts over every group sampled this step (all rounds), before the DAPO group filter (spec §6.2)."""

    rounds: int = 0
    groups_seen: int = 0
    groups_mixed: int = 0  # groups whose accuracies differ
    acc_sum: float = 0.0
    samples: int = 0


@dataclass
class Rollout:
    """One process's kept samples of a step: ``n`` responses for each of ``prompts`` (the kept groups).
    Per sample: ``responses`` (token ids, EOS included when finished), ``group_ids`` (an index into ``prompts``),
    the decoded ``texts`` and their ``scores`` under the run's answer rule. ``engine_logps``: per sample, the
    sampling engine's log-prob of each response token, when the engine has its own weights (vLLM; None for the
    built-in engines): for mismatch metrics and corrections only, the loss recomputes its own."""

    prompts: list[Prompt] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    stats: SamplingStats = field(default_factory=SamplingStats)
    engine_logps: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.responses)

    def answers(self) -> list[str]:
        """The ground truth of every sample."""
        return [self.prompts[g].problem.answer for g in self.group_ids]

    def batch(self, pad: int) -> RolloutBatch:
        """Prompt + response rows, padded for the forward passes."""
        return build_batch([self.prompts[g].ids for g in self.group_ids], self.responses, self.group_ids, pad)

    def first_groups(self, k: int) -> Rollout:
        """The rollout cut to its first ``k`` groups."""
        rows = [j for j, g in enumerate(self.group_ids) if g < k]
        pick = lambda xs: [xs[j] for j in rows]  # noqa: E731
        return Rollout(self.prompts[:k], pick(self.responses), pick(self.group_ids), pick(self.texts),
                       pick(self.scores), self.stats,
                       None if self.engine_logps is None else pick(self.engine_logps))  # fmt: skip

    def engine_logp_tensor(self, width: int) -> torch.Tensor | None:
        """``engine_logps`` as a [B, width] float32 tensor (0 on padding), the layout of ``batch().response_mask``."""
        if self.engine_logps is None:
            return None
        out = torch.zeros((len(self.engine_logps), width), dtype=torch.float32)
        for i, row in enumerate(self.engine_logps):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return out
