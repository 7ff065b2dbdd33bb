"""Grain data sources and a checkpointable prompt loader.

Train/test split (disjoint by construction): a task belongs to the split chosen by a
stable SHA-256 hash of its prompt text (TEST_PERCENT % of prompts are test). Task i of a
split is the first candidate, drawn from seeds (split, i, attempt), whose prompt hashes
into that split. Since the split is a function of the prompt, no test prompt can appear
in train. Scenes may repeat across splits under different phrasings (e.g. "draw a red
circle" vs "a picture of a red circle"); the test split measures generalisation to
unseen prompts, including unseen arithmetic / knowledge / description combinations.

Records are dicts: prompt (str), reasoning (str), spec (JSON str, Spec.to_json),
category (str), index (int).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import grain
import numpy as np

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data import geneval
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax import paths
from unigrpo_jax.paths import resolve_path  # package:// -> shipped assets
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer

SPLITS = ("train", "test")
TEST_PERCENT = 15
_SEED_SALT = 0x5A17  # keeps these seeds apart from sample_tasks(n, seed) streams


def normalize_prompt(prompt: str) -> str:
  """Lowercased, whitespace-collapsed prompt: two prompts are "the same" iff these are equal."""
  return " ".join(prompt.lower().split())


def split_of_prompt(prompt: str) -> str:
  """'test' or 'train', a stable function of the (whitespace-normalised) prompt."""
  norm = normalize_prompt(prompt).encode()
  bucket = int.from_bytes(hashlib.sha256(norm).digest()[:8], "big") % 100
  return "test" if bucket < TEST_PERCENT else "train"


def task_for(split: str, index: int) -> sw.Task:
  """Deterministic task `index` of `split`."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  for attempt in range(10_000):
    rng = np.random.default_rng([_SEED_SALT, SPLITS.index(split), index, attempt])
    task = sw.sample_task(rng)
    if split_of_prompt(task.prompt) == split:
      return task
  raise RuntimeError("no task found for split")  # pragma: no cover


def task_record(task: sw.Task, index: int) -> dict:
  return {"prompt": task.prompt, "reasoning": task.reasoning, "spec": task.spec.to_json(),
          "category": task.category, "index": int(index)}


class ShapeWorldSource:
  """grain RandomAccessDataSource of `num_tasks` procedurally generated tasks."""

  def __init__(self, split: str, num_tasks: int):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if num_tasks <= 0:
      raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    self.split, self.num_tasks = split, int(num_tasks)

  def __len__(self) -> int:
    return self.num_tasks

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_tasks:
      raise IndexError(f"index {index} out of range for {self.num_tasks} tasks")
    return task_record(task_for(self.split, index), index)

  def __repr__(self) -> str:
    return f"ShapeWorldSource(split={self.split!r}, num_tasks={self.num_tasks})"


class PromptFileSource:
  """User prompts, one per line, validated up front.

  A line is either a JSON object {"prompt": str, "spec": {...}, optional "reasoning",
  "category"}, a JSON object without a spec carrying metadata for a reward (GenEval's
  {"tag", "include", ..., "prompt"} lines, whose tag becomes the category, or {"prompt",
  "metadata": {...}, optional "category"}), or plain prompt text in the explicit prompt grammar
  (shapeworld.parse_prompt), whose spec is then parsed. Empty lines, unknown words, bad specs,
  bad GenEval metadata and unparseable plain prompts raise ValueError naming the line number.
  ``package://geneval/evaluation_metadata.jsonl`` is GenEval's 553 prompts.

  free_text: plain lines outside the prompt grammar are kept with no spec (record ``spec`` and
  ``reasoning`` are ""): the real-model path, whose rewards read pixels, not specs.

  Records: prompt, reasoning ("" without a spec), spec (JSON, "" without one), category,
  index, metadata (JSON object text, "" without any).
  """

  def __init__(self, path: str | os.PathLike, tokenizer: Optional[Tokenizer] = None, *,
               free_text: bool = False):
    self.path = resolve_path(os.fspath(path)) if os.fspath(path).startswith("package://") \
        else os.fspath(path)  # gs:// prompt files are read through unigrpo_jax.paths
    self.free_text = free_text
    tok = tokenizer or shapeworld_tokenizer()
    lines = paths.read_text(self.path).splitlines()
    if not lines:
      raise ValueError(f"{self.path}: no prompts")
    self._records = [self._parse_line(line, n, tok) for n, line in enumerate(lines, start=1)]

  def _parse_line(self, line: str, lineno: int, tok: Tokenizer) -> dict:
    where = f"{self.path}, line {lineno}"
    if not line.strip():
      raise ValueError(f"{where}: empty line")
    category = "custom"
    reasoning, metadata = None, None
    if line.lstrip().startswith("{"):
      try:
        d = json.loads(line)
        prompt = d["prompt"]
        spec = sw.Spec.from_dict(d["spec"]) if "spec" in d else None
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad JSON prompt line ({e!r})") from None
      reasoning, category = d.get("reasoning"), d.get("category", category)
      if spec is None:  # a prompt for rewards that read metadata, not a ShapeWorld scene
        metadata = _line_metadata(d, where)
        category = d.get("category", metadata.get("tag", category))
    else:
      prompt, spec = line.strip(), None
    for field, text in (("prompt", prompt), ("reasoning", reasoning)):
      if text is None:
        continue
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty {field}")
      try:
        tok.encode(text)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if metadata is not None:
      return {"prompt": prompt, "reasoning": reasoning or "", "spec": "",
              "category": str(category), "index": lineno - 1,
              "metadata": json.dumps(metadata, sort_keys=True)}
    if spec is None:
      try:
        spec = sw.parse_prompt(prompt)
      except ValueError:
        if self.free_text:
          return {"prompt": prompt, "reasoning": "", "spec": "", "category": category,
                  "index": lineno - 1, "metadata": ""}
        raise ValueError(f"{where}: plain prompt {prompt!r} is not in the explicit prompt "
                         "grammar; give it as a JSON line with a spec") from None
    if reasoning is None:
      reasoning = f"{sw.SCENE_PREFIX} {sw.describe(spec)}"
    return {"prompt": prompt, "reasoning": reasoning, "spec": spec.to_json(),
            "category": str(category), "index": lineno - 1, "metadata": ""}

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return dict(self._records[index])

  def __repr__(self) -> str:
    return f"PromptFileSource({self.path!r}, n={len(self)})"


def _line_metadata(d: dict, where: str) -> dict:
  """The metadata of a spec-less JSON prompt line: its "metadata" object, or the line itself
  when it is a GenEval line (has "tag" and "include"; validated)."""
  if "metadata" in d:
    if not isinstance(d["metadata"], dict):
      raise ValueError(f"{where}: 'metadata' must be a JSON object")
    m = d["metadata"]
  elif geneval.is_geneval(d):
    m = {k: v for k, v in d.items() if k not in ("reasoning", "category")}
  else:
    raise ValueError(f"{where}: a JSON prompt line needs a 'spec', a 'metadata' object, or "
                     "GenEval's 'tag' and 'include'")
  if geneval.is_geneval(m):
    geneval.validate_metadata(m, where)
  return m


def collate(records: Sequence[dict]) -> dict:
  """Batch of records -> dict of lists (strings) and int64 [B] `index`."""
  out = {k: [r[k] for r in records] for k in records[0]}
  if "index" in out:
    out["index"] = np.asarray(out["index"], np.int64)
  return out


# Prompts are cheap to make and a step consumes a handful: read them on demand (grain's default
# of 16 threads prefetching 500 elements would read hundreds of records ahead and compete with
# XLA for the host's cores).
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def make_prompt_loader(source, batch_size: int, seed: int, shuffle: bool = True,
                       num_epochs: Optional[int] = None, drop_remainder: bool = False,
                       shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """grain IterDataset of batches (see `collate`); `iter(loader)` has get_state/set_state.

  Shuffling reshuffles every epoch (grain's MapDataset.shuffle is epoch aware);
  num_epochs=None repeats forever.

  Sharding (one shard per process): ``batch_size`` is the GLOBAL batch. Shard ``i`` of ``n``
  yields, for every global batch, its i-th block of ``batch_size // n`` records, so the n
  shards' batches concatenated in shard order are exactly the one-shard batches (same records,
  same order), and each shard reads only its own records (grain's MapDataset is lazy). Only
  whole global batches are produced (a trailing partial one is dropped).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"global batch {batch_size} cannot be split evenly over {shard_count} "
                     "shards (processes)")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs is None or num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if shard_count == 1:
    return ds.batch(batch_size, drop_remainder=drop_remainder,
                    batch_fn=collate).to_iter_dataset(_READ_OPTIONS)
  # Blocks of the global record stream: block k is shard (k % n)'s part of global batch k // n.
  ds = ds.batch(batch_size // shard_count, drop_remainder=True, batch_fn=collate)
  ds = ds[:len(ds) - len(ds) % shard_count]
  return ds[shard_index::shard_count].to_iter_dataset(_READ_OPTIONS)
