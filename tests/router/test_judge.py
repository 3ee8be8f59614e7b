"""The judge's prompt and verdict parsing, the reference checker, and the labeller's small parts
(streamed answers, the token bucket, the day's budget)."""

from __future__ import annotations

import json

import pytest

from router.labelling.judge import (
    JUDGE_SYSTEM,
    combine,
    judge_messages,
    parse_verdict,
    question_text,
    side,
)
from router.labelling.labeller import TokenBucket, TokenBudget, streamed_text
from router.labelling.reference import check, expected_answer, extract


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("[[A]]", "A"),
        ("Assistant B explains more. [[B]]", "B"),
        ("Both are fine, so it is a tie: [[C]]", "C"),
        ("Some say [[A]] but on reflection my final verdict is [[B]].", "B"),  # the last one
        ("Final verdict: [[ B ]]", "B"),
        ("**Final Verdict:** [[A]]\n", "A"),
        ("I compared them.\n\nFinal verdict: A", "A"),
        ("My verdict is (B).", "B"),
        ("Verdict: [C]", "C"),
        ("Assistant A is better because it shows its work.", "A"),
        ("Overall, B is the better answer.", "B"),
        ("Answer B is clearly better.", "B"),
        ("The verdict is a tie.", "C"),
        ("After weighing both answers I pick\n[B]", "B"),
        # unreadable or ambiguous: no verdict
        ("", None),
        ("Both answers are good.", None),
        ("Neither A nor B is better than the other.", None),
        ("Assistant A is better at style. Assistant B is better at facts.", None),
        ("[[D]]", None),
        ("The answer is 42.", None),
        ("a is better", None),  # lower case: not a position
    ],
)
def test_parse_verdict_from_free_text(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_sides_and_combination_cancel_the_position() -> None:
    # First call: small as A, large as B; second: large as A, small as B.
    assert side("B", "B") == "large" and side("A", "B") == "small" and side("C", "A") == "tie"
    assert combine(side("B", "B"), side("A", "A")) == 1.0  # both prefer large
    assert combine(side("A", "B"), side("B", "A")) == 0.0  # both prefer small
    assert combine(side("A", "B"), side("A", "A")) == 0.5  # position bias: always "A"
    assert combine("tie", "large") == 0.5 and combine("tie", "tie") == 0.5


def test_judge_messages_hold_the_question_and_both_answers() -> None:
    messages = judge_messages("What is 2+2?", "4", "five")
    assert messages[0] == {"role": "system", "content": JUDGE_SYSTEM}
    user = messages[1]["content"]
    assert user.index("What is 2+2?") < user.index("4") < user.index("five")
    assert "[The Start of Assistant A's Answer]\n4\n[The End of Assistant A's Answer]" in user
    assert '"[[A]]"' in JUDGE_SYSTEM and '"[[C]]" for a tie' in JUDGE_SYSTEM


def test_question_text_of_prompts_and_conversations() -> None:
    assert question_text("plain prompt") == "plain prompt"
    assert question_text([{"role": "user", "content": "hi"}]) == "hi"
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": parts},
    ]
    assert question_text(conversation) == "system: be brief\n\nuser: look\n[image_url]"


def test_reference_extraction_and_check() -> None:
    assert extract("So the total is 1,234.50 dollars.", "last_number") == "1234.5"
    assert extract("#### 18", "last_number") == extract("18.0", "last_number")
    assert extract("no digits", "last_number") is None
    assert extract("The answer is (C).", "choice_letter") == "C"
    assert extract("Answer: B", "choice_letter") == "B"
    assert extract("D.", "choice_letter") == "D"
    assert extract("I think (A) fits, but (B) is right", "choice_letter") == "B"
    assert extract("  Paris \n", "exact") == extract("paris", "exact")
    both = check("42", "The answer is 42.", "It is 42", "last_number")
    assert both.large_better == 0.5 and both.short == ("small: right", "large: right")
    large_only = check("#### 42", "I get 41.", "Total: 42", "last_number")
    assert large_only.large_better == 1.0
    assert large_only.notes[0] == "small: 41.0 (wrong; expected 42.0)"
    assert check("B", "Answer: B", "Answer: C", "choice_letter").large_better == 0.0
    assert check("x", "no", "no", "exact").large_better == 0.5  # neither right


def test_expected_answer_by_dotted_path() -> None:
    body = {"metadata": {"reference": "42", "n": 7, "flag": True}, "top": " x "}
    assert expected_answer(body, "metadata.reference") == "42"
    assert expected_answer(body, "metadata.n") == "7"
    assert expected_answer(body, "top") == "x"
    assert expected_answer(body, "metadata.flag") is None
    assert expected_answer(body, "metadata.missing") is None
    assert expected_answer(body, "top.deeper") is None


def _sse(*chunks: dict[str, object]) -> bytes:
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return events + b"data: [DONE]\n\n"


def test_streamed_text_joins_content_deltas() -> None:
    raw = _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
    )
    assert streamed_text("chat/completions", raw) == "Hello"
    completion = _sse({"choices": [{"index": 0, "text": "4"}]})
    assert streamed_text("completions", completion) == "4"
    tools = _sse({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    assert streamed_text("chat/completions", tools) is None
    two = _sse({"choices": [{"index": 1, "delta": {"content": "x"}}]})
    assert streamed_text("chat/completions", two) is None
    assert streamed_text("chat/completions", b"data: {broken\n\n") is None


def test_token_bucket_and_daily_budget() -> None:
    now = [0.0]
    bucket = TokenBucket(0.5, 1.0, clock=lambda: now[0])
    assert bucket.take() and not bucket.take()
    now[0] = 1.0
    assert not bucket.take()  # half a token
    now[0] = 2.0
    assert bucket.take()
    day = [86_400.0 * 100 + 10]
    budget = TokenBudget(100, wall=lambda: day[0])
    assert not budget.exhausted()
    budget.spend(100)
    assert budget.exhausted()
    day[0] += 86_400.0  # the next UTC day
    assert not budget.exhausted() and budget.spent == 0
    assert not TokenBudget(None).exhausted()
