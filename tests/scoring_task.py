"""A dataset task on which the random tiny model scores now and then, so rewards differ within a group and the
policy-gradient term is non-zero (on the arithmetic task a random model gets every answer wrong: all rewards are
-1, every group-relative advantage is 0 and only the KL term moves the weights).

How it works (investigated on ``rpg_core.models.tiny_model``): a random model with tied embeddings mostly repeats
its last input token (the residual stream carries that token's embedding, and the tied output head scores it
highest), and its next few candidates depend on the seed and the context. With ``train.seed=23`` (the tiny model
of seed 23) and the raw prompt ``"Compute k * 0.\\n\\n"`` the digit token ``0`` ranks 2nd to 7th of 49,152 after
the final ``\\n\\n``; with ``rollout.top_k=3`` about 8% of 8-token responses contain a run of zeros as their last number,
which the lenient rule (last integer, compared as ints: ``00`` == 0) scores correct against the answer ``0``.
Anything that changes the tiny model, the tokenizer, the prompt rendering or sampling changes that rate: the
tests using this task assert that some samples scored, so such a change shows as a failure, not as silence.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 23


def write_zero_task(folder: Path) -> Path:
    """Nine problems "Compute k * 0." (k = 1..9), answer "0", as a JSONL file under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "times_zero.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Compute {k} * 0.", "answer": "0"}) + "\n" for k in range(1, 10)))
    return path


def overrides(source: Path) -> list[str]:
    """The config overrides that select the task (model, seed, prompt, sampling, rule)."""
    return [
        "model.name=tiny",
        f"train.seed={SEED}",
        "data.task=dataset",
        f"data.source={source}",
        "data.n_eval=0",
        "data.template=raw",
        "data.chat_template=false",
        "rollout.top_k=3",
        "rollout.max_new_tokens=8",
        "reward.rule=lenient",
    ]
