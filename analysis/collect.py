"""One pass over held-out text: teacher and student forwards, kept as per-position records.

Every analysis module computes from these records, so ``analysis.report`` can run all of them
on a single pass (one teacher and one student forward per batch).

The teacher is the original model the SpeLLM directory records as its base (``spellm_config.json``
``teacher``), not the student's modified layers; ``--teacher`` overrides it. The student's frozen
lower layers are the teacher's, so they run once (in the teacher) unless ``--teacher`` is given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from spellm_ds import assets
from spellm_ds.data import load_texts, pack
from spellm_ds.errors import SpellmError
from spellm_ds.decoding import CharDecoder
from spellm_ds.losses import select_labels
from spellm_ds.metrics import mean_head_entropy
from spellm_ds.model import SpeLLMForCausalLM
from spellm_ds.spelling import SpellingTable
from spellm_ds.teacher import teacher_signal

TOP_K = 5


@dataclass
class Records:
    """Per-position columns (CPU tensors, N positions)."""

    top_ids: torch.Tensor  # [N, 5] teacher top-5
    top_probs: torch.Tensor  # [N, 5]
    teacher_entropy: torch.Tensor  # [N]
    raw_chars: torch.Tensor  # [N, k] argmax char of each head
    hit: torch.Tensor  # [N] bool: raw string is a valid spelling
    autocorrected: torch.Tensor  # [N] token from lookup or AutoCorrect
    fallback_token: torch.Tensor  # [N] the student's LM head argmax
    has_unk: torch.Tensor  # [N] bool: raw string holds UNK
    student_entropy: torch.Tensor  # [N] mean per-head entropy
    label_chars: torch.Tensor  # [N, k] selected label (training's default rule: min char NLL - log p_teacher)
    label_valid: torch.Tensor  # [N] bool

    def __len__(self) -> int:
        return len(self.top_ids)

    @classmethod
    def concat(cls, parts: list[Records]) -> Records:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an exported SpeLLM directory")
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE",
                        help="held-out text (.txt/.jsonl/.parquet or dataset dir; default: BoolQ dev passages)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--teacher", default=None, help="override the teacher recorded in the SpeLLM directory")
    parser.add_argument("--max_tokens", type=int, default=20000, help="positions to analyse (default: %(default)s)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--tau", type=float, default=0.22, help="fallback threshold (default: %(default)s)")


@dataclass
class Analysis:
    """What the modules need: the records, the spelling table and the settings."""

    records: Records
    table: SpellingTable
    tau: float
    teacher: str
    corpus_counts: torch.Tensor  # [V] token occurrences in the analysed text
    tokenizer: object


def held_out_blocks(tokenizer, data: list[str] | None, text_field: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """``max_tokens`` positions (rounded up to whole blocks) of ``data`` or the BoolQ dev passages."""
    texts = load_texts(data, text_field)["text"] if data else assets.held_out_texts()
    blocks = pack(texts, tokenizer, seq_len, max_blocks=-(-max_tokens // seq_len))
    if len(blocks) == 0:
        raise SpellmError(f"the text to analyse is shorter than one {seq_len}-token block; "
                          "lower --seq_len or add text")
    return blocks


@torch.no_grad()
def collect(args: argparse.Namespace) -> Analysis:
    from transformers import AutoModelForCausalLM

    student = SpeLLMForCausalLM.from_pretrained(args.model)
    teacher_name = args.teacher or student.config.teacher
    teacher = AutoModelForCausalLM.from_pretrained(assets.resolve_model(teacher_name), dtype=torch.float32).eval()
    table = student.spelling
    decoder = CharDecoder(table, tau=args.tau)
    blocks = held_out_blocks(student.tokenizer, args.data, args.text_field, args.seq_len, args.max_tokens)
    # The student's layers below the trainable ones are the recorded teacher's: share them,
    # unless another teacher was asked for.
    n_top, n_layers = student.config.trainable_layers, student.base.config.num_hidden_layers
    trunk_layer = n_layers - n_top if not args.teacher and 0 < n_top <= n_layers else None
    parts = []
    for start in tqdm(range(0, len(blocks), args.batch_size), desc="analyse", disable=len(blocks) <= args.batch_size):
        ids = blocks[start : start + args.batch_size]
        signal, trunk = teacher_signal(teacher, ids, top_k=TOP_K, trunk_layer=trunk_layer)
        out = student(ids, with_token_logits=True) if trunk is None else student(trunk_hidden=trunk,
                                                                                with_token_logits=True)
        char_logits = out.char_logits.flatten(0, 1)
        proposal = decoder.propose(char_logits)
        labels = select_labels(out.char_logits, signal.top_ids, table.chars, table.spellable, signal.top_probs)
        raw = char_logits.argmax(-1)
        parts.append(Records(
            top_ids=signal.top_ids.flatten(0, 1), top_probs=signal.top_probs.flatten(0, 1),
            teacher_entropy=signal.entropy.flatten(), raw_chars=raw, hit=proposal.hit,
            autocorrected=proposal.token_ids, fallback_token=out.token_logits.flatten(0, 1).argmax(-1),
            has_unk=(raw == 1).any(-1), student_entropy=mean_head_entropy(char_logits),
            label_chars=labels.chars.flatten(0, 1), label_valid=labels.valid.flatten()))
    counts = torch.bincount(blocks.flatten(), minlength=table.vocab_size)
    return Analysis(Records.concat(parts), table, args.tau, teacher_name, counts, student.tokenizer)
