"""Tasks and datasets: the paper's prompt template (spec §8), the built-in arithmetic task, JSONL/JSON/parquet files
and Hugging Face Hub datasets, all as ``Problem(id, problem, answer)`` with the answer a string (never an int64)."""

from __future__ import annotations

import json
import operator
import os
import random
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_EXAMPLE",
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

# The paper's template (spec §8): the repr of prompt[0]["content"] minus extra_info["raw_problem"] of
# shared/data/aime-2024.parquet, pasted as extracted. tests/test_data.py checks both sha256 sums and that every
# row of the three parquets equals PREFIX + raw_problem + SUFFIX.
PAPER_PREFIX = 'Solve the following math problem step by step. The last line of your response should be of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n'  # noqa: E501  # fmt: skip
PAPER_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str  # always a string: some answers exceed int64
    # The row's other scalar fields (e.g. ``dapo_10gram_overlap``, ``source``); not part of equality.
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


class PromptTemplate(StrEnum):
    PAPER = "paper"  # one user turn: PREFIX + problem + SUFFIX (spec §8)
    PAPER_ONESHOT = "paper_oneshot"  # the same after one worked example (the 135M model needs it, model.md)
    RAW = "raw"  # the bare problem text


def shared_data_dir() -> Path | None:
    """``$RPG_SHARED_DATA``, else ``shared/data`` beside the repository; None if absent (development/tests only)."""
    env = os.environ.get("RPG_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


# -- prompts ------------------------------------------------------------------------------------------------------

# The one-shot example for file datasets: a small integer word problem with a two-line solution.
DEFAULT_EXAMPLE = (
    Problem("example", "A box holds 12 pencils. How many pencils are in 5 boxes?", "60"),
    "Each box holds 12 pencils, so 5 boxes hold 5 * 12 = 60 pencils.\nAnswer: 60",
)


def _paper_turn(problem: Problem) -> dict[str, str]:
    return {"role": "user", "content": PAPER_PREFIX + problem.problem + PAPER_SUFFIX}


def build_messages(
    problem: Problem,
    template: PromptTemplate | str,
    example: Problem | None = None,
    example_solution: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for ``problem``. PAPER: the paper's single user turn (spec §8). PAPER_ONESHOT: the paper's
    turn on ``example`` (default: DEFAULT_EXAMPLE), an assistant turn ``example_solution`` (default
    "Answer: <answer>"), then the paper's turn on ``problem``. RAW: the problem alone. The example is ignored by
    the other templates."""
    try:
        template = PromptTemplate(template)
    except ValueError:
        raise ValueError(f"template must be one of {[t.value for t in PromptTemplate]}, got {template!r}") from None
    match template:
        case PromptTemplate.RAW:
            return [{"role": "user", "content": problem.problem}]
        case PromptTemplate.PAPER:
            return [_paper_turn(problem)]
        case PromptTemplate.PAPER_ONESHOT:
            if example is None:
                if example_solution is not None:
                    raise ValueError("example_solution was given without its example")
                example, example_solution = DEFAULT_EXAMPLE
            solution = example_solution if example_solution is not None else f"Answer: {example.answer}"
            return [_paper_turn(example), {"role": "assistant", "content": solution}, _paper_turn(problem)]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], *, chat_template: bool = True) -> str:
    """The prompt text: the tokenizer's chat template with the generation prompt (spec §8), or with
    ``chat_template=False`` the contents joined by blank lines (the tokenizer is then unused)."""
    if chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


# -- the built-in arithmetic task ----------------------------------------------------------------------------------


class ArithmeticLevel(StrEnum):
    ADD1 = "add1"  # single-digit addition
    SUB1 = "sub1"  # single-digit subtraction (answers may be negative)
    MUL1 = "mul1"  # single-digit multiplication
    ADD2 = "add2"  # two-digit addition (the demo task)
    MUL2X1 = "mul2x1"  # two-digit times one-digit
    ADD3 = "add3"  # three-digit addition


@dataclass(frozen=True)
class _Op:
    symbol: str
    fn: Callable[[int, int], int]
    a: range
    b: range
    example: tuple[int, int]  # the fixed one-shot example, never a train or eval problem


_LEVELS: dict[ArithmeticLevel, _Op] = {
    ArithmeticLevel.ADD1: _Op("+", operator.add, range(0, 10), range(0, 10), (4, 3)),
    ArithmeticLevel.SUB1: _Op("-", operator.sub, range(0, 10), range(0, 10), (8, 5)),
    ArithmeticLevel.MUL1: _Op("*", operator.mul, range(0, 10), range(0, 10), (6, 7)),
    ArithmeticLevel.ADD2: _Op("+", operator.add, range(10, 100), range(10, 100), (27, 45)),
    ArithmeticLevel.MUL2X1: _Op("*", operator.mul, range(10, 100), range(2, 10), (23, 4)),
    ArithmeticLevel.ADD3: _Op("+", operator.add, range(100, 1000), range(100, 1000), (358, 267)),
}


def _level(level: ArithmeticLevel | str) -> ArithmeticLevel:
    try:
        return ArithmeticLevel(level)
    except ValueError:
        raise ValueError(f"level must be one of {[lv.value for lv in ArithmeticLevel]}, got {level!r}") from None


def _make(level: ArithmeticLevel, a: int, b: int) -> Problem:
    op = _LEVELS[level]
    return Problem(f"{level.value}-{a}{op.symbol}{b}", f"What is {a} {op.symbol} {b}?", str(op.fn(a, b)))


def _shuffled_pairs(level: ArithmeticLevel, seed: int) -> list[tuple[int, int]]:
    """Every operand pair of ``level`` except the one-shot example, in a seeded order."""
    op = _LEVELS[level]
    pairs = [(a, b) for a in op.a for b in op.b if (a, b) != op.example]
    random.Random(f"rpg-arithmetic-{level.value}-{seed}").shuffle(pairs)
    return pairs


def arithmetic_split(
    level: ArithmeticLevel | str, n_train: int, n_eval: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out eval) problems of ``level`` with disjoint texts, deterministic in the arguments. The eval
    set is the tail of a seeded permutation; train cycles through the rest (small levels repeat problems).
    The one-shot example is in neither."""
    level = _level(level)
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    pairs = _shuffled_pairs(level, seed)
    if n_eval >= len(pairs):
        raise ValueError(f"n_eval={n_eval}: level {level.value!r} has only {len(pairs)} distinct problems")
    rest, held_out = pairs[: len(pairs) - n_eval], pairs[len(pairs) - n_eval :]
    train = [_make(level, *rest[i % len(rest)]) for i in range(n_train)]
    return train, [_make(level, *p) for p in held_out]


def arithmetic_problems(level: ArithmeticLevel | str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of ``level``: the first n of the seeded order (cycling), deterministic in (level, n, seed).
    Equal to ``arithmetic_split(level, n, n_eval, seed)[0]`` while n + n_eval fits the level."""
    level = _level(level)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = _shuffled_pairs(level, seed)
    return [_make(level, *pairs[i % len(pairs)]) for i in range(n)]


def arithmetic_example(level: ArithmeticLevel | str) -> tuple[Problem, str]:
    """The fixed worked example of ``level`` for the one-shot template: (problem, "a op b = c.\\nAnswer: c")."""
    level = _level(level)
    a, b = _LEVELS[level].example
    p = _make(level, a, b)
    return p, f"{a} {_LEVELS[level].symbol} {b} = {p.answer}.\nAnswer: {p.answer}"


# -- files and the Hub --------------------------------------------------------------------------------------------

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")  # Hub file-name split keywords


class _Schema(StrEnum):
    PROBLEM_ANSWER = "problem+answer"  # the shared files, MATH-500
    VERL = "verl"  # the paper's parquets: prompt, reward_model.ground_truth, extra_info.raw_problem
    GSM8K = "gsm8k"  # question, answer ending in "#### 42"
    MATH = "math"  # problem, solution with \boxed{}
    EXPLICIT = "explicit"  # problem_key and answer_key given


_ACCEPTED = (
    "problem+answer; verl (prompt, reward_model.ground_truth[, extra_info.raw_problem]); "
    "GSM8K (question, answer with '####'); MATH (problem, solution with \\boxed{}); or pass problem_key/answer_key"
)


_TEXT_FIELDS = {"id", "problem", "question", "answer", "solution", "prompt"}  # not copied into Problem.meta


def _plain_scalar(v: Any) -> str | int | float | bool | None:
    """A JSON scalar (numpy scalars from parquet unwrapped), or None for anything else."""
    if hasattr(v, "item") and not isinstance(v, str | bytes) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    return v if isinstance(v, str | int | float | bool) else None


def _detect(columns: set[str]) -> _Schema | None:
    if {"problem", "answer"} <= columns:
        return _Schema.PROBLEM_ANSWER
    if {"prompt", "reward_model"} <= columns:
        return _Schema.VERL
    if {"question", "answer"} <= columns:
        return _Schema.GSM8K
    if {"problem", "solution"} <= columns:
        return _Schema.MATH
    return None


def _get(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, where a dotted key reaches into nested dicts (``reward_model.ground_truth``)."""
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return value


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces matched), as math_dapo.last_boxed_only_string + remove_boxed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i]
    return None


def _verl_problem(row: dict[str, Any]) -> str:
    raw = (row.get("extra_info") or {}).get("raw_problem")
    if raw is not None:
        return str(raw)
    content = str(row["prompt"][0]["content"])
    if content.startswith(PAPER_PREFIX) and content.endswith(PAPER_SUFFIX):  # strip the paper's template
        return content[len(PAPER_PREFIX) : len(content) - len(PAPER_SUFFIX)]
    return content


def _extract(row: dict[str, Any], schema: _Schema, problem_key: str | None, answer_key: str | None) -> tuple[str, str]:
    """(problem, answer) of one row; explicit keys win over the detected schema."""
    match schema:
        case _Schema.PROBLEM_ANSWER | _Schema.EXPLICIT:
            problem, answer = row.get("problem"), row.get("answer")
        case _Schema.VERL:
            problem, answer = _verl_problem(row), row["reward_model"]["ground_truth"]
        case _Schema.GSM8K:
            problem, answer = row["question"], str(row["answer"]).split("####")[-1].strip().replace(",", "")
        case _Schema.MATH:
            problem, answer = row["problem"], _last_boxed(str(row["solution"]))
    if problem_key:
        problem = _get(row, problem_key)
    if answer_key:
        answer = _get(row, answer_key)
    if problem is None or answer is None:
        raise ValueError(f"row without a problem or an answer ({schema.value} schema): {sorted(row)}")
    return str(problem), str(answer)


def _text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is refused naming it and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"source {str(path)!r}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); save the file as UTF-8") from None  # fmt: skip


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a local file and where each one is (``line N`` of a .jsonl, else ``row N``), for messages. A bad
    row is refused naming the file and the line: not UTF-8, not JSON, not an object."""
    match path.suffix.lower():
        case ".parquet":
            import pandas as pd

            rows = pd.read_parquet(path).to_dict(orient="records")
            return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
        case ".jsonl":
            rows, where = [], []
            for n, line in enumerate(_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"source {str(path)!r}, line {n}: not valid JSON ({e.msg} at column {e.colno})"
                                     ) from None  # fmt: skip
                if not isinstance(row, dict):
                    raise ValueError(f"source {str(path)!r}, line {n}: a row must be a JSON object, got "
                                     f"{type(row).__name__}")  # fmt: skip
                rows.append(row)
                where.append(f"line {n}")
            return rows, where
        case ".json":
            try:
                data = json.loads(_text(path))
            except json.JSONDecodeError as e:
                raise ValueError(f"source {str(path)!r}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                                 ) from None  # fmt: skip
            rows = data.get("data") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise ValueError(f"source {str(path)!r}: a .json file must hold a list of rows or {{'data': [...]}}")
            return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    raise ValueError(f"source {str(path)!r}: unsupported file type; allowed: {', '.join(FILE_SUFFIXES)}")


def _split_of(path: Path) -> str:
    """The Hub's file-name convention: ``test-00000-of-00001.parquet``, ``test.jsonl`` or ``test/...``;
    a file naming no split belongs to ``train``."""
    stem = path.name.split(".")[0].lower()
    for name in SPLIT_NAMES:
        if stem == name or stem.startswith((f"{name}-", f"{name}_")) or path.parent.name.lower() == name:
            return name
    return "train"


def _hub_files(repo_id: str, split: str | None, subdir: str | None = None) -> list[Path]:
    """Download (or find in the cache) a Hub dataset's parquet/JSONL files and pick those of ``split``; ``subdir``
    restricts them to one folder (a dataset config such as ``main`` of ``openai/gsm8k``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import is_offline_mode

    offline = is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        local = snapshot_download(
            repo_id,
            repo_type="dataset",
            # the data files (.json on the Hub is mostly metadata)
            allow_patterns=[f"{subdir.strip('/')}/*.{e}" if subdir else f"*.{e}" for e in ("parquet", "jsonl")],
            local_files_only=offline,  # honoured even if huggingface_hub was imported before HF_HUB_OFFLINE was set
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repository, no access: one clear message
        raise ValueError(
            f"source {repo_id!r} is not a local file, and the Hugging Face Hub dataset could not be fetched"
            f"{' (offline: HF_HUB_OFFLINE is set)' if offline else ''}: {type(e).__name__}: {str(e).rstrip('.')}. "
            f"Pass a local {'/'.join(FILE_SUFFIXES)} path, or check the name and your connection."
        ) from e
    root = Path(local) / subdir if subdir else Path(local)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl"))
    if not files:
        raise ValueError(f"source {repo_id!r}: the Hub dataset has no .parquet or .jsonl files")
    splits = sorted({_split_of(p) for p in files})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"source {repo_id!r} has several splits, pass split= one of {splits}")
        return files
    chosen = [p for p in files if _split_of(p) == split]
    if not chosen:
        raise ValueError(f"split={split!r}: source {repo_id!r} has the splits {splits}")
    return chosen


def load_problems(
    source: str,
    *,
    split: str | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    hub_subdir: str | None = None,
) -> list[Problem]:
    """Problems from a local .jsonl/.json/.parquet file or a Hugging Face dataset name (``split`` picks the Hub
    files of a split, by the Hub's file-naming convention; local files ignore it). The schema is detected
    from the first row's columns (see _ACCEPTED); problem_key/answer_key (dotted for nested fields) override it.
    Repeated (problem, answer) pairs are kept once (the paper's parquets repeat each problem 32 times). ids come
    from the rows' ``id`` field, else ``<file or dataset stem>-<row index>``; the rows' other scalar fields land in
    ``Problem.meta``. ``hub_subdir`` picks one folder of a Hub dataset (its config, e.g. ``main``)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = Path(source).expanduser()
    if path.is_file():
        (rows, where), stem = _read_file(path), path.stem
        if not rows:  # else the caller's message is about too few problems, not this file
            raise ValueError(f"source {source!r}: the file has no rows (it is empty)")
    elif path.suffix.lower() in FILE_SUFFIXES or path.is_dir() or source.startswith((".", "/", "~")):
        kinds = "/".join(FILE_SUFFIXES)
        raise ValueError(f"source {source!r}: no such file; pass a local {kinds} file or a Hub dataset name")
    else:
        read = [(f, _read_file(f)) for f in _hub_files(source, split, hub_subdir)]
        rows = [r for _, (rs, _) in read for r in rs]
        where = [f"{f.name}, {w}" for f, (_, ws) in read for w in ws]
        stem = source.rstrip("/").split("/")[-1]
    if not rows:
        return []
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"source {source!r}, {where[bad]}: a row must be an object, got {type(rows[bad]).__name__}")
    columns = set(rows[0])
    schema = _Schema.EXPLICIT if problem_key and answer_key else _detect(columns)
    if schema is None:  # one explicit key: the other field must be the default column
        if not ((problem_key or "problem" in columns) and (answer_key or "answer" in columns)):
            raise ValueError(f"source {source!r}: unknown schema, columns {sorted(columns)}; accepted: {_ACCEPTED}")
        schema = _Schema.EXPLICIT
    for key, name in ((problem_key, "problem_key"), (answer_key, "answer_key")):
        if key and key.split(".")[0] not in columns:
            raise ValueError(f"{name}={key!r} is not a column of {source!r}; columns: {sorted(columns)}")

    seen: set[tuple[str, str]] = set()
    out: list[Problem] = []
    for i, row in enumerate(rows):
        try:
            problem, answer = _extract(row, schema, problem_key, answer_key)
        except ValueError as e:
            raise ValueError(f"source {source!r}, {where[i]}: {e}") from None
        if (problem, answer) in seen:
            continue
        seen.add((problem, answer))
        pid = str(row["id"]) if row.get("id") is not None else f"{stem}-{i}"
        meta = {k: _plain_scalar(v) for k, v in row.items() if k not in _TEXT_FIELDS and _plain_scalar(v) is not None}
        out.append(Problem(pid, problem, answer, meta))
        if limit is not None and len(out) >= limit:
            break
    return out
