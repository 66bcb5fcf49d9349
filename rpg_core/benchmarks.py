"""The benchmark registry: the named benchmarks of the paper's protocol (spec §8) and where their data lives.

A leaf module (it imports only ``rpg_core.data`` and ``rpg_core.rewards``, neither of which imports torch), so
``rpg_core.config`` validates ``evaluation.benchmarks`` at import time without reaching into ``rpg_core.evaluation``
(which imports torch and the rollout engines). ``rpg_core.evaluation`` loads and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from rpg_core.data import FILE_SUFFIXES
from rpg_core.rewards import AnswerRule

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkName", "check_benchmark", "known_benchmarks"]


class BenchmarkName(StrEnum):
    AIME24 = "aime24"
    AIME25 = "aime25"
    AMC23 = "amc23"
    GSM8K = "gsm8k"
    MATH500 = "math500"


@dataclass(frozen=True)
class Benchmark:
    name: str
    file: str | None  # file name in the local data folder (or a full path for a custom benchmark)
    hub: str | None  # Hugging Face dataset used when no local file is found
    hub_split: str | None = None
    hub_subdir: str | None = None
    data_source: str | None = None  # verl's data_source in the paper's files (val-core/<data_source>/acc/mean@32)
    rule: AnswerRule = AnswerRule.PAPER
    report_clean: bool = False  # also report the <name>_clean subset (dapo_10gram_overlap < 0.5)


BENCHMARKS: dict[BenchmarkName, Benchmark] = {
    BenchmarkName.AIME24: Benchmark("aime24", "aime24.jsonl", "HuggingFaceH4/aime_2024", "train", None, "math_dapo"),
    BenchmarkName.AIME25: Benchmark("aime25", "aime25.jsonl", "MathArena/aime_2025", "train", None, "aime2025"),
    BenchmarkName.AMC23: Benchmark("amc23", "amc23.jsonl", "math-ai/amc23", "test", None, "amc_23", report_clean=True),
    BenchmarkName.GSM8K: Benchmark("gsm8k", "gsm8k_test.jsonl", "openai/gsm8k", "test", "main"),
    # MATH-500 answers are LaTeX expressions: string equality after normalisation undercounts, so it is scored with
    # math-verify, as the RPG code routes its non-AIME sets (spec §8).
    BenchmarkName.MATH500: Benchmark(
        "math500", "math500.jsonl", "HuggingFaceH4/MATH-500", "test", rule=AnswerRule.MATH_VERIFY, report_clean=True,
    ),
}  # fmt: skip


def known_benchmarks() -> list[str]:
    """The names a benchmark spec may take (anything else must be a data file)."""
    return [b.value for b in BenchmarkName]


def custom_benchmark_path(spec: str) -> Path | None:
    """The file of a custom benchmark spec (a .jsonl/.json/.parquet path), None for anything else."""
    path = Path(spec).expanduser()
    return path if path.suffix.lower() in FILE_SUFFIXES else None


def check_benchmark(spec: str, field_name: str = "benchmarks") -> None:
    """Raise ValueError naming ``field_name`` unless ``spec`` is a known benchmark or an existing data file."""
    if spec in known_benchmarks():
        return
    path = custom_benchmark_path(spec)
    if path is None:
        raise ValueError(
            f"{field_name}: {spec!r} is not allowed; allowed: {known_benchmarks()} or a {'/'.join(FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise ValueError(f"{field_name}: {spec!r}: no such file")
