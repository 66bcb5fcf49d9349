"""Tasks and datasets: the paper's prompt template (spec §8), the built-in arithmetic task, JSONL/parquet files
and Hugging Face datasets, all as ``Problem(id, problem, answer)`` with the answer a string (never an int64)."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "PAPER_PREFIX",
    "PAPER_SUFFIX",
    "ArithmeticLevel",
    "Problem",
    "PromptTemplate",
    "arithmetic_example",
    "arithmetic_problems",
    "arithmetic_split",
    "build_messages",
    "load_problems",
    "render_prompt",
    "shared_data_dir",
]

# The paper's template, extracted programmatically from prompt[0].content of the shipped parquets (spec §8);
# tests/test_data.py checks the sha256 of both and that every parquet row equals PREFIX + raw_problem + SUFFIX.
PAPER_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
PAPER_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


class PromptTemplate(StrEnum):
    PAPER = "paper"  # one user turn: PREFIX + problem + SUFFIX (spec §8)
    PAPER_ONESHOT = "paper_oneshot"  # the same, after one worked example turn (small models need it, model.md)
    RAW = "raw"  # the bare problem


def shared_data_dir() -> Path | None:
    """``$RPG_SHARED_DATA`` or ``../shared/data`` next to the repository (development and tests only)."""
    env = os.environ.get("RPG_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None


# -- the built-in arithmetic task ----------------------------------------------------------------------------------


class ArithmeticLevel(StrEnum):
    ADD1 = "add1"  # single-digit addition
    SUB1 = "sub1"  # single-digit subtraction (answers may be negative)
    MUL1 = "mul1"  # single-digit multiplication
    ADD2 = "add2"  # two-digit addition (the demo task)
    MUL2X1 = "mul2x1"  # two-digit times one-digit
    ADD3 = "add3"  # three-digit addition


_OPS = {
    ArithmeticLevel.ADD1: ("+", (0, 9), (0, 9)),
    ArithmeticLevel.SUB1: ("-", (0, 9), (0, 9)),
    ArithmeticLevel.MUL1: ("*", (0, 9), (0, 9)),
    ArithmeticLevel.ADD2: ("+", (10, 99), (10, 99)),
    ArithmeticLevel.MUL2X1: ("*", (10, 99), (2, 9)),
    ArithmeticLevel.ADD3: ("+", (100, 999), (100, 999)),
}


def _make(level: ArithmeticLevel, a: int, b: int) -> Problem:
    op = _OPS[level][0]
    ans = a + b if op == "+" else a - b if op == "-" else a * b
    sym = "\\times" if op == "*" else op
    return Problem(f"{level.value}-{a}{op}{b}", f"What is ${a} {sym} {b}$?", str(ans))


def _all_pairs(level: ArithmeticLevel) -> list[tuple[int, int]]:
    _, (a0, a1), (b0, b1) = _OPS[level]
    return [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)]


def arithmetic_split(level: ArithmeticLevel | str, n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problems of ``level``, deterministic in (level, sizes, seed). The held-out set
    depends on the seed only (not on n_train), and the one-shot example is never in either."""
    level = ArithmeticLevel(level)
    ex = arithmetic_example(level)[0]
    pairs = [p for p in _all_pairs(level) if _make(level, *p).id != ex.id]
    random.Random(f"rpg-arith-{level.value}-{seed}").shuffle(pairs)
    if n_eval >= len(pairs):
        raise ValueError(f"data.n_eval={n_eval}: level {level.value} has only {len(pairs)} distinct problems")
    evals = [_make(level, *p) for p in pairs[:n_eval]]
    rest = pairs[n_eval:]
    train = [_make(level, *rest[i % len(rest)]) for i in range(n_train)]  # small levels repeat problems
    return train, evals


def arithmetic_problems(level: ArithmeticLevel | str, n: int, seed: int) -> list[Problem]:
    return arithmetic_split(level, n, 0, seed)[0]


_EXAMPLES = {
    ArithmeticLevel.ADD1: (4, 3), ArithmeticLevel.SUB1: (8, 5), ArithmeticLevel.MUL1: (6, 7),
    ArithmeticLevel.ADD2: (27, 45), ArithmeticLevel.MUL2X1: (23, 4), ArithmeticLevel.ADD3: (358, 267),
}  # fmt: skip


def arithmetic_example(level: ArithmeticLevel | str) -> tuple[Problem, str]:
    """A fixed worked example of ``level`` for the one-shot template: (problem, solution ending in "Answer: x")."""
    level = ArithmeticLevel(level)
    a, b = _EXAMPLES[level]
    p = _make(level, a, b)
    op = _OPS[level][0]
    if level is ArithmeticLevel.ADD2:
        steps = f"Add the tens: {a // 10 * 10} + {b // 10 * 10} = {a // 10 * 10 + b // 10 * 10}. Add the ones: " \
                f"{a % 10} + {b % 10} = {a % 10 + b % 10}. Together: {a // 10 * 10 + b // 10 * 10} + {a % 10 + b % 10} = {p.answer}."
    else:
        steps = f"{a} {op.replace('*', 'times')} {b} = {p.answer}."
    return p, f"{steps}\nAnswer: {p.answer}"


# A fixed worked example for file datasets (integer-answer math word problems).
DEFAULT_EXAMPLE = (
    Problem("example", "A box holds 12 pencils. How many pencils are in 5 boxes?", "60"),
    "Each box holds 12 pencils, so 5 boxes hold 5 * 12 = 60 pencils.\nAnswer: 60",
)


def build_messages(
    problem: Problem, template: PromptTemplate | str, example: Problem | None = None, example_solution: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for ``problem``: the paper's single user turn, optionally after one worked example."""
    template = PromptTemplate(template)
    if template is PromptTemplate.RAW:
        return [{"role": "user", "content": problem.problem}]
    user = {"role": "user", "content": PAPER_PREFIX + problem.problem + PAPER_SUFFIX}
    if template is PromptTemplate.PAPER:
        return [user]
    if example is None:
        example, example_solution = DEFAULT_EXAMPLE
    return [
        {"role": "user", "content": PAPER_PREFIX + example.problem + PAPER_SUFFIX},
        {"role": "assistant", "content": example_solution or f"Answer: {example.answer}"},
        user,
    ]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], *, chat_template: bool = True) -> str:
    """The prompt text: the model's chat template with the generation prompt (spec §8), or the plain contents."""
    if chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


# -- files and the Hub --------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    raise ValueError(f"data.source {str(path)!r}: unsupported file type {suffix!r}; allowed: .jsonl, .json, .parquet")


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def _row_to_problem(row: dict[str, Any], i: int, stem: str, pk: str | None, ak: str | None) -> Problem:
    rid = str(row.get("id", f"{stem}-{i}"))
    if pk or ak:
        return Problem(rid, str(row[pk or "problem"]), str(row[ak or "answer"]))
    if "problem" in row and "answer" in row:
        return Problem(rid, str(row["problem"]), str(row["answer"]))
    if "prompt" in row and "reward_model" in row:  # verl RL format (the paper's parquets)
        raw = (row.get("extra_info") or {}).get("raw_problem")
        text = raw if raw is not None else row["prompt"][0]["content"]
        return Problem(rid, str(text), str(row["reward_model"]["ground_truth"]))
    if "question" in row and "answer" in row and "####" in str(row["answer"]):  # GSM8K
        return Problem(rid, str(row["question"]), str(row["answer"]).split("####")[-1].strip().replace(",", ""))
    if "problem" in row and "solution" in row:  # MATH
        boxed = _BOXED.findall(str(row["solution"]))
        if boxed:
            return Problem(rid, str(row["problem"]), boxed[-1])
    raise ValueError(
        f"data.source {stem!r}: unknown schema with columns {sorted(row)}; expected problem+answer, the verl format "
        "(prompt, reward_model.ground_truth), GSM8K (question, answer with ####) or MATH (problem, solution with "
        "\\boxed{}), or set data.problem_key and data.answer_key"
    )


def load_problems(
    source: str,
    *,
    split: str | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a local .jsonl/.json/.parquet file or a Hugging Face dataset name (the real Hub path, used when
    online). Identical problems (the paper's eval parquets repeat each 32 times) are kept once."""
    path = Path(source).expanduser()
    if path.is_file():
        rows, stem = _read_rows(path), path.stem
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet") or source.startswith((".", "/")):
        raise ValueError(f"data.source {source!r}: no such file")
    else:
        rows, stem = _hub_rows(source, split), source.replace("/", "_")
    seen: set[str] = set()
    out: list[Problem] = []
    for i, row in enumerate(rows):
        p = _row_to_problem(row, i, stem, problem_key, answer_key)
        if p.problem in seen:
            continue
        seen.add(p.problem)
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out


def _hub_rows(name: str, split: str | None) -> list[dict[str, Any]]:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(name, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"]))
    except Exception as e:  # offline, unknown repo, no access
        raise ValueError(
            f"data.source {name!r} is not a local file and the Hugging Face Hub dataset could not be fetched "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    files = sorted(p for p in local.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file())
    if split:
        files = [p for p in files if split in p.name or split in p.parent.name] or files
    if not files:
        raise ValueError(f"data.source {name!r}: the Hub dataset has no parquet/jsonl files")
    return [r for f in files for r in _read_rows(f)]
