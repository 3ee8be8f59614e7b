"""Two hundred natural prompts (with a short answer each) for the vLLM equivalence tests.

Fifty hand-written questions across everyday assistant traffic (arithmetic word problems,
facts, code, writing, translation, reasoning, other languages, noise), each in four forms: as
is, under a system prompt, as the second turn of a conversation, and behind a long pasted
context (the longest past ``max_tokens``, so the tail cut is exercised). Written for this
project; no benchmark data is copied.
"""

from __future__ import annotations

from probes.types import ProbeInput

__all__ = ["PROMPTS_WITH_ANSWERS", "prompts_with_answers"]

_SEEDS: tuple[tuple[str, str], ...] = (
    ("Janet has 16 eggs. She eats 3 and bakes with 4. How many are left?", "9 eggs are left."),
    ("A train travels 60 km in 45 minutes. What is its speed in km/h?", "80 km/h."),
    ("If a shirt costs $25 after a 20% discount, what was the original price?", "$31.25."),
    ("What is 17 times 23?", "391."),
    ("Tom has twice as many apples as Sam, who has 7. How many do they have together?", "21."),
    ("How many seconds are there in a day?", "86,400 seconds."),
    ("Solve for x: 3x + 7 = 22.", "x = 5."),
    ("What is the derivative of x^3 * sin(x)?", "3x^2 sin(x) + x^3 cos(x)."),
    ("What is the capital of Australia?", "Canberra."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen."),
    ("What gas do plants absorb during photosynthesis?", "Carbon dioxide."),
    ("In which year did the Berlin Wall fall?", "1989."),
    ("What is the largest planet in the solar system?", "Jupiter."),
    ("Explain in two sentences why the sky is blue.", "Air scatters short wavelengths more."),
    ("What does DNA stand for?", "Deoxyribonucleic acid."),
    ("Name three noble gases.", "Helium, neon and argon."),
    ("Write a Python function that reverses a string.", "def rev(s): return s[::-1]"),
    ("What is the time complexity of binary search?", "O(log n)."),
    ("Explain the difference between a list and a tuple in Python.", "Lists are mutable."),
    (
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# What does this do?",
        "It computes Fibonacci numbers recursively.",
    ),
    ("Write a SQL query that counts rows per country in a table users.", "SELECT country, ..."),
    ("Why does my JavaScript fetch call return a pending Promise?", "You need to await it."),
    ("What is a race condition?", "Two threads racing on shared state."),
    ("Write a haiku about autumn rain.", "Cold rain on the leaves..."),
    ("Draft a polite email declining a meeting invitation.", "Thank you for the invitation..."),
    ("Give me three title ideas for a blog post about remote work.", "1. Home Base..."),
    ("Summarise the plot of Romeo and Juliet in one sentence.", "Two lovers die young."),
    ("Write a limerick about a cat who loves cheese.", "There once was a cat..."),
    ("Rewrite this sentence more formally: gonna grab food, brb.", "I will be back shortly."),
    ("Translate to German: the lazy dog sleeps in the sun.", "Der faule Hund schläft."),
    ("Translate 'good morning, how are you?' into Spanish.", "Buenos días, ¿cómo estás?"),
    ("Bonjour, peux-tu m'expliquer la photosynthèse en deux phrases ?", "Les plantes..."),
    ("¿Cuál es la montaña más alta del mundo?", "El Everest."),
    ("Wie viele Beine hat eine Spinne?", "Acht."),
    ("日本の首都はどこですか?", "東京です。"),
    ("Какая самая длинная река в Европе?", "Волга."),
    ("用一句话解释什么是机器学习。", "机器学习是让计算机从数据中学习。"),
    ("If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?", "Yes."),
    ("A bat and a ball cost $1.10; the bat costs $1 more. How much is the ball?", "5 cents."),
    ("Which is heavier, a kilogram of feathers or a kilogram of steel?", "Neither."),
    ("What comes next: 2, 6, 12, 20, 30, ?", "42."),
    ("Is it ethical to use AI to write school essays? Give both sides.", "It depends..."),
    ("What are the pros and cons of nuclear power?", "Low carbon; waste."),
    ("How do I make a sourdough starter?", "Mix flour and water daily."),
    ("Plan a three-day trip to Rome.", "Day 1: Colosseum..."),
    ("What should I consider when adopting a dog?", "Time, space and cost."),
    ("qz xv kk wp tt ff 77 ## lorem zzgl ptarmigan", "I do not understand."),
    ("asdf jkl; qwerty uiop zxcv bnm", "That looks like keyboard rows."),
    ("!!!! ???? .... ----", "Could you rephrase?"),
    ("Describe the colour blue to someone who has never seen it.", "Cool, like water."),
)

_SYSTEM = "You are a concise, careful assistant. Answer in as few words as possible."
_CONTEXT = (
    "The following notes were pasted from a long meeting transcript. They cover budgets, "
    "timelines, staffing, the vendor review, customer feedback and next quarter's plans. "
)


def prompts_with_answers() -> list[tuple[ProbeInput, str]]:
    """Fifty questions in four forms: 200 (input, answer) pairs, deterministic."""
    out: list[tuple[ProbeInput, str]] = []
    for i, (question, answer) in enumerate(_SEEDS):
        previous_q, previous_a = _SEEDS[(i + 7) % len(_SEEDS)]
        out.append((question, answer))
        out.append(
            (
                [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": question}],
                answer,
            )
        )
        out.append(
            (
                [
                    {"role": "user", "content": previous_q},
                    {"role": "assistant", "content": previous_a},
                    {"role": "user", "content": question},
                ],
                answer,
            )
        )
        # 2 to 11 copies of the context (~70 to ~360 tokens); every tenth question behind 20
        # (~650 tokens: max_tokens 512 keeps the tail).
        copies = 20 if i % 10 == 0 else 2 + (i * 37) % 10
        out.append((_CONTEXT * copies + "\n\nQuestion: " + question, answer))
    return out


PROMPTS_WITH_ANSWERS: tuple[tuple[ProbeInput, str], ...] = tuple(prompts_with_answers())
