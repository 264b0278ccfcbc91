"""Writes a kill cannot leave half done, and nothing removed that a user did not ask to lose."""

import json
import os

import pytest

from spellm_ds.distill.teacher_cache import FINGERPRINT, TeacherCache
from spellm_ds.runtime.atomic import recover_dir, replace_dir, replace_file, set_aside, staging_dir


def written(directory, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights").write_text(text)
    return directory


def test_a_directory_is_swapped_in_whole_and_a_kill_between_the_renames_is_undone(tmp_path):
    target = written(tmp_path / "model", "old")
    replace_dir(written(staging_dir(target), "new"), target)
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # killed after the old one was renamed aside, before the new one was renamed in
    os.rename(target, tmp_path / f".model-old-{os.getpid()}")
    half = written(staging_dir(target), "half")
    assert not target.exists()
    recover_dir(target)
    assert (target / "weights").read_text() == "new"  # the last complete model is back
    assert not half.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # leftovers cleared
    recover_dir(tmp_path / "never-written")  # nothing to do, nothing fails


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    replace_file(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_set_aside_keeps_the_old_one(tmp_path):
    kept = set_aside(written(tmp_path / "run", "x"), "replaced")
    assert kept.name.startswith("run.replaced-") and (kept / "weights").read_text() == "x"


def test_a_teacher_cache_of_another_fingerprint_is_set_aside_not_deleted(tmp_path):
    first = TeacherCache(tmp_path / "teacher_cache", {"model_sha256": "a"})
    assert not first.prepare()
    (first.directory / "train" / "0.safetensors").write_bytes(b"hours of teacher compute")
    assert TeacherCache(first.directory, {"model_sha256": "a"}).prepare()  # the same fingerprint keeps it
    second = TeacherCache(first.directory, {"model_sha256": "b"})
    assert not second.prepare()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("teacher_cache.other-")]
    assert len(aside) == 1 and (aside[0] / "train" / "0.safetensors").read_bytes() == b"hours of teacher compute"
    assert json.loads((aside[0] / FINGERPRINT).read_text()) == {"model_sha256": "a"}
    assert json.loads((second.directory / FINGERPRINT).read_text()) == {"model_sha256": "b"}
    assert not list((second.directory / "train").iterdir())
    with pytest.raises(FileNotFoundError):
        (second.directory / "train" / "0.safetensors").read_bytes()
