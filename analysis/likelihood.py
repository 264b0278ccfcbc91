"""Next-token likelihood of held-out text, against the teacher's: what loglikelihood benchmarks score.

Multiple-choice tasks (PIQA, OpenBookQA, ...) compare the summed log-probs of whole
continuations, so a converted model must give the text's actual next token the probability its
teacher gives, not only agree on the argmax. Per position, the NLL (nats) of the next token under:

- the teacher;
- SpeLLM at ``tau``: the char heads' token distribution where they decide, the student's LM head
  where they fall back (what ``launch/evaluate.py`` scores); with ``--rerank_k K`` or
  ``--shortlist U`` the heads' is the re-ranked one (their mass of the candidates shared by the LM
  head's softmax);
- the char heads everywhere, and the LM head everywhere (the fallback ceiling).

Each is compared with the teacher as a paired mean difference with a 95% interval, also over a
sweep of ``tau`` and at the taus that send 80/90/95% of the positions to the LM head. At the
positions the heads decide: how often the next token is the heads' own token, and the median gap
to the teacher where it is not (a confident factorised spelling leaves little mass for any other
token). Positions whose next token has no spelling (probability 0 under the heads) are counted and
left out of every mean.

    python -m analysis.likelihood --model DIR [--data FILE] [--max_tokens N] [--tau 0.22] --out likelihood.json
"""

from __future__ import annotations

import argparse

import torch

from analysis.collect import Analysis
from analysis.common import fallback_mask, paired_difference, run_cli
from spellm_ds import cli

SWEEP_TAUS = (0.5, 0.22, 0.1, 0.07, 0.05, 0.03)
MATCHED_FALLBACK_RATES = (0.8, 0.9, 0.95)
"""Models (pilots) fall back at different rates at one tau, and the gap shrinks as the rate grows:
compare them at the same rate too."""


def scored_positions(analysis: Analysis) -> torch.Tensor:
    """Positions with a next token in their block that the char heads can spell."""
    r = analysis.records
    return (r.next_ids >= 0) & r.heads_next_logp.isfinite()


def tau_for_fallback_rate(analysis: Analysis, rate: float) -> float:
    """The threshold at which about ``rate`` of the scored positions fall back (an entropy quantile)."""
    entropy = analysis.records.student_entropy[scored_positions(analysis)]
    return float(torch.quantile(entropy.double(), 1 - rate))


def spellm_nll(analysis: Analysis, tau: float | None) -> torch.Tensor:
    """Per-position NLL of the next token under SpeLLM at ``tau``; NaN where not scored."""
    r = analysis.records
    logp = torch.where(fallback_mask(analysis, tau), r.lm_next_logp, r.heads_next_logp)
    return (-logp).masked_fill(~scored_positions(analysis), float("nan"))


def compute(analysis: Analysis, args: argparse.Namespace | None = None) -> dict:
    r = analysis.records
    has_next, scored = r.next_ids >= 0, scored_positions(analysis)

    def nll(logp: torch.Tensor) -> torch.Tensor:
        return (-logp).masked_fill(~scored, float("nan"))

    teacher = nll(r.teacher_next_logp)

    def versus_teacher(values: torch.Tensor) -> dict:
        return {"nll": float(values.nanmean()), "vs_teacher": paired_difference(values, teacher, analysis.blocks())}

    def at_tau(tau: float | None) -> dict:
        return {"tau": tau, "fallback_rate": float(fallback_mask(analysis, tau)[scored].double().mean()),
                **versus_teacher(spellm_nll(analysis, tau))}

    def mean(values: torch.Tensor) -> float | None:
        return float(values.double().mean()) if len(values) else None

    decided = scored & ~fallback_mask(analysis, analysis.tau)
    own = r.autocorrected == r.next_ids
    gap = (-r.heads_next_logp + r.teacher_next_logp)[decided & ~own]
    return {
        "teacher": analysis.teacher, "positions": int(has_next.sum()), "scored": int(scored.sum()),
        "unspellable_next": int((has_next & ~scored).sum()), "teacher_nll": float(teacher.nanmean()),
        "spellm": at_tau(analysis.tau),
        "heads_everywhere": versus_teacher(nll(r.heads_next_logp)),
        "lm_head_everywhere": versus_teacher(nll(r.lm_next_logp)),
        "heads_decide": {
            "positions": int(decided.sum()),
            "next_is_heads_token": mean(own[decided]), "teacher_nll": mean(-r.teacher_next_logp[decided]),
            "heads_nll": mean(-r.heads_next_logp[decided]),
            "median_gap_elsewhere": float(gap.median()) if len(gap) else None},
        "tau_sweep": [at_tau(tau) for tau in sorted({*SWEEP_TAUS, analysis.tau} - {None}, reverse=True)],
        "at_fallback_rates": [{"target": rate, **at_tau(tau_for_fallback_rate(analysis, rate))}
                              for rate in MATCHED_FALLBACK_RATES],
    }


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute))
