"""Restarting a run in the same workdir never writes a step twice, and a SIGTERM says what was
and was not saved.

A run that dies before its first checkpoint leaves metrics of steps 0..k and no checkpoint: the
restart rewrites those steps from step 0, so they leave the live metrics first (metrics.jsonl is
emptied, the dead attempt's TensorBoard event files go to ``abandoned_<UTC time>/``). A run that
resumes from a checkpoint at step k keeps steps 0..k only.
"""
import glob
import os
import time

from unigrpo_jax import distributed
from unigrpo_jax.trainers import metrics as metrics_lib
from unigrpo_jax.trainers.metrics import read_metrics, restart_metrics
from unigrpo_jax.trainers.unigrpo import preemption_line, run_train

from test_trainer import tiny_config


def _write_events(logdir, steps, tags=("train/loss",)):
  """A TensorBoard event file (tensorboard's own writer) with one scalar per tag and step."""
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  writer = EventFileWriter(str(logdir))
  for step in steps:
    values = [summary_pb2.Summary.Value(tag=t, simple_value=float(step)) for t in tags]
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                     summary=summary_pb2.Summary(value=values)))
  writer.close()
  return writer.get_logdir(), sorted(glob.glob(os.path.join(str(logdir), "events.out.*")))[-1]


def _summary_steps(path):
  """[(tag, step)] of every summary value in an event file, read with tensorboard's loader."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  return [(v.tag, e.step) for e in EventFileLoader(path).Load() for v in e.summary.value]


def _live_events(workdir):
  return sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents.*")))


def _write_rows(workdir, steps):
  with open(os.path.join(str(workdir), "metrics.jsonl"), "w") as f:
    f.writelines(f'{{"step": {s}, "train/loss": {s}.0}}\n' for s in steps)


def test_restart_without_a_checkpoint_starts_the_metrics_afresh(tmp_path):
  _write_rows(tmp_path, [0, 1, 2])
  _, events = _write_events(tmp_path, [0, 1, 2])
  line = restart_metrics(str(tmp_path), None)
  assert read_metrics(str(tmp_path)) == []
  assert _live_events(tmp_path) == []  # steps 0..2 are rewritten: no live copy is left
  abandoned = glob.glob(str(tmp_path / "abandoned_*"))
  assert len(abandoned) == 1
  moved = os.path.join(abandoned[0], os.path.basename(events))
  assert [s for _, s in _summary_steps(moved)] == [0, 1, 2]  # kept whole, for inspection
  assert line.startswith("no checkpoint") and abandoned[0] in line and "steps 0..2" in line
  # A second restart of an empty workdir has nothing to say and moves nothing.
  assert restart_metrics(str(tmp_path), None) is None
  assert len(glob.glob(str(tmp_path / "abandoned_*"))) == 1


def test_resume_keeps_the_steps_up_to_its_checkpoint(tmp_path):
  _write_rows(tmp_path, [0, 1, 2, 3])
  _, old = _write_events(tmp_path, [0, 1], tags=("a",))      # only steps <= 1: stays as is
  time.sleep(1.1)  # event file names carry the second they were made in
  _, new = _write_events(tmp_path, [2, 3], tags=("a", "b"))  # steps after the checkpoint
  with open(new, "ab") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00torn")  # a record cut short by the dying writer
  line = restart_metrics(str(tmp_path), 2)
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
  assert _live_events(tmp_path) == [old, new]
  assert _summary_steps(old) == [("a", 0), ("a", 1)]
  assert _summary_steps(new) == [("a", 2), ("b", 2)]  # step 3 left, the torn tail dropped
  (abandoned,) = glob.glob(str(tmp_path / "abandoned_*"))
  assert os.listdir(abandoned) == [os.path.basename(new)]
  assert [s for _, s in _summary_steps(os.path.join(abandoned, os.path.basename(new)))] == \
      [2, 2, 3, 3]
  assert line.startswith("resuming after step 2") and "steps 3..3" in line
  assert restart_metrics(str(tmp_path), 2) is None


def test_a_torn_last_metrics_line_is_dropped_on_restart(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "tr')
  restart_metrics(str(tmp_path), 1)
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1]


def test_preemption_line_says_what_was_saved():
  d = "/w/checkpoints"
  assert preemption_line(1, None, False, d) == (
      "SIGTERM: stopped at step 1 before its update; nothing was saved; a rerun starts from "
      "step 0")
  assert "saved step 4 to /w/checkpoints; a rerun resumes from step 4" in preemption_line(
      5, 4, True, d)
  assert "nothing new was saved (the checkpoint of step 4 is in /w/checkpoints)" in \
      preemption_line(5, 4, False, d)


def test_sigterm_before_the_first_update_then_a_rerun(tmp_path, monkeypatch, capsys):
  """A SIGTERM at step 1 between rollout and update (sync point 2): no checkpoint exists, and the
  console says so; the rerun starts at step 0 and writes every step, in metrics.jsonl and in the
  live TensorBoard files, exactly once."""
  workdir = str(tmp_path)
  config = tiny_config(1)
  config.tensorboard = True
  monkeypatch.setattr(distributed.PreemptionWatch, "reached", lambda self, sync_id: sync_id == 2)
  assert run_train(config, workdir)["step"] == 0
  out = capsys.readouterr().out
  assert ("SIGTERM: stopped at step 1 before its update; nothing was saved; a rerun starts "
          "from step 0") in out, out[-2000:]
  assert "is saved" not in out
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert not [s for s in os.listdir(ckpt_dir) if s.isdigit()] if os.path.isdir(ckpt_dir) else True
  assert [r["step"] for r in read_metrics(workdir)] == [0]
  first_events = _live_events(workdir)
  assert first_events and {s for p in first_events for _, s in _summary_steps(p)} == {0}

  monkeypatch.undo()
  time.sleep(1.1)  # a new event file name (names carry the second they were made in)
  run_train(config, workdir)
  out = capsys.readouterr().out
  assert "no checkpoint: starting afresh at step 0" in out, out[-2000:]
  assert [r["step"] for r in read_metrics(workdir)] == [0, 1]
  live = _live_events(workdir)
  assert not set(live) & set(first_events)
  pairs = [p for path in live for p in _summary_steps(path)]
  assert pairs and len(pairs) == len(set(pairs)), sorted(pairs)  # no (tag, step) twice
  assert {s for _, s in pairs} == {0, 1}
  (abandoned,) = glob.glob(os.path.join(workdir, "abandoned_*"))
  assert sorted(os.listdir(abandoned)) == sorted(os.path.basename(p) for p in first_events)


def test_event_records_reads_what_tensorboard_reads(tmp_path):
  _, path = _write_events(tmp_path, [0, 5, 7], tags=("x", "y"))
  steps = [s for s, _ in metrics_lib._event_records(path)]
  assert steps[0] == 0  # the file_version header
  assert [s for s in steps if s] == [5, 7]
  assert b"".join(raw for _, raw in metrics_lib._event_records(path)) == open(path, "rb").read()
