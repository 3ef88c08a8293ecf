"""The first-step watch: lines while the first step runs (with the kernel cache's entry count), its duration
once done, nothing after that, nothing from a disabled watch, and no thread left when the loop fails."""

import threading
import time

import pytest

from flame_gin import first_step
from flame_gin import loop as loop_lib


def _watch_threads():
    return [t for t in threading.enumerate() if t.name == "first-step-watch"]


def test_lines_while_running_then_the_duration_then_silence(tmp_path):
    for i in range(3):
        (tmp_path / f"entry{i}").mkdir()
    lines = []
    watch = first_step.Watch(interval_s=0.02, cache_dir=lambda: str(tmp_path), log=lines.append)
    watch.start()
    time.sleep(0.2)
    seconds = watch.stop(completed=True)
    assert seconds is not None and seconds >= 0.2
    beats, last = lines[:-1], lines[-1]  # no choices in the folder: no hint after the duration
    assert len(beats) >= 3, lines
    assert all(b.startswith("first step still running after ") for b in beats)
    assert all(b.endswith("the kernel cache holds 3 entries") for b in beats)
    assert last == f"first step done in {seconds:.1f} s"
    time.sleep(0.1)
    assert len(lines) == len(beats) + 1 and not _watch_threads()  # stopped for good
    assert watch.stop(completed=True) is None and len(lines) == len(beats) + 1  # a second stop logs nothing


@pytest.mark.parametrize("slow", [True, False])
def test_a_slow_first_step_names_the_binding_that_reuses_its_choices(tmp_path, slow):
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "chunk_gla_fwd_kernel_o.autotune.json").write_text("{}")
    lines = []
    watch = first_step.Watch(interval_s=0.05 if slow else 60.0, cache_dir=lambda: str(tmp_path), log=lines.append)
    watch.start()
    time.sleep(0.1)
    watch.stop(completed=True)
    hint = f"--gin.flame_gin.run.kernel_choices_from={tmp_path}"
    assert lines[-1].endswith(hint) == slow, lines  # a quick first step (a warm cache) has nothing to save
    assert sum(hint in line for line in lines) == int(slow)


def test_no_cache_folder_is_not_mentioned_and_a_disabled_watch_is_silent(tmp_path):
    lines = []
    watch = first_step.Watch(interval_s=0.01, cache_dir=lambda: str(tmp_path / "absent"), log=lines.append)
    watch.start()
    time.sleep(0.05)
    watch.stop(completed=False)
    assert lines and all("still running" in line and "kernel cache" not in line for line in lines)
    quiet = []
    other_rank = first_step.Watch(enabled=False, interval_s=0.01, log=quiet.append)
    other_rank.start()
    assert not _watch_threads()
    time.sleep(0.05)
    assert other_rank.stop(completed=True) is None and quiet == []


@pytest.fixture
def slow_first_step(monkeypatch):
    """The loop's first step takes 0.3 s (a cold GPU takes minutes); the watch beats every 0.05 s."""
    monkeypatch.setattr(first_step, "INTERVAL_S", 0.05)
    original = loop_lib.Loop.train_step

    def train_step(self):
        if self.state.step == 0:
            time.sleep(0.3)
        return original(self)

    monkeypatch.setattr(loop_lib.Loop, "train_step", train_step)


def test_a_run_logs_while_its_first_step_runs_and_then_its_duration(tmp_path, train_tiny, slow_first_step, caplog):
    caplog.set_level("INFO")
    train_tiny(tmp_path / "run", steps=3)
    messages = [r.getMessage() for r in caplog.records]
    beats = [i for i, m in enumerate(messages) if m.startswith("first step still running after")]
    done = [i for i, m in enumerate(messages) if m.startswith("first step done in ")]
    assert len(done) == 1 and len(beats) >= 2, messages
    assert max(beats) < done[0]  # nothing after the first step ended
    assert float(messages[done[0]].split()[4]) >= 0.3
    assert not _watch_threads()


def test_a_first_step_that_fails_leaves_no_watch_running(tmp_path, train_tiny, monkeypatch):
    def fail(self):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(loop_lib.Loop, "train_step", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        train_tiny(tmp_path / "run", steps=3)
    assert not _watch_threads()
