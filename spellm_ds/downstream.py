"""Downstream evaluation: a SpeLLM student against its teacher on the tasks of :mod:`spellm_ds.tasks`.

Systems, all fed identical token ids:

- ``teacher``: the original model and its LM head;
- multiple choice: ``spellm`` scores each option token by the probability of its spelling under
  the char heads' token distribution; ``spellm_fallback`` uses the LM head on the student's
  hidden state instead at positions where decoding would fall back (mean head entropy >= tau or
  an UNK char);
- generation (greedy): ``spellm_raw`` (exact lookups only; a string that is no token ends the
  output), ``spellm_autocorrect``, ``spellm_fallback`` (AutoCorrect + fallback), as in
  :func:`spellm_ds.decoding.generate`.

Statistics: accuracies with 95% Wilson intervals, ROUGE-L with a normal-approximation interval,
and each system's paired difference to the teacher (same examples) with a normal-approximation
interval. Evaluation runs in one process on one device.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from spellm_ds.decoding import Provenance, decode_loop, generate, lm_head_picker
from spellm_ds.metrics import wilson_interval
from spellm_ds.model import SpeLLMForCausalLM
from spellm_ds.tasks import TASKS, Generation, MultipleChoice, first_number
from spellm_ds.teacher import lm_head_log_probs

MC_SYSTEMS = ("teacher", "spellm", "spellm_fallback")
GENERATION_SYSTEMS = ("teacher", "spellm_raw", "spellm_autocorrect", "spellm_fallback")


def load_models(model_dir: str | Path, teacher: str | None, dtype: torch.dtype, device: str):
    """The exported SpeLLM model and its teacher (``teacher`` or the one recorded in its config)."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.assets import resolve_model

    student = SpeLLMForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    teacher_dir = resolve_model(teacher or student.config.teacher)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
    return student, teacher_model


def mean_interval(values: list[float], low: float, high: float, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean, clipped to the values' range ``[low, high]``."""
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    mean = sum(values) / n
    half = z * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return (max(low, mean - half), min(high, mean + half))


def summarise(scores: dict[str, list[float]], binary: bool) -> dict[str, dict[str, Any]]:
    """Per system: mean score (in [0, 1]), its interval, and the paired difference to the teacher."""
    teacher = scores["teacher"]
    out = {}
    for system, values in scores.items():
        n = len(values)
        mean = sum(values) / n if n else 0.0
        ci = wilson_interval(int(sum(values)), n) if binary else mean_interval(values, 0.0, 1.0)
        entry: dict[str, Any] = {"score": mean, "ci95": list(ci), "n": n}
        if system != "teacher":
            diffs = [v - t for v, t in zip(values, teacher)]
            entry["diff_vs_teacher"] = sum(diffs) / n if n else 0.0
            entry["diff_ci95"] = list(mean_interval(diffs, -1.0, 1.0))
        out[system] = entry
    return out


class Evaluator:
    def __init__(self, student: SpeLLMForCausalLM, teacher, tau: float, batch_size: int = 8) -> None:
        self.student, self.teacher = student, teacher
        self.tokenizer = student.tokenizer
        self.device = student.base.device
        self.with_fallback = student.char_decoder(tau)
        self.no_fallback = student.char_decoder(None)
        self.batch_size = batch_size
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    # ----------------------------------------------------------------- multiple choice
    def _ids(self, text: str, specials: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    @torch.no_grad()
    def option_log_likelihoods(self, example: MultipleChoice) -> tuple[dict[str, torch.Tensor], int, int]:
        """Summed log-likelihood of each option per system, plus (fallback positions, positions)."""
        prompt = self._ids(example.prompt, specials=True)
        options = [self._ids(option, specials=False) for option in example.options]
        width = len(prompt) + max(map(len, options))
        input_ids = torch.full((len(options), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        rows, cols, targets = [], [], []
        for i, option in enumerate(options):
            sequence = prompt + option
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
            rows += [i] * len(option)
            cols += range(len(prompt) - 1, len(sequence) - 1)
            targets += option
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        rows_t, cols_t = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)

        def hidden_of(model) -> torch.Tensor:
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden[rows_t, cols_t]

        def target_log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
            logp = lm_head_log_probs(model.get_output_embeddings(), hidden)
            return logp.gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)

        teacher_lp = target_log_probs(self.teacher, hidden_of(self.teacher))
        student_hidden = hidden_of(self.student.base)
        char_logits = self.student.char_heads(student_hidden)
        char_lp = self.with_fallback.spelling_log_probs(char_logits, targets_t)
        fallback = self.with_fallback.propose(char_logits, autocorrect=False).fallback
        fallback_lp = torch.where(fallback, target_log_probs(self.student.base, student_hidden), char_lp)
        per_system = {"teacher": teacher_lp, "spellm": char_lp, "spellm_fallback": fallback_lp}
        sums = {name: torch.zeros(len(options), device=self.device).index_add_(0, rows_t, lp).cpu()
                for name, lp in per_system.items()}
        return sums, int(fallback.sum()), len(targets)

    def multiple_choice(self, examples: list[MultipleChoice]) -> dict[str, Any]:
        """Accuracy (options by summed log-likelihood) and acc_norm (divided by the option's length
        in characters), as lm-eval defines them; an example whose options all score -inf counts
        as wrong."""
        correct = {s: [] for s in MC_SYSTEMS}
        correct_norm = {s: [] for s in MC_SYSTEMS}
        fallback_positions = positions = unscorable = 0
        for example in examples:
            sums, fell_back, n = self.option_log_likelihoods(example)
            fallback_positions, positions = fallback_positions + fell_back, positions + n
            chars = torch.tensor([max(len(o), 1) for o in example.options], dtype=torch.float32)
            for system, scores in sums.items():
                scorable = bool(torch.isfinite(scores).any())
                unscorable += int(not scorable and system == "spellm")
                correct[system].append(float(scorable and int(scores.argmax()) == example.answer))
                correct_norm[system].append(float(scorable and int((scores / chars).argmax()) == example.answer))
        return {"acc": summarise(correct, binary=True), "acc_norm": summarise(correct_norm, binary=True),
                "fallback_rate": fallback_positions / max(positions, 1), "option_tokens": positions,
                "spellm_unscorable_examples": unscorable}

    # ----------------------------------------------------------------- generation
    def _text(self, ids: torch.Tensor) -> str:
        ids = ids.tolist()
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], max_new_tokens: int) -> tuple[dict[str, list[str]], dict[str, dict]]:
        """Greedy outputs per system for left-padded prompts, and each system's token provenance."""
        encoded = [self._ids(p, specials=True) for p in prompts]
        width = max(map(len, encoded))
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        args = (input_ids, attention_mask, max_new_tokens, self.eos)
        outputs = {
            "teacher": decode_loop(self.teacher, lm_head_picker(self.teacher), *args),
            "spellm_raw": generate(self.student, self.no_fallback, *args, autocorrect=False),
            "spellm_autocorrect": generate(self.student, self.no_fallback, *args),
            "spellm_fallback": generate(self.student, self.with_fallback, *args),
        }
        texts = {system: [self._text(row) for row in out.sequences] for system, out in outputs.items()}
        return texts, {system: out.counts() for system, out in outputs.items() if system != "teacher"}

    def generation(self, task: str, examples: list[Generation], max_new_tokens: int) -> dict[str, Any]:
        """Accuracy of the first number (asdiv) or ROUGE-L F1 (xsum) per system."""
        scores: dict[str, list[float]] = {s: [] for s in GENERATION_SYSTEMS}
        provenance = {s: {p.name.lower(): 0 for p in Provenance} for s in GENERATION_SYSTEMS[1:]}
        samples = []
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            texts, counts = self.generate_batch([e.prompt for e in batch], max_new_tokens)
            for system, outputs in texts.items():
                scores[system] += [score_generation(task, text, e.reference) for text, e in zip(outputs, batch)]
            for system, system_counts in counts.items():
                for name, count in system_counts.items():
                    provenance[system][name] += count
            if start == 0:
                samples = [{"reference": e.reference, **{s: texts[s][i] for s in texts}}
                           for i, e in enumerate(batch[:3])]
        rates = {s: {name: count / max(sum(c.values()), 1) for name, count in c.items()} for s, c in provenance.items()}
        metric = TASKS[task].metric
        return {metric: summarise(scores, binary=metric == "accuracy"), "provenance": rates,
                "fallback_rate": rates["spellm_fallback"]["fallback"], "samples": samples}


def score_generation(task: str, output: str, reference: str) -> float:
    if TASKS[task].metric == "accuracy":
        predicted = first_number(output)
        return float(predicted is not None and predicted == first_number(reference))
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score(output, reference, rouge_keys="rougeL", use_stemmer=True)["rougeL_fmeasure"])


def evaluate(evaluator: Evaluator, tasks: dict[str, list]) -> dict[str, Any]:
    """Every task's results (``tasks``: name -> examples from :func:`spellm_ds.tasks.load_task`)."""
    results = {}
    for name, examples in tasks.items():
        started = time.perf_counter()
        max_new_tokens = TASKS[name].max_new_tokens
        if max_new_tokens is None:
            result = evaluator.multiple_choice(examples)
        else:
            result = evaluator.generation(name, examples, max_new_tokens)
        results[name] = {"n": len(examples), "seconds": time.perf_counter() - started, **result}
    return results


def _cell(entry: dict[str, Any], diff: bool) -> str:
    if diff:
        if "diff_vs_teacher" not in entry:
            return ""
        low, high = entry["diff_ci95"]
        return f"{100 * entry['diff_vs_teacher']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    low, high = entry["ci95"]
    return f"{100 * entry['score']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown(results: dict[str, Any]) -> str:
    """One row per task, metric and system: score and difference to the teacher, in points."""
    lines = ["| task | metric | n | system | score [95% CI] | vs teacher [95% CI] | fallback rate |",
             "|---|---|---|---|---|---|---|"]
    for task, result in results.items():
        for metric in ("acc", "acc_norm", "accuracy", "rougeL_f1"):
            for system, entry in result.get(metric, {}).items():
                fallback = f"{100 * result['fallback_rate']:.1f}%" if system == "spellm_fallback" else ""
                lines.append(f"| {task} | {metric} | {result['n']} | {system} | {_cell(entry, False)} | "
                             f"{_cell(entry, True)} | {fallback} |")
    return "\n".join(lines) + "\n"
