"""Stage 4, export: a checkpoint -> a transformers SpeLLM model, with its spelling
temperature fitted on held-out text."""
