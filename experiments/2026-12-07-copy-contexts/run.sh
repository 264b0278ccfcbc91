#!/usr/bin/env bash
# Issue 53 item 6: contexts where the teacher predicts rare words. First the measurement (does the
# teacher copy natural rare words from a list it has just read; what such text yields per token
# through the teacher), then a pilot whose training text is 20% such lists (of words drawn
# uniformly from the corpus's words), at the budget of every issue-53 pilot (../issue53-budget.sh);
# its teacher reads new blocks, so it cannot use the baseline's cache.
# Run from the repository root after `make setup`:  bash experiments/2026-12-07-copy-contexts/run.sh
source experiments/issue53-budget.sh
HERE=$(dirname "$0")
PYTHONPATH=. .venv/bin/python "$HERE/copy_rate.py" "$OUT/base/model" "$OUT/base"
PYTHONPATH=. .venv/bin/python "$HERE/build_mix.py" runs/copy/mix.jsonl
pilots "$HERE" --pilot copy20="$BUDGET --data runs/copy/mix.jsonl"
# the dose (40% of the corpus's tokens as lists) and the library option (--copy_lists 0.25: a quarter
# of every run's blocks, as copy20's first blocks held), each scored against the same baseline
PYTHONPATH=. .venv/bin/python "$HERE/build_mix.py" runs/copy/mix40.jsonl --share 0.4
TABLE=pilots-copy40 pilots "$HERE" --pilot copy40="$BUDGET --data runs/copy/mix40.jsonl"
PYTHONPATH=. .venv/bin/python "$HERE/composition.py" runs/copy/mix.jsonl runs/copy/mix40.jsonl
TABLE=pilots-lists25 pilots "$HERE" --pilot lists25="$BUDGET --copy_lists 0.25"
