"""GenEval metadata: validation, ShapeWorld -> GenEval mapping, per-category accuracy.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval, MIT) describes a prompt by a JSON
object: ``tag`` (its category), ``include`` (objects that must be present: ``class``, ``count``,
optional ``color``, optional ``position: [relation, index of the reference object]``) and
optional ``exclude``. Its 553 prompts ship as ``package://geneval/evaluation_metadata.jsonl``
(usable as ``config.data.prompt_file``).

The ``geneval`` remote reward (``rewards.remote``, kind ``geneval``) sends each image with this
metadata to a GenEval-detector server over ``rewards.protocol``. ShapeWorld prompts get the
same metadata derived from their spec (``from_shapeworld``), so a ShapeWorld run can be scored
and reported in GenEval's categories too.
"""
from __future__ import annotations

import collections
import json
from typing import Optional, Sequence

import numpy as np

from unigrpo_jax.data.shapeworld import world as sw

PROMPT_FILE = "package://geneval/evaluation_metadata.jsonl"
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

# ShapeWorld's explicit categories are GenEval's, renamed. Its reasoning-required categories
# are mapped by the structure of their scene (geneval_tag).
SHAPEWORLD_CATEGORY = {"single_object": "single_object", "two_objects": "two_object",
                       "counting": "counting", "colors": "colors", "position": "position",
                       "attribute_binding": "color_attr"}


def validate_metadata(m, where: str) -> dict:
  """A GenEval metadata object, checked; ValueError naming ``where`` and the field."""
  if not isinstance(m, dict):
    raise ValueError(f"{where}: GenEval metadata must be a JSON object")
  if m.get("tag") not in CATEGORIES:
    raise ValueError(f"{where}: tag {m.get('tag')!r} is not one of {CATEGORIES}")
  for key in ("include", "exclude"):
    objs = m.get(key, [])
    if key == "include" and (not isinstance(objs, list) or not objs):
      raise ValueError(f"{where}: 'include' must be a non-empty list of objects")
    if not isinstance(objs, list):
      raise ValueError(f"{where}: {key!r} must be a list")
    for j, o in enumerate(objs):
      w = f"{where}: {key}[{j}]"
      if not isinstance(o, dict) or not isinstance(o.get("class"), str) or not o["class"]:
        raise ValueError(f"{w} needs a 'class' string")
      if not isinstance(o.get("count"), int) or o["count"] < 1:
        raise ValueError(f"{w}: count must be a positive integer, got {o.get('count')!r}")
      if "color" in o and not isinstance(o["color"], str):
        raise ValueError(f"{w}: color must be a string")
      if "position" in o:
        p = o["position"]
        if (not isinstance(p, list) or len(p) != 2 or p[0] not in RELATIONS
            or not isinstance(p[1], int) or not 0 <= p[1] < len(m["include"]) or p[1] == j):
          raise ValueError(f"{w}: position must be [relation in {RELATIONS}, index of another "
                           f"included object], got {p!r}")
  return m


def is_geneval(m) -> bool:
  return isinstance(m, dict) and "tag" in m and "include" in m


def geneval_tag(spec: sw.Spec) -> str:
  """The GenEval category a ShapeWorld scene tests, from its structure."""
  if spec.relation is not None:
    return "position"
  if len(spec.objects) == 2:
    return "color_attr" if all(o.color for o in spec.objects) else "two_object"
  o = spec.objects[0]
  if o.count > 1:
    return "counting"
  return "colors" if o.color else "single_object"


def shapeworld_geneval_category(category: str, spec: sw.Spec) -> str:
  """ShapeWorld task category -> GenEval category (explicit ones by name)."""
  return SHAPEWORLD_CATEGORY.get(category) or geneval_tag(spec)


def from_shapeworld(spec: sw.Spec, prompt: str, category: Optional[str] = None) -> dict:
  """GenEval metadata for a ShapeWorld scene. A relation 'A left of B' becomes B first and A
  with ``position: ["left of", 0]``, GenEval's convention."""
  objs = [{"class": o.shape, "count": o.count, **({"color": o.color} if o.color else {})}
          for o in spec.objects]
  if spec.relation is not None:
    subject, reference = objs
    objs = [reference, {**subject, "position": [spec.relation, 0]}]
  tag = shapeworld_geneval_category(category, spec) if category else geneval_tag(spec)
  m = {"tag": tag, "include": objs, "prompt": prompt}
  if tag == "counting":  # GenEval checks "exactly n" with an exclude of n + 1
    m["exclude"] = [{"class": o["class"], "count": o["count"] + 1} for o in objs]
  return m


def batch_metadata(specs: Sequence[Optional[sw.Spec]], metadata: Optional[Sequence],
                   prompts: Sequence[str], require_geneval: bool = False) -> list[dict]:
  """Per row: its metadata object (parsed if a JSON string); a ShapeWorld row gets its spec
  (``"spec"``) and the GenEval metadata derived from it. With ``require_geneval`` a row without
  GenEval metadata raises ValueError naming its prompt."""
  out = []
  for i, prompt in enumerate(prompts):
    m = metadata[i] if metadata is not None else None
    if isinstance(m, str):
      m = json.loads(m) if m else None
    m = dict(m) if m else {}
    spec = specs[i] if specs is not None else None
    if spec is not None:
      if not is_geneval(m):
        m.update(from_shapeworld(spec, prompt))
      m["spec"] = spec.to_dict()
    if require_geneval:
      validate_metadata(m, f"prompt {prompt!r} (row {i})")
    out.append(m)
  return out


def per_category_accuracy(categories: Sequence[str], correct: Sequence[float],
                          prefix: str = "eval/geneval/") -> dict[str, float]:
  """Mean of ``correct`` per category, plus GenEval's overall score: the mean of the
  per-category means (categories weigh equally, as in GenEval's summary)."""
  by_cat = collections.defaultdict(list)
  for c, v in zip(categories, correct, strict=True):
    by_cat[c].append(float(v))
  out = {f"{prefix}{c}": float(np.mean(v)) for c, v in sorted(by_cat.items())}
  if by_cat:
    out[f"{prefix}overall"] = float(np.mean([np.mean(v) for v in by_cat.values()]))
  return out
