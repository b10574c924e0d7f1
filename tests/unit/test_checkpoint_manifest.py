"""Checkpoints verified before they are trusted: a manifest of files and sizes written last, the newest usable
iteration found by walking back past damaged ones, one clear error when none is usable."""
import pytest

from megatron_spark.checkpoint import usable_step
from megatron_spark.io.checkpoint_layout import MANIFEST, check_iteration, complete_steps, iter_dir, write_manifest


def make(root, step, tracker=True):
    d = iter_dir(root, step)
    (d / "rng").mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x" * 100)
    (d / "common.pt").write_bytes(b"y" * 10)
    (d / ".metadata").write_bytes(b"z")
    (d / "rng" / "rank_0.pt").write_bytes(b"r" * 5)
    write_manifest(d)
    if tracker:
        (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return d


def test_a_written_checkpoint_checks_out_and_damage_is_named(tmp_path):
    d = make(tmp_path, 4)
    assert check_iteration(d) is None and (d / MANIFEST).is_file()
    (d / "__0_0.distcp").write_bytes(b"x" * 50)
    assert check_iteration(d) == "__0_0.distcp is 50 bytes, 100 when written"
    (d / "rng" / "rank_0.pt").unlink()
    assert check_iteration(d) in ("__0_0.distcp is 50 bytes, 100 when written", "rng/rank_0.pt is missing")
    (d / MANIFEST).write_text("{not json")
    assert check_iteration(d).startswith(f"{MANIFEST} is unreadable")


def test_the_newest_usable_iteration_is_found_past_damaged_ones(tmp_path, capsys):
    make(tmp_path, 2)
    make(tmp_path, 4)
    make(tmp_path, 6)
    assert complete_steps(tmp_path) == [6, 4, 2]
    assert usable_step(tmp_path, say=True) == 6
    (iter_dir(tmp_path, 6) / "common.pt").unlink()
    (iter_dir(tmp_path, 4) / "__0_0.distcp").write_bytes(b"")
    assert usable_step(tmp_path, say=True) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"checkpoint {iter_dir(tmp_path, 6)} is damaged: common.pt is missing; trying the previous one",
                   f"checkpoint {iter_dir(tmp_path, 4)} is damaged: __0_0.distcp is 0 bytes, 100 when written; "
                   f"trying the previous one"]
    assert usable_step(tmp_path, say=False) == 2 and capsys.readouterr().out == ""  # quiet off the writing rank


def test_no_usable_checkpoint_is_an_error_naming_the_directory_and_the_fix(tmp_path):
    assert usable_step(tmp_path, say=True) is None  # an empty directory: start from the model
    make(tmp_path, 2)
    (iter_dir(tmp_path, 2) / "__0_0.distcp").unlink()
    with pytest.raises(ValueError, match=r"'checkpoint.dir': no usable checkpoint in '.*' \(iter_0000002 "
                                         r"\(__0_0.distcp is missing\)\); move the directory away"):
        usable_step(tmp_path, say=True)


def test_an_unfinished_save_is_not_a_candidate(tmp_path):
    """A save that died before the rename leaves iter_X.tmp: never a candidate; the tracker still names the last
    complete one."""
    make(tmp_path, 2)
    (tmp_path / "iter_0000004.tmp").mkdir()
    assert complete_steps(tmp_path) == [2] and usable_step(tmp_path, say=False) == 2
