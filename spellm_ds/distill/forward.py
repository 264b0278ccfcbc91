"""One teacher-and-student forward: the teacher's signal, the student's outputs and the labels.

The analysis modules call :func:`teacher_and_student`; training calls :func:`student_and_labels`
on the teacher's output, computed or read from the teacher cache. So they agree on the shared
trunk, the label rule and the positions scored.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from spellm_ds.distill.losses import TOP_K, LabelRule, Labels, choose_labels
from spellm_ds.distill.teacher import TeacherSignal, teacher_signal
from spellm_ds.hf import SpeLLMForCausalLM
from spellm_ds.model.spelling import SpellingTable
from spellm_ds.model.spellm import SpeLLMOutput, spellm_outputs


def synchronized_clock() -> float:
    """``perf_counter`` after the accelerator finished its queued work, so a timed region holds
    the kernels it launched (a no-op wait on CPU)."""
    import deepspeed

    deepspeed.get_accelerator().synchronize()
    return time.perf_counter()


class PairedForward(NamedTuple):
    signal: TeacherSignal
    student: SpeLLMOutput
    labels: Labels


def student_and_labels(student, input_ids: torch.Tensor, signal: TeacherSignal, trunk: torch.Tensor | None,
                       table: SpellingTable, label_rule: LabelRule,
                       with_token_logits: bool) -> tuple[SpeLLMOutput, Labels]:
    """The student's forward given the teacher's output (``signal``, and ``trunk``, the hidden state
    a shared-trunk student starts from, see :func:`spellm_ds.distill.teacher.teacher_signal`), and the labels.

    ``student`` is a :class:`~spellm_ds.model.spellm.Student`, its DeepSpeed engine, or an exported model.
    With ``trunk`` the student's frozen lower layers are not run: they are the teacher's. Without it
    the student runs from ``input_ids``.
    """
    if isinstance(student, SpeLLMForCausalLM):  # its own forward() is transformers' (token logits)
        out = spellm_outputs(student, input_ids, with_token_logits=with_token_logits, trunk_hidden=trunk)
    elif trunk is None:
        out = student(input_ids, with_token_logits=with_token_logits)
    else:
        out = student(trunk_hidden=trunk, with_token_logits=with_token_logits)
    return out, choose_labels(label_rule, out.char_logits, signal, table)


def teacher_and_student(teacher: torch.nn.Module, student, input_ids: torch.Tensor, table: SpellingTable,
                        label_rule: LabelRule, trunk_layer: int | None, with_token_logits: bool,
                        targets: torch.Tensor | None = None, wide_k: int | None = None) -> PairedForward:
    """Teacher then student forward; the same sequence on every rank (``wide_k``: the teacher's
    top-M for the soft targets as well, see :func:`spellm_ds.distill.teacher.top_tokens_from_hidden`;
    ``trunk_layer``: the shared trunk, see :func:`student_and_labels`)."""
    signal, trunk = teacher_signal(teacher, input_ids, top_k=TOP_K, trunk_layer=trunk_layer, targets=targets,
                                   wide_k=wide_k)
    out, labels = student_and_labels(student, input_ids, signal, trunk, table, label_rule, with_token_logits)
    return PairedForward(signal, out, labels)
