"""Stage 3, distillation: the run's options, the teacher and its cache, losses, metrics,
the two DeepSpeed engines, checkpoints, and the recipe that composes them with export (``train``)."""
