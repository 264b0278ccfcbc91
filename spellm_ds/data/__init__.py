"""Stage 1, data: the embedded model and corpus, packing text into blocks, and overlap checks."""
