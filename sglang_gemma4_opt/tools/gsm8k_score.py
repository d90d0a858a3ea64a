"""GSM8K data, answer extraction and scoring, and reading what sglang's few_shot_gsm8k leaves behind.

The score that gates CI is the one `python -m sglang.test.few_shot_gsm8k` prints. This module
recomputes it from the answers the client dumped (tmp_output_gsm8k.txt), so the report can list
every answer and a disagreement between the two is caught instead of trusted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# few_shot_gsm8k's marker for "no number in the text"; kept equal so counts of invalid answers match.
INVALID = -9999999

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def default_data_path() -> Path:
    """The GSM8K test split shipped in the package (MIT, see data/gsm8k/LICENSE)."""
    return Path(str(resources.files("sglang_gemma4_opt") / "data" / "gsm8k" / "test.jsonl"))


def load_questions(path: str | Path) -> list[dict]:
    """Read the file as sglang's read_jsonl does: one JSON object a line, '#' lines skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            rows.append(json.loads(line))
    return rows


def normalize_number(text: str) -> int | float | None:
    """'$1,234.50.' -> 1234.5, ' 72 ' -> 72, '-3' -> -3; None when it is not a number."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return None
    value = float(s)
    return int(value) if value.is_integer() else value


def gold_answer(answer_field: str) -> int | float:
    """The reference answer: what follows the last '####' of the dataset's answer field."""
    if "####" not in answer_field:
        raise ValueError(f"no '####' in GSM8K answer: {answer_field[-80:]!r}")
    value = normalize_number(answer_field.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K answer after '####' is not a number: {answer_field[-80:]!r}")
    return value


def sglang_answer_value(text: str) -> int:
    """few_shot_gsm8k's `get_answer_value`: drop commas, take the LAST run of digits.

    Signs and decimals are ignored on purpose (so '-3' reads 3 and '2.5' reads 5), exactly as the
    client that produces the CI score does; both labels and predictions go through this rule.
    """
    numbers = re.findall(r"\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else INVALID


def extract_answer(text: str, rule: str = "sglang") -> int | float:
    """A model answer as a number, by one of these rules:

    sglang  last run of digits (the CI score's rule, see `sglang_answer_value`)
    last    last signed/decimal number after dropping commas and '$'
    first   first such number
    hash    the number after the first '####' (the few-shot format), else the `last` rule
    """
    if rule == "sglang":
        return sglang_answer_value(text)
    clean = text.replace(",", "").replace("$", "")
    if rule == "hash" and "####" in clean:
        after = clean.split("####", 1)[1].strip().split("\n", 1)[0]
        m = _NUMBER.search(after)
        if m:
            return normalize_number(m.group())
        return INVALID
    nums = _NUMBER.findall(clean)
    if not nums:
        return INVALID
    if rule in ("last", "hash"):
        return normalize_number(nums[-1])
    if rule == "first":
        return normalize_number(nums[0])
    raise ValueError(f"unknown rule {rule!r}")


# The prompt few_shot_gsm8k builds, reproduced so generated text can be cut out of its dump.
def question_prompt(rows: list[dict], i: int, with_answer: bool = False) -> str:
    out = "Question: " + rows[i]["question"] + "\nAnswer:"
    return out + " " + rows[i]["answer"] if with_answer else out


def few_shot_prefix(rows: list[dict], k: int) -> str:
    return "".join(question_prompt(rows, i, True) + "\n\n" for i in range(k))


@dataclass
class Score:
    correct: int
    total: int
    invalid: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total, "invalid": self.invalid,
                "accuracy": self.accuracy}


def score(preds: list, labels: list) -> Score:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    correct = sum(p == lab for p, lab in zip(preds, labels))
    return Score(correct, len(labels), sum(p == INVALID for p in preds))


_CLIENT_FIELDS = {"Accuracy": "accuracy", "Invalid": "invalid", "Latency": "latency_s",
                  "Output throughput": "output_throughput"}


def parse_client_output(text: str) -> dict:
    """The metrics few_shot_gsm8k prints ('Accuracy: 0.445', 'Latency: 12.3 s', ...); the last
    occurrence wins. Raises ValueError when there is no Accuracy line (the client failed)."""
    out = {}
    for label, key in _CLIENT_FIELDS.items():
        found = re.findall(rf"^{label}: ([-+0-9.eE]+)", text, flags=re.M)
        if found:
            out[key] = float(found[-1])
    if "accuracy" not in out:
        raise ValueError("no 'Accuracy: ' line in few_shot_gsm8k's output")
    return out


def parse_state_dump(text: str) -> list[str]:
    """Split sglang's dump_state_text file ('=' * 40 + ' i ' + '=' * 40 blocks) into the states."""
    bar = "=" * 40
    states = []
    i = 0
    pos = text.find(f"{bar} 0 {bar}\n")
    while pos >= 0:
        start = pos + len(f"{bar} {i} {bar}\n")
        nxt = text.find(f"{bar} {i + 1} {bar}\n", start)
        block = text[start:] if nxt < 0 else text[start:nxt]
        closing = "\n" + "=" * 80 + "\n\n"
        if block.endswith(closing):
            block = block[: -len(closing)]
        states.append(block)
        i, pos = i + 1, nxt
    return states


def generated_answers(states: list[str], rows: list[dict], num_shots: int) -> list[str | None]:
    """The text the model generated for question i: its state minus the prompt few_shot_gsm8k sent.
    None where the state does not start with that prompt (then the dump cannot be trusted)."""
    prefix = few_shot_prefix(rows, num_shots)
    out: list[str | None] = []
    for i, state in enumerate(states):
        prompt = prefix + question_prompt(rows, i)
        out.append(state[len(prompt):] if state.startswith(prompt) else None)
    return out


def rescore(states: list[str], rows: list[dict], num_shots: int) -> tuple[Score, list[dict]]:
    """Score the dumped answers with sglang's rule; also return one row per question for the report."""
    gens = generated_answers(states, rows, num_shots)
    if any(g is None for g in gens):
        bad = [i for i, g in enumerate(gens) if g is None][:5]
        raise ValueError(f"dumped states do not start with the few-shot prompt (questions {bad})")
    labels = [sglang_answer_value(rows[i]["answer"]) for i in range(len(gens))]
    preds = [sglang_answer_value(g) for g in gens]
    per_q = [{"i": i, "label": lab, "pred": p, "correct": p == lab, "answer": g[:400]}
             for i, (lab, p, g) in enumerate(zip(labels, preds, gens))]
    return score(preds, labels), per_q
