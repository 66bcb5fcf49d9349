"""The typed result of one step's sampling: what the trainer passes on to rewards, advantages and the update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    the decoded ``texts`` and their ``scores`` under the run's answer rule."""

    prompts: list[Prompt] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    stats: SamplingStats = field(default_factory=SamplingStats)

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
                       pick(self.scores), self.stats)  # fmt: skip
