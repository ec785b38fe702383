"""The built-in workloads: what users send, in three shapes that stress different things.

- chat: short questions, answers of a paragraph (TTFT of short prompts, decode speed);
- long: a long document and a short question about it (prefill speed, TTFT);
- code: edit a piece of code and return all of it, so the answer repeats the prompt (where
  drafting from the prompt, speculative decoding, pays most).

And the sampling settings users run, each given to every engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT_QUESTIONS = [
    "What is the capital of France, and what is it known for?",
    "Explain what a hash table is in a few sentences.",
    "Give me three tips for writing clear emails.",
    "Why is the sky blue?",
    "Write a short poem about lightning.",
    "What are the main differences between Python and C?",
    "How do vaccines work?",
    "Suggest a name for a coffee shop and explain why.",
    "What is the Pythagorean theorem?",
    "Describe a healthy breakfast.",
    "How does a bicycle stay upright?",
    "Summarize the plot of Romeo and Juliet.",
]

_PARAGRAPH = (
    "The city council met on Tuesday to discuss the new public transport plan. The plan adds three bus "
    "lines, extends the tram to the university, and lowers fares for students and older residents. "
    "Several members worried about the cost, which the mayor estimated at forty million over five years, "
    "while others argued that fewer cars would save money on road repairs and improve the air. "
)

_CODE = '''def total_price(items, tax_rate):
    """Sum the prices of items and add tax."""
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best


def describe(items, tax_rate):
    lines = []
    for item in items:
        lines.append(f"{item['name']}: {item['quantity']} x {item['price']}")
    lines.append(f"total: {total_price(items, tax_rate):.2f}")
    return "\\n".join(lines)
'''

_CODE_TASKS = [
    "Rename the variable `subtotal` to `net`. Reply with the whole file, changed, and nothing else.",
    "Add type hints to every function. Reply with the whole file, changed, and nothing else.",
    "Rename `items` to `cart` everywhere. Reply with the whole file, changed, and nothing else.",
    "Make `cheapest` return None for an empty list explicitly. Reply with the whole file and nothing else.",
]


@dataclass
class Workload:
    name: str
    prompts: list[list[dict[str, str]]]  # chat messages per request
    max_tokens: int


def workload(name: str, long_prompt_tokens: int = 1000) -> Workload:
    if name == "chat":
        return Workload(name, [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS], 128)
    if name == "long":
        repeats = max(1, long_prompt_tokens // 75)  # a paragraph is ~75 tokens
        prompts = []
        for i, question in enumerate(["What did the council discuss?", "What worried some members?"] * 4):
            document = f"Meeting notes, part {i}.\n" + _PARAGRAPH * repeats
            prompts.append([{"role": "user", "content": f"{document}\n\n{question} Answer in one sentence."}])
        return Workload(name, prompts, 32)
    if name == "code":
        return Workload(name, [[{"role": "user", "content": f"{_CODE}\n{task}"}] for task in _CODE_TASKS], 320)
    raise ValueError(f"unknown workload {name!r} (chat, long, code)")


WORKLOADS = ("chat", "long", "code")


# name -> request fields. Greedy is what benchmarks usually show; the others are what chat users
# run (OpenAI's default temperature 1; a typical page's 0.7 with top_p 0.9; llama.cpp's default chain).
SAMPLING: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "t1.0": {"temperature": 1.0},
    "t0.7-p0.9": {"temperature": 0.7, "top_p": 0.9},
    "chain": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
}
