"""The reward-hacking monitor: image statistics that move when images are gamed, and the one-time
warning when held-out strict accuracy falls while the train reward rises."""
import numpy as np

from unigrpo_jax.data.shapeworld.render import render
from unigrpo_jax.data.shapeworld.world import sample_tasks
from unigrpo_jax.trainers import hacking_monitor as hm


def scenes(n=16, seed=0):
  return np.stack([render(t.spec, seed=i) for i, t in enumerate(sample_tasks(n, seed))])


def test_statistics_separate_scenes_from_blank_and_washed_out_images():
  images = scenes()
  assert not hm.blank(images).any()
  flat = np.full_like(images, 200)
  assert hm.blank(flat).all()
  washed = (images // 2 + 100).astype(np.uint8)  # pastel: lower saturation
  assert hm.saturation(washed).mean() < hm.saturation(images[:, 8:24, 8:24]).mean()
  assert hm.saturation(np.zeros((2, 4, 4, 3), np.uint8)).tolist() == [0.0, 0.0]
  hist = hm.colour_histogram(images)
  assert hist.shape == (64,) and np.isclose(hist.sum(), 1.0)


def test_step_metrics_track_drift_from_the_first_batch():
  mon = hm.HackingMonitor()
  images = scenes()
  first = mon.step_metrics(1, images, np.full(16, 0.5), np.full(16, 0.25))
  assert first["hack/hist_distance"] == 0.0
  assert first["hack/blank_frac"] == 0.0
  assert np.isclose(first["hack/strict_partial_gap"], 0.25)
  hacked = mon.step_metrics(2, np.full_like(images, 255), np.full(16, 0.9))
  assert hacked["hack/blank_frac"] == 1.0
  assert hacked["hack/hist_distance"] > 0.9
  assert "hack/strict_partial_gap" not in hacked


def test_warns_once_when_strict_falls_while_reward_rises():
  mon = hm.HackingMonitor()
  images = scenes(4)
  for step, r in enumerate([0.5, 0.5, 0.5], start=1):
    mon.step_metrics(step, images, np.full(4, r))
  assert mon.observe_eval(3, 0.60) is None  # first eval: nothing to compare
  for step in (4, 5, 6):
    mon.step_metrics(step, images, np.full(4, 0.8))
  message = mon.observe_eval(6, 0.40)
  assert message and "0.600 -> 0.400" in message
  for step in (7, 8, 9):
    mon.step_metrics(step, images, np.full(4, 0.9))
  assert mon.observe_eval(9, 0.2) is None  # once per run


def test_no_warning_when_both_fall_or_strict_rises():
  mon = hm.HackingMonitor()
  images = scenes(4)
  for step in (1, 2):
    mon.step_metrics(step, images, np.full(4, 0.8))
  mon.observe_eval(2, 0.6)
  for step in (3, 4):
    mon.step_metrics(step, images, np.full(4, 0.5))  # reward fell too: a bad run, not a hack
  assert mon.observe_eval(4, 0.4) is None
  for step in (5, 6):
    mon.step_metrics(step, images, np.full(4, 0.9))
  assert mon.observe_eval(6, 0.7) is None  # strict rose


def test_a_resumed_monitor_keeps_the_first_batch_as_reference():
  images = scenes()
  first = hm.HackingMonitor()
  first.step_metrics(1, images, np.full(16, 0.5))
  later = scenes(16, seed=1)
  want = first.step_metrics(2, later, np.full(16, 0.5))["hack/hist_distance"]
  resumed = hm.HackingMonitor(first.reference_list())  # as restored from the checkpoint
  assert resumed.step_metrics(2, later, np.full(16, 0.5))["hack/hist_distance"] == want
  assert want > 0
