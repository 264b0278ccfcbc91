"""What every stage runs on: distributed set-up, graceful shutdown, atomic
writes, provenance, progress and the choice of precision."""
