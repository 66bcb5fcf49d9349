"""The paper's "Answer:" rule (spec §8, hand-worked through verl's math_dapo), the lenient rule, math-verify in a
process pool, DAPO overlong shaping and the group filter (spec §6.2)."""

import os
import time

import pytest
import torch

from rpg_core.rewards import (
    INVALID,
    AnswerRule,
    MathVerifyScorer,
    Score,
    group_filter,
    lenient_score,
    normalize_final_answer,
    overlong_penalty,
    paper_score,
    score_responses,
)

pytestmark = pytest.mark.unit

torch.set_num_threads(1)

# -- spec §8: the paper's rule ------------------------------------------------------------------------------------

# (response, ground truth, accepted, pred): pred worked by hand through math_dapo.compute_score.
PAPER_CASES = [
    ("So the total is 42.\nAnswer: 42", "42", True, "42"),
    ("Answer: 042", "42", False, "042"),  # leading zeros are kept
    ("Answer: 42.", "42", False, "42."),  # ".$" -> "$" only fires before a "$"; "42." is not all digits
    ("Answer: $42.$", "42", True, "42"),  # ... which it does here
    ("**Answer:** 42", "42", False, "**42"),  # capture "** 42", spaces removed
    ("Answer: **42**", "42", False, "**42**"),
    ("The sum is \\boxed{42}.", "42", False, INVALID),  # no Answer line: the box alone does not count
    ("Answer: \\boxed{42}", "42", True, "42"),  # unwrapped by normalisation
    ("Answer: $42$", "42", True, "42"),
    ("Answer: 336", "336^\\circ", True, "336"),  # the AIME25 II-5 label: ^\circ removed
    ("Answer: 336^\\circ", "336", True, "336"),
    ("Answer: 336°", "336", False, "336°"),  # a unicode degree sign is not removed
    ("Answer: 1,000", "1000", True, "1000"),  # digits with commas: commas dropped
    ("Answer: 1,000", "1,000", True, "1000"),
    ("ANSWER: 42", "42", True, "42"),  # case-insensitive
    ("answer : 42", "42", True, "42"),
    ("The final answer: 42", "42", True, "42"),  # anywhere on a line, not only at its start
    ("Answer: 41\nWait, no.\nAnswer: 42", "42", True, "42"),  # the last match wins
    ("Answer: 42\nOn second thought,\nAnswer: 41", "42", False, "41"),
    ("Answer: x = 5", "5", True, "5"),  # text after the last "=" only
    ("Answer: x = 5, y = 6", "6", True, "6"),
    ("Answer: 5 dollars", "5", True, "5"),  # units removed ("5dollars" -> "5")
    ("Answer: 5 apples", "5", False, "5apples"),  # ... only the listed ones
    ("Answer: 40 + 2", "42", False, "40+2"),
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),  # shorthand \fracab expanded
    ("Answer: \\frac{1}{2}", "0.5", False, "\\frac{1}{2}"),  # no numeric equivalence
    ("Answer:\n42", "42", True, "42"),  # \s* after the colon crosses the newline (spec prose: "that line")
    ("The answer is 42", "42", False, INVALID),  # no colon
    ("Answer:", "42", False, INVALID),  # nothing after the colon
    ("", "42", False, INVALID),
]


@pytest.mark.parametrize(("response", "gt", "ok", "pred"), PAPER_CASES)
def test_paper_rule(response: str, gt: str, ok: bool, pred: str) -> None:
    s = paper_score(response, gt)
    assert s == Score(1.0 if ok else -1.0, ok, pred)


def test_paper_rule_reads_only_the_last_300_characters() -> None:
    head = "Answer: 42\n"  # 11 characters
    assert paper_score(head + "y" * 289, "42").acc  # 300 characters: the whole line is in the tail
    cut = paper_score(head + "y" * 290, "42")  # 301: the tail starts at "nswer: 42"
    assert cut == Score(-1.0, False, INVALID)
    assert not paper_score(head + "z" * 1000, "42").acc
    assert paper_score("x" * 1000 + "\nAnswer: 42", "42").acc


def test_normalize_final_answer_hand_values() -> None:
    assert normalize_final_answer("\\text{(B) } 5") == "(B)5"
    assert normalize_final_answer("$x = 12$ units") == "12"  # "=" split first, then units, then "$...$"
    assert normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
    assert normalize_final_answer("12,345,678") == "12345678"
    assert normalize_final_answer("1,2") == "12"  # any digits-with-commas string, not only thousands
    assert normalize_final_answer("(1,2)") == "(1,2)"
    assert normalize_final_answer("[INVALID]") == INVALID


# -- the lenient rule ---------------------------------------------------------------------------------------------

LENIENT_CASES = [
    ("Answer: 042", "42", True, "042"),
    ("**Answer:** **42**.", "42", True, "42"),
    ("The sum is \\boxed{42}", "42", True, "42"),
    ("27 + 15 = 42", "42", True, "42"),
    ("I think 41. No: 43", "42", False, "43"),  # the last number, not any number
    ("x = -3", "-3", True, "-3"),  # a leading minus is kept
    ("10-3 = 7", "7", True, "7"),  # a minus after a digit is subtraction
    ("It costs 1,000 dollars", "1000", True, "1000"),
    ("1,000", "1,000", True, "1000"),
    ("The answer is 2.5", "5", False, "2.5"),  # a decimal is not the integer after its point
    ("The answer is 2.5", "2.5", True, "2.5"),  # non-integer ground truth: normalised strings
    ("Answer: 336", "336^\\circ", True, "336"),
    ("Answer: 22099999999999998951424", "22099999999999998951424", True, "22099999999999998951424"),  # > int64
    ("Answer: 22099999999999998951425", "22099999999999998951424", False, "22099999999999998951425"),
    ("No idea.", "42", False, INVALID),
]


@pytest.mark.parametrize(("response", "gt", "ok", "pred"), LENIENT_CASES)
def test_lenient_rule(response: str, gt: str, ok: bool, pred: str) -> None:
    assert lenient_score(response, gt) == Score(1.0 if ok else -1.0, ok, pred)


def test_lenient_rule_compares_huge_integers_without_int() -> None:
    """A degenerate response of 5000 digits (Python's int() refuses more than 4300) scores, never raises."""
    assert lenient_score("1" * 5000, "7") == Score(-1.0, False, "1" * 5000)
    assert lenient_score("so " + "9" * 5000, "9" * 5000).acc
    assert lenient_score("-" + "0" * 4999 + "12", "-12").acc  # leading zeros, as int("-00012") == -12
    assert lenient_score("Answer: 0042", "42").acc and lenient_score("x = -0", "0").acc  # int("-0") == 0
    assert not lenient_score("x = -5", "5").acc
    assert lenient_score("\u0664\u0662", "42").acc  # Arabic-Indic digits: \d matches them and int() reads them as 42


def test_score_responses_dispatch_and_errors() -> None:
    responses, gts = ["Answer: 042", "Answer: 7"], ["42", "7"]
    assert [s.acc for s in score_responses(AnswerRule.PAPER, responses, gts)] == [False, True]
    assert [s.acc for s in score_responses("lenient", responses, gts)] == [True, True]
    with pytest.raises(ValueError, match=r"rule must be one of \['paper', 'lenient', 'math_verify'\]"):
        score_responses("strict", responses, gts)
    with pytest.raises(ValueError, match="responses"):
        score_responses(AnswerRule.PAPER, responses, ["42"])


# -- math-verify in a process pool -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("math_verify")
    with MathVerifyScorer(workers=2, timeout_s=5) as s:
        yield s


@pytest.mark.integration
@pytest.mark.subprocess
def test_math_verify_accepts_what_the_paper_rule_rejects(scorer: MathVerifyScorer) -> None:
    responses = ["Answer: \\frac{1}{2}", "Answer: 1/2", "Answer: 042", "so \\boxed{42}", "Answer: $3\\sqrt{13}$"]
    responses.append("Answer: 41")
    gts = ["0.5", "0.5", "42", "42", "\\sqrt{117}", "42"]
    assert [s.acc for s in score_responses(AnswerRule.PAPER, responses, gts)] == [False] * 6
    got = score_responses(AnswerRule.MATH_VERIFY, responses, gts, scorer=scorer)
    assert [s.acc for s in got] == [True, True, True, True, True, False]
    assert [s.score for s in got] == [1.0] * 5 + [-1.0]
    assert got[0].pred == "1/2" and got[2].pred == "42"
    assert score_responses(AnswerRule.MATH_VERIFY, ["no answer here"], ["42"], scorer=scorer) == [
        Score(-1.0, False, INVALID)
    ]


@pytest.mark.integration
@pytest.mark.subprocess
def test_math_verify_survives_bad_input(scorer: MathVerifyScorer) -> None:
    # None as the ground truth raises inside the worker ("\\boxed{" + None); None as the response parses to [].
    got = scorer.score([None, "Answer: 7", "Answer: 7"], ["7", None, "7"])  # type: ignore[list-item]
    assert [s.acc for s in got] == [False, False, True]
    assert scorer.score(["Answer: 8"], ["8"])[0].acc


class _KillsWorker:
    """Unpickling this in a worker ends the worker process: a real dead worker, no mock."""

    def __reduce__(self):
        return (os._exit, (1,))


@pytest.mark.integration
@pytest.mark.subprocess
def test_math_verify_pool_recovers_from_a_dead_worker(scorer: MathVerifyScorer) -> None:
    t0 = time.monotonic()
    assert scorer.score([_KillsWorker()], ["1"]) == [Score(-1.0, False, INVALID)]  # type: ignore[list-item]
    assert time.monotonic() - t0 < 15  # the broken pool answers at once, no timeout wait
    assert [s.acc for s in scorer.score(["Answer: 1", "Answer: 3"], ["1", "2"])] == [True, False]


def test_math_verify_scorer_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        MathVerifyScorer(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifyScorer(timeout_s=0.5)  # type: ignore[arg-type]


# -- DAPO (spec §6.2) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (1000, 0.0), (1536, 0.0), (1537, -1 / 512), (1664, -0.25), (1792, -0.5), (2048, -1.0)],
)
def test_overlong_penalty_dapo_7b_values(length: int, expected: float) -> None:
    # L_max = 2048, buffer 512, factor 1.0 (run_dapo_7b*.sh): 0 up to 1536, then linear to -1 at 2048.
    assert overlong_penalty(length, max_len=2048, buffer_len=512, factor=1.0) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_factor_and_validation() -> None:
    assert overlong_penalty(48, max_len=64, buffer_len=16, factor=0.5) == 0.0  # 48 = 64 - 16: no penalty yet
    assert overlong_penalty(56, max_len=64, buffer_len=16, factor=0.5) == -0.25  # 8/16 * 0.5
    assert overlong_penalty(64, max_len=64, buffer_len=64, factor=2.0) == -2.0  # buffer = the whole budget
    assert str(overlong_penalty(1536, max_len=2048, buffer_len=512, factor=1.0)) == "0.0"  # not -0.0
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match=r"buffer_len must be in \(0, max_len=64\]"):
            overlong_penalty(10, max_len=64, buffer_len=bad, factor=1.0)


def test_group_filter() -> None:
    # groups: 0 all right, 1 mixed, 2 all wrong, 3 a single sample (kept, as verl), 4 mixed float scores.
    accs = [True, True, True, False, False, False, True, 0.5, 0.5, -1.0]
    gids = [0, 0, 1, 1, 2, 2, 3, 4, 4, 4]
    assert group_filter(accs, gids) == [False, False, True, True, False, False, True, True, True, True]
    assert group_filter([0.1, 0.1, 0.1], [7, 7, 7]) == [False] * 3  # equal floats (np.std would say 1.4e-17)
    assert group_filter([1.0, 0.0, 1.0, 1.0], [2, 5, 5, 2]) == [False, True, True, False]  # ids need not be sorted
    assert group_filter([], []) == []
    with pytest.raises(ValueError, match="group_ids"):
        group_filter([True], [0, 0])
