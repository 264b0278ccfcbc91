"""Held-out agreement of the package's `--shortlist U` decoding (issues 53 and 57), one model, paired.

For each U: the char path's token (the shortlist's U tokens and the heads' own, the best by the LM
head) against the teacher's top-1 (exact + prefix, `analysis.collect` records) without fallback,
split by the teacher's top-1's training count (from the run's teacher cache) and spelling length;
the fallback the package's entropy rule needs for 95% and 98% agreement; and agreement with
fallback at tau 0.22. Every U is paired with U = 0 on the same positions, intervals clustered by block.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-08-shortlist-decoding/agreement.py MODEL_DIR \
        RUN_DIR/teacher_cache POSITIONS OUT.json [U ...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from analysis.collect import collect
from analysis.common import correct_flags, fallback_for_agreement, paired_difference, rate
from analysis.label_frequency import training_top1_counts
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of

TARGETS = (0.95, 0.98)
TAU = 0.22



def main(model: str, cache_dir: str, positions: int, out: str, sizes: list[int]) -> None:
    torch.set_num_threads(2)
    flags, result = {}, {"model": model, "positions": positions, "tau": TAU, "shortlists": {}}
    for size in sizes:
        analysis = collect(argparse.Namespace(model=model, data=None, text_field="text", teacher=None,
                                              max_tokens=positions, seq_len=256, batch_size=4, tau=None,
                                              rerank_k=0, shortlist=size))
        r, table, blocks = analysis.records, analysis.table, analysis.blocks()
        right = correct_flags(analysis, "autocorrect")["exact_or_prefix"]
        with_fallback = correct_flags(analysis, "autocorrect_fallback", TAU)["exact_or_prefix"]
        flags[size] = right
        top1 = r.top_ids[:, 0]
        counts = training_top1_counts(Path(cache_dir), table.vocab_size)
        band, length = group_of(counts[top1], BAND_EDGES), group_of(table.lengths[top1], LENGTH_EDGES)
        result["shortlists"][size] = {
            "agreement": rate(right, blocks),
            "vs_no_shortlist": paired_difference(right.double(), flags[sizes[0]].double(), blocks),
            "by_band": {group_name(BAND_EDGES, b): rate(right[band == b])["rate"] for b in range(len(BAND_EDGES))
                        if (band == b).any()},
            "by_length": {group_name(LENGTH_EDGES, b): rate(right[length == b])["rate"]
                          for b in range(len(LENGTH_EDGES)) if (length == b).any()},
            **{f"fallback_for_{t:.0%}": round(fallback_for_agreement(r.student_entropy, right, t), 4) for t in TARGETS},
            f"agreement_with_fallback_at_tau_{TAU}": rate(with_fallback, blocks)["rate"],
            f"fallback_rate_at_tau_{TAU}": rate(r.student_entropy >= TAU)["rate"],
        }
        row = result["shortlists"][size]
        print(f"U {size}: {row['agreement']['rate']:.4f}, fallback for 95% {row['fallback_for_95%']}, "
              f"98% {row['fallback_for_98%']}, by band {row['by_band']}", flush=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4],
         [int(u) for u in sys.argv[5:]] or [0, 250, 1000, 2000])
