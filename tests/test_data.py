"""The paper's prompt template (spec §8) checked against the shipped parquets, the arithmetic task, file loading
with schema detection, the offline Hub path, and prompt building/rendering."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from rpg_core.data import (
    DEFAULT_EXAMPLE,
    PAPER_PREFIX,
    PAPER_SUFFIX,
    ArithmeticLevel,
    Problem,
    PromptTemplate,
    arithmetic_example,
    arithmetic_problems,
    arithmetic_split,
    build_messages,
    load_problems,
    render_prompt,
    shared_data_dir,
)

pytestmark = pytest.mark.unit

torch.set_num_threads(1)

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared/data not found (set RPG_SHARED_DATA)")
# the paper's parquet -> (its clean JSONL, unique problems)
PARQUETS = {
    "aime-2024.parquet": ("aime24.jsonl", 30),
    "aime25.parquet": ("aime25.jsonl", 30),
    "amc-23.parquet": ("amc23.jsonl", 40),
}


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


# -- spec §8: the paper's template ----------------------------------------------------------------------------


def test_paper_template_hashes() -> None:
    assert _sha(PAPER_PREFIX) == "46d554a922e45755cf1d554a17459a3e4b4eb72a29dab50e79c800d53cda8fbb"
    assert _sha(PAPER_SUFFIX) == "f5c796aed2ef60e3b54d8ad1b159f0de1f23954b078855b98884c199f63d1aa0"
    assert (len(PAPER_PREFIX), len(PAPER_SUFFIX)) == (178, 62)


@needs_shared
@pytest.mark.parametrize("name", sorted(PARQUETS))
def test_every_parquet_row_is_prefix_problem_suffix(name: str) -> None:
    df = pd.read_parquet(SHARED / name)
    for prompt, extra in zip(df["prompt"], df["extra_info"], strict=True):
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        assert prompt[0]["content"] == PAPER_PREFIX + extra["raw_problem"] + PAPER_SUFFIX


# -- loading the shared files ---------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    ("name", "rows", "first_id", "first_answer"),
    [
        ("aime24.jsonl", 30, "aime2024-I-1", "204"),
        ("aime25.jsonl", 30, "aime2025-I-1", "70"),
        ("amc23.jsonl", 40, None, None),
        ("gsm8k_test.jsonl", 1319, "gsm8k-test-00000", "18"),
        ("math500.jsonl", 500, "math500-precalculus-807", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ],
)
def test_load_shared_jsonl(name: str, rows: int, first_id: str | None, first_answer: str | None) -> None:
    problems = load_problems(str(SHARED / name))
    assert len(problems) == rows  # the README's row counts
    assert all(isinstance(p.answer, str) and p.answer and p.problem for p in problems)
    assert len({p.id for p in problems}) == rows
    if first_id is not None:
        assert (problems[0].id, problems[0].answer) == (first_id, first_answer)


@needs_shared
@pytest.mark.parametrize("name", sorted(PARQUETS))
def test_load_paper_parquets_deduplicated(name: str) -> None:
    clean_name, unique = PARQUETS[name]
    problems = load_problems(str(SHARED / name))
    assert len(problems) == unique  # 32 copies of each problem kept once
    clean = {p.problem: p.answer for p in load_problems(str(SHARED / clean_name))}
    assert set(clean) == {p.problem for p in problems}  # the bare problems, template stripped
    raw_labels = {p.answer for p in problems} - set(clean.values())
    assert raw_labels <= {"336^\\circ"}  # AIME25 II-5's raw label; the clean file has "336"
    assert problems[0].id == f"{Path(name).stem}-0"  # no id column: <stem>-<row index>


@needs_shared
def test_load_limit_and_big_answers() -> None:
    dapo = load_problems(str(SHARED / "dapo_math_17k.jsonl"))
    assert len(dapo) == 17279
    big = [p for p in dapo if re.fullmatch(r"-?\d+", p.answer) and abs(int(p.answer)) >= 2**63]
    assert len(big) == 3 and "22099999999999998951424" in {p.answer for p in big}  # never cast to int64
    assert [p.id for p in load_problems(str(SHARED / "aime24.jsonl"), limit=3)] == [
        "aime2024-I-1",
        "aime2024-I-2",
        "aime2024-I-3",
    ]


# -- schema detection on small files ------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_raw_schema(tmp_path: Path) -> None:
    src = _jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "Q1?", "answer": "3 * 4 = <<3*4=12>>12\n#### 1,234"},
            {"question": "Q2?", "answer": "Lost 5.\n#### -5"},
        ],
    )
    assert load_problems(src) == [Problem("gsm-0", "Q1?", "1234"), Problem("gsm-1", "Q2?", "-5")]


def test_math_schema_takes_the_last_boxed_answer(tmp_path: Path) -> None:
    src = _jsonl(
        tmp_path / "math.jsonl",
        [{"problem": "P", "solution": "First \\boxed{1}, then $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "id": 7}],
    )
    assert load_problems(src) == [Problem("7", "P", "\\frac{\\sqrt{3}}{2}")]  # nested braces matched


def test_verl_parquet_without_raw_problem_strips_the_template(tmp_path: Path) -> None:
    def row(content: str, answer: str) -> dict:
        return {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": answer}}

    templated = PAPER_PREFIX + "What is 2+2?" + PAPER_SUFFIX
    rows = [row(templated, "4"), row(templated, "4"), row("Untemplated?", "1")]
    path = tmp_path / "v.parquet"
    pd.DataFrame(rows).to_parquet(path)
    assert load_problems(str(path)) == [Problem("v-0", "What is 2+2?", "4"), Problem("v-2", "Untemplated?", "1")]


def test_explicit_keys_override_detection(tmp_path: Path) -> None:
    rows = [{"q": "Q?", "meta": {"gold": 12}, "problem": "ignored", "answer": "ignored"}]
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))  # .json: {"data": [...]} or a list
    src = str(tmp_path / "x.json")
    assert load_problems(src, problem_key="q", answer_key="meta.gold") == [Problem("x-0", "Q?", "12")]
    assert load_problems(src, answer_key="meta.gold") == [Problem("x-0", "ignored", "12")]
    one = _jsonl(tmp_path / "one.jsonl", [{"problem": "P?", "final": "9"}])
    assert load_problems(one, answer_key="final") == [Problem("one-0", "P?", "9")]
    with pytest.raises(ValueError, match=r"answer_key='nope' is not a column .* columns: \['final', 'problem'\]"):
        load_problems(one, answer_key="nope")


def test_unknown_schema_names_columns_and_accepted_keys(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "odd.jsonl", [{"text": "t", "label": 1}])
    expected = r"columns \['label', 'text'\]; accepted: problem\+answer; verl .* problem_key"
    with pytest.raises(ValueError, match=expected):
        load_problems(src)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "rows.csv"
    bad.write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"unsupported file type; allowed: \.jsonl, \.json, \.parquet"):
        load_problems(str(bad))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_problems(str(bad), limit=0)


_OK_ROW = '{"problem": "1+1?", "answer": "2"}\n'  # 34 characters and a newline


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"\n\n", r"empty.jsonl': the file has no rows \(it is empty\)"),
    # the offset: line 1 (35 bytes), then '{"problem": "caf' (16): the latin-1 e-acute at 51
    ("latin.jsonl", (_OK_ROW + '{"problem": "caf\u00e9", "answer": "1"}\n').encode("latin-1"),
     r"latin.jsonl', line 2: not UTF-8 \(byte 0xe9 at offset 51\); save the file as UTF-8"),
    # line 3 (the blank line 2 counts) ends after its 31 characters: the missing "}" at column 32
    ("broken.jsonl", (_OK_ROW + '\n{"problem": "2+2?", "answer": 4\n').encode(),
     r"broken.jsonl', line 3: not valid JSON \(Expecting ',' delimiter at column 32\)"),
    ("listed.jsonl", (_OK_ROW + "[1, 2]\n").encode(), r"listed.jsonl', line 2: a row must be a JSON object, got list"),
    ("gap.jsonl", (_OK_ROW + '\n{"problem": "2+2?"}\n').encode(), r"gap.jsonl', line 3: row without a problem or an"),
    ("rows.json", ("[" + _OK_ROW + " 7]").replace("}\n", "},\n").encode(), r"rows.json', row 2: a row must be an object"),
])  # fmt: skip
def test_bad_files_name_the_file_and_the_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    """A task file is refused naming itself and, for a bad row, its line: empty, not UTF-8, not JSON, not an
    object, a row without a problem (before: a misleading n_eval message, no file, neither file nor line)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^source '{tmp_path}/{message}"):
        load_problems(str(path))


def test_hub_dataset_offline_fails_fast_and_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"source 'openai/gsm8k' is not a local file.*could not be fetched.*offline"):
        load_problems("openai/gsm8k", split="test")
    assert time.monotonic() - t0 < 10


_HUB_SCRIPT = """
import json, sys
from rpg_core.data import load_problems
for split, subdir in ((None, "main"), ("test", "main"), ("train", "main"), ("validation", "main"), ("test", "socratic")):
    try:
        print(json.dumps([p.__dict__ for p in load_problems("acme/toy", split=split, hub_subdir=subdir)]))
    except ValueError as e:
        print(json.dumps(str(e)))
"""


@pytest.mark.integration
@pytest.mark.subprocess
def test_hub_dataset_from_the_local_cache(tmp_path: Path) -> None:
    """The real snapshot_download path, offline, against a Hub cache laid out as huggingface_hub writes it, with
    two configs (folders) like openai/gsm8k: hub_subdir picks one."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--toy"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "main"
    snap.mkdir(parents=True)
    pd.DataFrame({"question": ["T1?"], "answer": ["so\n#### 7"]}).to_parquet(snap / "test-00000-of-00001.parquet")
    train = pd.DataFrame({"question": ["A?", "B?"], "answer": ["#### 1", "#### 2"]})
    train.to_parquet(snap / "train-00000-of-00001.parquet")
    (snap.parent / "socratic").mkdir()
    pd.DataFrame({"question": ["S?"], "answer": ["#### 9"], "level": [3]}).to_parquet(
        snap.parent / "socratic" / "test-00000-of-00001.parquet"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    several, test, train, missing, socratic = (json.loads(line) for line in out.stdout.splitlines())
    assert several == "source 'acme/toy' has several splits, pass split= one of ['test', 'train']"
    assert test == [{"id": "toy-0", "problem": "T1?", "answer": "7", "meta": {}}]
    assert socratic == [{"id": "toy-0", "problem": "S?", "answer": "9", "meta": {"level": 3}}]  # numpy int unwrapped
    assert [p["answer"] for p in train] == ["1", "2"]
    assert missing == "split='validation': source 'acme/toy' has the splits ['test', 'train']"


# -- the arithmetic task ------------------------------------------------------------------------------------


def _recompute(p: Problem) -> int:
    m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p.problem)
    assert m, p.problem
    a, op, b = int(m[1]), m[2], int(m[3])
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.mark.parametrize("level", list(ArithmeticLevel))
def test_arithmetic_answers_and_levels(level: ArithmeticLevel) -> None:
    problems = arithmetic_problems(level, 50, seed=0)
    assert len(problems) == 50
    assert all(p.answer == str(_recompute(p)) for p in problems)
    assert all(p.id.startswith(f"{level.value}-") for p in problems)
    example, solution = arithmetic_example(level)
    assert example.answer == str(_recompute(example))
    assert solution.splitlines()[-1] == f"Answer: {example.answer}" and len(solution.splitlines()) == 2


def test_arithmetic_level_operands() -> None:
    def operands(level: str) -> list[tuple[int, str, int]]:
        out = []
        for p in arithmetic_problems(level, 200, seed=1):
            m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p.problem)
            out.append((int(m[1]), m[2], int(m[3])))
        return out

    assert all(a < 10 and b < 10 and op == "+" for a, op, b in operands("add1"))
    assert all(a < 10 and b < 10 and op == "-" for a, op, b in operands("sub1"))
    assert any(a < b for a, _, b in operands("sub1"))  # negative answers occur
    assert all(a < 10 and b < 10 and op == "*" for a, op, b in operands("mul1"))
    assert all(10 <= a < 100 and 10 <= b < 100 and op == "+" for a, op, b in operands("add2"))
    assert all(10 <= a < 100 and 2 <= b < 10 and op == "*" for a, op, b in operands("mul2x1"))
    assert all(100 <= a < 1000 and 100 <= b < 1000 and op == "+" for a, op, b in operands("add3"))
    assert arithmetic_example("add2") == (Problem("add2-27+45", "What is 27 + 45?", "72"), "27 + 45 = 72.\nAnswer: 72")


def test_arithmetic_determinism_and_disjoint_split() -> None:
    assert arithmetic_problems("add2", 64, seed=3) == arithmetic_problems(ArithmeticLevel.ADD2, 64, seed=3)
    assert arithmetic_problems("add2", 64, seed=3) != arithmetic_problems("add2", 64, seed=4)
    train, held_out = arithmetic_split("add2", 4096, 128, seed=0)
    assert (len(train), len(held_out)) == (4096, 128)
    assert arithmetic_split("add2", 4096, 128, seed=0) == (train, held_out)
    assert len({p.problem for p in held_out}) == 128
    assert not {p.problem for p in train} & {p.problem for p in held_out}
    example = arithmetic_example("add2")[0].problem
    assert example not in {p.problem for p in train + held_out}
    assert train[:100] == arithmetic_problems("add2", 100, seed=0)  # same order as the standalone generator


def test_arithmetic_small_level_repeats_train_but_never_leaks() -> None:
    train, held_out = arithmetic_split("add1", 500, 20, seed=0)  # 99 problems (100 pairs minus the example)
    assert len({p.problem for p in train}) == 79 and len(train) == 500
    assert not {p.problem for p in train} & {p.problem for p in held_out}
    with pytest.raises(ValueError, match="n_eval=99: level 'add1' has only 99 distinct problems"):
        arithmetic_split("add1", 1, 99, seed=0)
    with pytest.raises(ValueError, match=r"level must be one of \['add1', 'sub1', 'mul1', 'add2', 'mul2x1', 'add3'\]"):
        arithmetic_problems("add4", 1, seed=0)


# -- prompts ----------------------------------------------------------------------------------------------------

P = Problem("p", "What is 2 + 3?", "5")


def test_build_messages_templates() -> None:
    assert build_messages(P, PromptTemplate.RAW) == [{"role": "user", "content": "What is 2 + 3?"}]
    assert build_messages(P, "paper") == [{"role": "user", "content": PAPER_PREFIX + "What is 2 + 3?" + PAPER_SUFFIX}]
    ex, sol = arithmetic_example("add1")
    msgs = build_messages(P, PromptTemplate.PAPER_ONESHOT, ex, sol)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == PAPER_PREFIX + "What is 4 + 3?" + PAPER_SUFFIX
    assert msgs[1]["content"] == "4 + 3 = 7.\nAnswer: 7"
    assert msgs[2] == build_messages(P, PromptTemplate.PAPER)[0]
    default = build_messages(P, PromptTemplate.PAPER_ONESHOT)
    assert default[0]["content"] == PAPER_PREFIX + DEFAULT_EXAMPLE[0].problem + PAPER_SUFFIX
    assert default[1]["content"].endswith("\nAnswer: 60") and len(default[1]["content"].splitlines()) == 2
    assert build_messages(P, "paper_oneshot", ex)[1]["content"] == "Answer: 7"  # no solution: the answer line
    assert build_messages(P, "paper", ex, sol) == build_messages(P, "paper")  # the example only affects one-shot
    with pytest.raises(ValueError, match=r"template must be one of \['paper', 'paper_oneshot', 'raw'\]"):
        build_messages(P, "fewshot")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_prompt_chat_template_and_plain() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), chat_template=CHATML
    )
    msgs = build_messages(P, PromptTemplate.PAPER_ONESHOT, *arithmetic_example("add1"))
    text = render_prompt(tok, msgs)
    assert text == (
        f"<|im_start|>user\n{PAPER_PREFIX}What is 4 + 3?{PAPER_SUFFIX}<|im_end|>\n"
        "<|im_start|>assistant\n4 + 3 = 7.\nAnswer: 7<|im_end|>\n"
        f"<|im_start|>user\n{PAPER_PREFIX}What is 2 + 3?{PAPER_SUFFIX}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = render_prompt(None, build_messages(P, PromptTemplate.RAW), chat_template=False)
    assert plain == "What is 2 + 3?\n\n"
    assert render_prompt(None, msgs, chat_template=False) == "\n\n".join(m["content"] for m in msgs) + "\n\n"
