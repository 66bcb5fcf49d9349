"""Rewards: the paper's "Answer:" rule (spec §8, verl's ``math_dapo.compute_score``), a lenient integer rule,
math-verify in a process pool, DAPO overlong shaping and the DAPO group filter (spec §6.2)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "AnswerRule",
    "MathVerifyScorer",
    "Score",
    "group_filter",
    "lenient_score",
    "normalize_final_answer",
    "overlong_penalty",
    "paper_score",
    "score_responses",
]

INVALID = "[INVALID]"


class AnswerRule(StrEnum):
    PAPER = "paper"  # spec §8: last "Answer:" line of the last 300 characters, Minerva normalisation, exact match
    LENIENT = "lenient"  # the last integer anywhere in the response equals the (integer) ground truth
    MATH_VERIFY = "math_verify"  # HF math-verify (symbolic equivalence), in a process pool


@dataclass(frozen=True)
class Score:
    score: float  # +1.0 / -1.0 (math_dapo)
    acc: bool
    pred: str


# -- the paper's rule: verl/utils/reward_score/math_dapo.py, ported verbatim (spec §8) ---------------------------

SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
    "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]  # fmt: skip
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def normalize_final_answer(final_answer: str) -> str:
    """Minerva normalisation exactly as math_dapo (spec §8 step 3)."""
    final_answer = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


def paper_score(response: str, ground_truth: str) -> Score:
    """math_dapo.compute_score: +1 iff the normalised last "Answer:" line of the last 300 characters equals the
    normalised ground truth; the \\boxed{} answer alone does not count (spec §8)."""
    matches = ANSWER_PATTERN.findall(response[-300:])
    pred = normalize_final_answer(matches[-1] if matches else INVALID)
    ok = pred == normalize_final_answer(ground_truth)
    return Score(1.0 if ok else -1.0, ok, pred)


_INT = re.compile(r"-?\d[\d,]*")


def lenient_score(response: str, ground_truth: str) -> Score:
    """The last integer in the response (commas in numbers dropped) compared with the ground truth as Python
    ints (answers can exceed int64); a non-integer ground truth is compared as a normalised string."""
    nums = [n.replace(",", "") for n in _INT.findall(response)]
    nums = [n for n in nums if n not in ("", "-")]
    pred = nums[-1] if nums else INVALID
    gt = ground_truth.strip().replace(",", "")
    try:
        ok = pred != INVALID and int(pred) == int(gt)
    except ValueError:
        ok = pred == normalize_final_answer(ground_truth)
    return Score(1.0 if ok else -1.0, ok, pred)


# -- math-verify: not thread-safe (signal-based timeouts), so it runs in worker processes ----------------------


def _math_verify_one(response: str, ground_truth: str) -> tuple[bool, str]:
    from math_verify import parse, verify

    gold = parse(ground_truth if "$" in ground_truth or "\\" in ground_truth else f"${ground_truth}$")
    pred = parse(response)
    return bool(verify(gold, pred)), str(pred[-1]) if pred else INVALID


class MathVerifyScorer:
    """Scores with math-verify in a spawn-context process pool; a timeout or error scores as wrong."""

    def __init__(self, workers: int = 2, timeout: float = 10.0):
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ImportError("reward.rule='math_verify' needs the math-verify package: pip install math-verify") from None
        self.workers, self.timeout = workers, timeout
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[Score]:
        futures = [self._executor().submit(_math_verify_one, r, g) for r, g in zip(responses, ground_truths, strict=True)]
        out = []
        for f in futures:
            try:
                ok, pred = f.result(timeout=self.timeout)
            except (FutureTimeout, Exception):  # noqa: BLE001 - a broken answer must never crash a run
                ok, pred = False, INVALID
            out.append(Score(1.0 if ok else -1.0, ok, pred))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> MathVerifyScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_responses(
    rule: AnswerRule, responses: Sequence[str], ground_truths: Sequence[str], *, scorer: MathVerifyScorer | None = None
) -> list[Score]:
    """The one entry point the trainer and evaluation call."""
    rule = AnswerRule(rule)
    if len(responses) != len(ground_truths):
        raise ValueError(f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) differ in length")
    if rule is AnswerRule.PAPER:
        return [paper_score(r, g) for r, g in zip(responses, ground_truths, strict=True)]
    if rule is AnswerRule.LENIENT:
        return [lenient_score(r, g) for r, g in zip(responses, ground_truths, strict=True)]
    if scorer is None:
        with MathVerifyScorer() as s:
            return s.score(responses, ground_truths)
    return scorer.score(responses, ground_truths)


# -- DAPO (spec §6.2) -----------------------------------------------------------------------------------------------


def overlong_penalty(length: int, *, max_len: int, buffer_len: int, factor: float) -> float:
    """DAPO overlong shaping: 0 up to ``max_len - buffer_len`` tokens, then linearly down to ``-factor`` at max_len."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    return min(-(length - (max_len - buffer_len)) / buffer_len * factor, 0.0)


def group_filter(accs: Sequence[bool] | Sequence[float], group_ids: Sequence[int]) -> list[bool]:
    """DAPO dynamic sampling: keep every sample of a group whose accuracies are not all equal (std > 0)."""
    if len(accs) != len(group_ids):
        raise ValueError(f"accs ({len(accs)}) and group_ids ({len(group_ids)}) differ in length")
    seen: dict[int, set[float]] = defaultdict(set)
    for a, g in zip(accs, group_ids, strict=True):
        seen[g].add(float(a))
    return [len(seen[g]) > 1 for g in group_ids]
