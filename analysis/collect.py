"""One pass over held-out text: teacher and student forwards, kept as per-position records.

Every analysis module computes from these records, so ``analysis.report`` can run all of them
on a single pass (one teacher and one student forward per batch).

The teacher is the original model the SpeLLM directory records as its base (``teacher`` in its
``config.json``), not the student's modified layers; ``--teacher`` overrides it. The student's frozen
lower layers are the teacher's, so they run once (in the teacher) unless ``--teacher`` is given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from spellm_ds import cli
from spellm_ds.data import assets
from spellm_ds.data.packing import load_texts, pack
from spellm_ds.distill.forward import teacher_and_student
from spellm_ds.distill.losses import label_rule_of
from spellm_ds.errors import SpellmError
from spellm_ds.hf.char_decoding import read_string
from spellm_ds.model.spelling import SpellingTable
from spellm_ds.model.spellm import load, load_teacher, shared_trunk_layer


@dataclass
class Records:
    """Per-position columns (CPU tensors, N positions)."""

    top_ids: torch.Tensor  # [N, 5] teacher top-5
    top_probs: torch.Tensor  # [N, 5]
    teacher_entropy: torch.Tensor  # [N]
    raw_chars: torch.Tensor  # [N, k] the predicted string (argmax chars ended at the first END)
    hit: torch.Tensor  # [N] bool: raw string is a valid spelling
    autocorrected: torch.Tensor  # [N] the char path's token: lookup or AutoCorrect, or the re-ranked one
    fallback_token: torch.Tensor  # [N] the student's LM head argmax
    student_entropy: torch.Tensor  # [N] mean per-head entropy
    label_chars: torch.Tensor  # [N, k] selected label (by the rule the model was trained with)
    label_valid: torch.Tensor  # [N] bool
    next_ids: torch.Tensor  # [N] the text's next token (-1 at a block's last position)
    teacher_next_logp: torch.Tensor  # [N] its log-prob under the teacher
    heads_next_logp: torch.Tensor  # [N] under the char heads' token distribution (-inf: unspellable)
    lm_next_logp: torch.Tensor  # [N] under the student's LM head (what fallback scores with)

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
    parser.add_argument("--max_tokens", type=cli.positive_int, default=20000,
                        help="positions to analyse, rounded up to whole blocks (default: %(default)s)")
    parser.add_argument("--seq_len", type=cli.positive_int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=4, help="blocks per forward (default: %(default)s)")
    cli.add_tau_arg(parser)
    cli.add_rerank_arg(parser)
    cli.add_device_args(parser)


@dataclass
class Analysis:
    """What the modules need: the records, the spelling table and the settings."""

    records: Records
    table: SpellingTable
    tau: float
    rerank_k: int  # 0: the paper's char path; else its tokens were re-ranked by the LM head
    shortlist: int  # 0: none; else the LM head also scored that many frequent tokens
    teacher: str
    corpus_counts: torch.Tensor  # [V] token occurrences in the analysed text
    tokenizer: object
    seq_len: int  # the records are whole blocks of this many positions, in order

    def blocks(self) -> torch.Tensor:
        """Each record's block: the unit of independence of the analyses' intervals
        (:func:`analysis.common.rate`, :func:`analysis.common.paired_difference`)."""
        return torch.arange(len(self.records.top_ids)) // self.seq_len


def held_out_texts(data: list[str] | None, text_field: str) -> list[str]:
    """``data``'s documents, or by default the BoolQ dev passages (never in a default training run)."""
    return load_texts(data, text_field)["text"] if data else assets.held_out_texts()


def held_out_blocks(tokenizer, data: list[str] | None, text_field: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """``max_tokens`` positions (rounded up to whole blocks) of ``data`` or the BoolQ dev passages."""
    blocks = pack(held_out_texts(data, text_field), tokenizer, seq_len, max_blocks=-(-max_tokens // seq_len))
    if len(blocks) == 0:
        raise SpellmError(f"the text to analyse is shorter than one {seq_len}-token block; "
                          "lower --seq_len or add text")
    return blocks


@torch.no_grad()
def collect(args: argparse.Namespace) -> Analysis:
    device, dtype = getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
    shortlist = getattr(args, "shortlist", 0)
    student = load(args.model, dtype=dtype, device=device, shortlist=shortlist)
    teacher_name = args.teacher or student.config.teacher
    teacher = load_teacher(student, teacher_name)
    table = student.spelling
    decoder = student.char_decoder(args.tau, shortlist)  # with the model's spelling temperature
    lm_head = student.base.get_output_embeddings()
    blocks = held_out_blocks(student.tokenizer, args.data, args.text_field, args.seq_len, args.max_tokens)
    # The student's layers below the trainable ones are the recorded teacher's: share them,
    # unless another teacher was asked for.
    trunk_layer = None if args.teacher else shared_trunk_layer(student.base.config.num_hidden_layers,
                                                                 student.config.trainable_layers)
    parts = []
    for start in tqdm(range(0, len(blocks), args.batch_size), desc="analyse", disable=len(blocks) <= args.batch_size):
        batch = blocks[start : start + args.batch_size].to(device)
        next_ids = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -1)], 1)
        targets = next_ids.clamp(min=0)  # the last position's is scored, then masked by next_ids
        signal, out, labels = teacher_and_student(teacher, student, batch, table, label_rule_of(student.config),
                                                  trunk_layer, with_token_logits=True, targets=targets)
        char_logits = out.char_logits.flatten(0, 1)
        # with --rerank_k or --shortlist, the char path's token and next-token log-prob are the re-ranked ones
        proposal, heads_next_logp = decoder.propose_and_score(char_logits, targets.flatten(), args.rerank_k,
                                                              out.hidden.flatten(0, 1), lm_head)
        lm_logp = torch.log_softmax(out.token_logits.float(), -1)
        parts.append(Records(**{name: column.cpu() for name, column in dict(
            top_ids=signal.top_ids.flatten(0, 1), top_probs=signal.top_probs.flatten(0, 1),
            teacher_entropy=signal.entropy.flatten(), raw_chars=read_string(char_logits), hit=proposal.hit,
            autocorrected=proposal.token_ids, fallback_token=out.token_logits.flatten(0, 1).argmax(-1),
            student_entropy=proposal.entropy, label_chars=labels.chars.flatten(0, 1),
            label_valid=labels.valid.flatten(), next_ids=next_ids.flatten(),
            teacher_next_logp=signal.target_logp.flatten(),
            heads_next_logp=heads_next_logp,
            lm_next_logp=lm_logp.gather(-1, targets.unsqueeze(-1)).flatten()).items()}))
    counts = torch.bincount(blocks.flatten(), minlength=table.vocab_size)
    return Analysis(Records.concat(parts), table.to("cpu"), args.tau, args.rerank_k, shortlist, teacher_name, counts,
                    student.tokenizer, args.seq_len)
