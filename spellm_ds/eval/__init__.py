"""Stage 5, evaluation: lm-evaluation-harness's SpeLLM model, the offline tasks and the paired
downstream comparison."""
