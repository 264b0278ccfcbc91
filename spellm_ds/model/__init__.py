"""Stage 2, the model: the charset, every token's spelling, the SpeLLM student and its
exported form, and decoding (no DeepSpeed here: inference imports only this and ``spellm_ds.hf``)."""
