"""Rewards: the paper's "Answer:" rule (spec §8, verl's ``math_dapo.compute_score``), a lenient integer rule,
math-verify in a process pool, DAPO overlong shaping and the DAPO dynamic-sampling group filter (spec §6.2)."""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import re
import time
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "INVALID",
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

INVALID = "[INVALID]"  # math_dapo's prediction when no "Answer:" line is found


class AnswerRule(StrEnum):
    PAPER = "paper"  # spec §8: last "Answer:" match in the last 300 characters, Minerva normalisation, exact match
    LENIENT = "lenient"  # the last integer anywhere in the response equals the ground truth (as Python ints)
    MATH_VERIFY = "math_verify"  # HF math-verify (symbolic equivalence), as the RPG repo's math_verify scorer


@dataclass(frozen=True)
class Score:
    score: float  # +1.0 correct / -1.0 wrong, as math_dapo (the overlong penalty is added by the trainer)
    acc: bool
    pred: str  # the normalised prediction, INVALID when nothing was extracted


def _score(ok: bool, pred: str) -> Score:
    return Score(1.0 if ok else -1.0, ok, pred)


# -- the paper's rule: verl/utils/reward_score/math_dapo.py, ported verbatim (spec §8) ---------------------------
# Checked against volcengine/verl@012542c. Two places where the spec's prose is looser than the code:
# * ANSWER_PATTERN's ``\s*`` after the colon also matches newlines, so "Answer:\n42" extracts "42" from the
#   next line (the spec says "the rest of that line");
# * "keep only the content of the first $...$" is a greedy regex rewrite; "unwrap \boxed{}" is greedy too
#   (``\boxed{a} and \boxed{b}`` -> ``a}and\boxed{b``).

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
PAPER_TAIL_CHARS = 300  # math_dapo.compute_score keeps only the response's last 300 characters


def normalize_final_answer(final_answer: str) -> str:
    """Minerva normalisation, exactly as math_dapo.normalize_final_answer (spec §8 step 3)."""
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
    """math_dapo.compute_score (spec §8): the last "Answer:" match of the last 300 characters, normalised, must
    equal the normalised ground truth exactly. A bare \\boxed{} answer does not count."""
    matches = ANSWER_PATTERN.findall(response[-PAPER_TAIL_CHARS:])
    pred = normalize_final_answer(matches[-1] if matches else INVALID)
    return _score(pred == normalize_final_answer(ground_truth), pred)


# -- lenient: the last integer ------------------------------------------------------------------------------------

# A number: a minus sign unless it follows a word character or a closing bracket ("10-3" is 10 and 3, "x = -3"
# is -3), digits with optional thousands commas ("1,000"; "1,2,3" is three numbers), an optional decimal part
# ("2.5" is a non-integer, not the integer 5; a trailing "." as in "42." is punctuation).
_NUMBER = re.compile(r"(?:(?<![\w.)\]}])-)?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


def lenient_score(response: str, ground_truth: str) -> Score:
    """The last number in the response (thousands commas removed, a leading minus kept) compared with the
    ground truth as Python ints (answers can exceed int64). A non-integer ground truth (after normalisation)
    is compared with the normalised number as a string."""
    numbers = _NUMBER.findall(response)
    if not numbers:
        return _score(False, INVALID)
    pred = numbers[-1].replace(",", "")
    gt = normalize_final_answer(ground_truth)  # "1,000" -> "1000", "336^\circ" -> "336"
    if _INTEGER.fullmatch(gt) and _INTEGER.fullmatch(pred):
        return _score(_canonical_int(pred) == _canonical_int(gt), pred)
    return _score(normalize_final_answer(pred) == gt, pred)


def _canonical_int(s: str) -> str:
    """An integer literal (``-?\\d+``) in canonical form: ASCII digits, no leading zeros, no "-0" ("-007" -> "-7").
    Two literals are equal as Python ints iff their canonical forms are equal; no ``int()``, which refuses strings
    of more than 4300 digits (a degenerate response must score as wrong, never crash the run). ``\\d`` matches
    every Unicode decimal digit, which ``int()`` accepts too, hence ``unicodedata.decimal``."""
    digits = "".join(c if c.isascii() else str(unicodedata.decimal(c)) for c in s.removeprefix("-")).lstrip("0")
    return "-" + digits if s.startswith("-") and digits else digits or "0"


# -- math-verify: not thread-safe (signal.alarm timeouts), so it runs in worker processes ----------------------


def _math_verify_worker(response: str, ground_truth: str, timeout_s: int) -> tuple[bool, str]:
    """One item, in a worker process (its own main thread, so math-verify's alarms work). As the RPG repo's
    verl/utils/reward_score/math_verify.py: gold wrapped in \\boxed{} and parsed as LaTeX; the prediction parsed
    as a plain expression or LaTeX; pred = the first extracted prediction."""
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    gold = parse("\\boxed{" + ground_truth + "}", [LatexExtractionConfig()], parsing_timeout=timeout_s)
    pred = parse(response, [ExprExtractionConfig(), LatexExtractionConfig()], parsing_timeout=timeout_s)
    if not gold or not pred:  # math_metric raises on an empty gold; RPG's scorer catches that as wrong
        return False, str(pred[0]) if pred else INVALID
    return bool(verify(gold, pred, timeout_seconds=timeout_s)), str(pred[0])


class MathVerifyScorer:
    """math-verify in a lazily created spawn-context process pool (a script using it needs the usual
    ``if __name__ == "__main__":`` guard). Each item has ``timeout_s`` for each of its parse/verify calls
    (math-verify's own alarms, in the worker's main thread); a worker still stuck at the batch deadline is killed
    and the pool rebuilt. A timeout, an exception or a dead worker scores as wrong, never crashes the run."""

    def __init__(self, *, workers: int = 2, timeout_s: int = 5) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("reward rule 'math_verify' needs the math-verify package: pip install math-verify")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not isinstance(timeout_s, int) or timeout_s < 1:  # signal.alarm takes whole seconds
            raise ValueError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s!r}")
        self.workers, self.timeout_s = workers, timeout_s
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[Score]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) differ in length")
        if not responses:
            return []
        pool = self._executor()
        pairs = zip(responses, ground_truths, strict=True)
        futures: list[Future[tuple[bool, str]]] = [
            pool.submit(_math_verify_worker, r, g, self.timeout_s) for r, g in pairs
        ]
        # Each item may take up to 3 timed calls; the first use also pays a worker start (~2 s).
        per_item = 3 * self.timeout_s + 5
        deadline = time.monotonic() + per_item * math.ceil(len(futures) / self.workers)
        out: list[Score] = []
        hung = False
        for f in futures:
            try:
                ok, pred = f.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - timeout, worker error or dead worker: wrong, never a crash
                ok, pred = False, INVALID
                hung = hung or not f.done()
            out.append(_score(ok, pred))
        if hung or getattr(pool, "_broken", False):
            self._kill()  # a stuck or dead worker would stall or fail every later batch
        return out

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API to stop a worker
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.kill()
        for p in processes:
            p.join(timeout=5)

    def close(self) -> None:
        """Stop the workers (the next ``score`` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> MathVerifyScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_responses(
    rule: AnswerRule | str,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    scorer: MathVerifyScorer | None = None,
) -> list[Score]:
    """Score decoded responses against string ground truths with ``rule``: the one entry point of the trainer.
    For math_verify, pass a long-lived ``scorer``; without one a temporary pool is started for this call."""
    try:
        rule = AnswerRule(rule)
    except ValueError:
        raise ValueError(f"rule must be one of {[r.value for r in AnswerRule]}, got {rule!r}") from None
    if len(responses) != len(ground_truths):
        raise ValueError(f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) differ in length")
    match rule:
        case AnswerRule.PAPER:
            return [paper_score(r, g) for r, g in zip(responses, ground_truths, strict=True)]
        case AnswerRule.LENIENT:
            return [lenient_score(r, g) for r, g in zip(responses, ground_truths, strict=True)]
        case AnswerRule.MATH_VERIFY:
            if scorer is not None:
                return scorer.score(responses, ground_truths)
            with MathVerifyScorer() as tmp:
                return tmp.score(responses, ground_truths)


# -- DAPO (spec §6.2) -----------------------------------------------------------------------------------------------


def overlong_penalty(length: int, *, max_len: int, buffer_len: int, factor: float) -> float:
    """DAPO overlong reward shaping (spec §6.2, verl's DAPORewardManager):
    ``min(-(length - (max_len - buffer_len)) / buffer_len * factor, 0)``: 0 up to max_len - buffer_len tokens,
    then linear down to -factor at max_len (not clipped beyond max_len, as verl)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return min(-(length - (max_len - buffer_len)) / buffer_len * factor, 0.0) + 0.0  # + 0.0: no -0.0


def group_filter(accs: Sequence[bool] | Sequence[float], group_ids: Sequence[int]) -> list[bool]:
    """DAPO dynamic sampling keep-mask, per sample (spec §6.2): a group is kept iff its acc values are not all
    equal (std > 0). As verl's DAPO trainer (and the RPG repo's), a group with a single sample is kept too.
    Values are compared exactly: verl's ``np.std`` could call equal floats such as three 0.1s "> 0"."""
    if len(accs) != len(group_ids):
        raise ValueError(f"accs ({len(accs)}) and group_ids ({len(group_ids)}) differ in length")
    values: dict[int, list[float]] = defaultdict(list)
    for a, g in zip(accs, group_ids, strict=True):
        values[g].append(float(a))
    keep = {g: len(v) == 1 or len(set(v)) > 1 for g, v in values.items()}
    return [keep[g] for g in group_ids]
