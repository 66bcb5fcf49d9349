"""The run's prompts (the data room, as the trainer uses it): its training and held-out problems, and the training
prompts in their seeded order, rendered with the run's template. ``load_problems`` needs no torch: ``rpg train``
reads (and refuses) the data before torch and the model load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rpg_core import data as data_mod
from rpg_core.config import RunConfig, Task

if TYPE_CHECKING:
    from rpg_core.rollout import Prompt

__all__ = ["PromptStream", "load_problems"]


def load_problems(cfg: RunConfig) -> tuple[list[data_mod.Problem], list[data_mod.Problem]]:
    """The run's training problems and held-out problems (``data.eval_source``, else the last ``data.n_eval``)."""
    d = cfg.data
    if d.task is Task.ARITHMETIC:
        return data_mod.arithmetic_split(data_mod.ArithmeticLevel(d.level), d.n_train, d.n_eval, cfg.train.seed)
    train = data_mod.load_problems(d.source, split=d.split, problem_key=d.problem_key, answer_key=d.answer_key, limit=d.limit)
    if d.eval_source:
        evals = data_mod.load_problems(d.eval_source, problem_key=d.problem_key, answer_key=d.answer_key, limit=d.n_eval)
    elif d.n_eval:
        if len(train) <= d.n_eval:
            raise ValueError(f"data.n_eval={d.n_eval} leaves no training problems out of {len(train)}")
        evals, train = train[-d.n_eval :], train[: -d.n_eval]
    else:
        evals = []
    if not train:
        raise ValueError(f"data.source={d.source!r} has no problems")
    return train, evals


class PromptStream:
    """The training prompts in a seeded, per-epoch shuffled order (the same on every process), rendered with the
    run's template and left-truncated (spec §8). ``cursor``: prompts consumed so far (saved in checkpoints)."""

    def __init__(self, cfg: RunConfig, tokenizer, problems: list[data_mod.Problem]):
        self.cfg, self.tok, self.problems = cfg, tokenizer, problems
        self.example = data_mod.arithmetic_example(cfg.data.level) if cfg.data.task is Task.ARITHMETIC else None
        self.cursor = 0
        self._cache: dict[int, list[int]] = {}

    def ids(self, problem: data_mod.Problem) -> list[int]:
        msgs = data_mod.build_messages(
            problem,
            data_mod.PromptTemplate(self.cfg.data.template),
            *((self.example[0], self.example[1]) if self.example else ()),
        )
        text = data_mod.render_prompt(self.tok, msgs, chat_template=self.cfg.data.chat_template)
        ids = self.tok(text, add_special_tokens=not self.cfg.data.chat_template)["input_ids"]
        return ids[-self.cfg.data.max_prompt_tokens :]  # left truncation (spec §8)

    def next(self, k: int) -> list[Prompt]:
        """The next ``k`` prompts."""
        import torch

        from rpg_core.rollout import Prompt

        out = []
        n = len(self.problems)
        for _ in range(k):
            epoch, i = divmod(self.cursor, n)
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            idx = int(torch.randperm(n, generator=g)[i])
            self.cursor += 1
            if idx not in self._cache:
                self._cache[idx] = self.ids(self.problems[idx])
            out.append(Prompt(self.problems[idx], self._cache[idx]))
        return out
