"""wmss.io: atomic writes that clean up after a killed writer, and the per-directory run lock."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from wmss.io import DirectoryInUseError, atomic_write_json, directory_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "scores.json"
    orphan = tmp_path / f".scores.json.{_dead_pid()}.0123abcd.tmp"
    orphan.write_text("half a docum")
    alive = tmp_path / f".scores.json.{os.getppid()}.0123abcd.tmp"   # a writer still running
    alive.write_text("in progress")
    other = tmp_path / f".other.json.{_dead_pid()}.0123abcd.tmp"     # another file's business
    other.write_text("x")

    atomic_write_json(target, {"a": 1})

    assert target.read_text() == '{"a": 1}\n'
    assert not orphan.exists()
    assert alive.exists() and other.exists()


def _hold_lock(directory, ready, release):
    with directory_lock(directory, "test holder"):
        ready.set()
        release.wait(30)


def test_a_locked_directory_refuses_a_second_run_and_names_the_holder(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(DirectoryInUseError, match=rf"in use by another run \(test holder, "
                                                       rf"pid {holder.pid}"):
            with directory_lock(tmp_path, "second"):
                pytest.fail("entered a directory another process holds")
    finally:
        release.set()
        holder.join(30)
    with directory_lock(tmp_path, "after"):  # released once the holder is gone
        pass


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    script = ("import sys, time; from wmss.io import directory_lock\n"
              "with directory_lock(sys.argv[1], 'doomed'):\n"
              "    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUseError):
            with directory_lock(tmp_path, "second"):
                pass
    finally:
        child.kill()
        child.wait()
    with directory_lock(tmp_path, "after the kill"):
        pass


def test_one_process_cannot_hold_the_same_directory_twice(tmp_path):
    with directory_lock(tmp_path, "first"):
        with pytest.raises(DirectoryInUseError):
            with directory_lock(tmp_path, "nested"):
                pass
