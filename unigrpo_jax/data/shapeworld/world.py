"""ShapeWorld: a tiny procedural reasoning-to-image world with a verifiable reward.

A scene (`Spec`) is one or two object groups (`Obj`: shape, optional color, count),
optionally with a spatial relation between group 0 (subject) and group 1.
A `Task` pairs a prompt with a reasoning trace whose final clause is the canonical
scene text (`describe`), e.g. "five minus three is two . the image shows two green
triangles left of one red square". About half the categories hide the answer behind
arithmetic (counts), world knowledge (colors) or descriptions (shapes), so the text
policy must reason before the image policy draws.

Invariants (the reward relies on them): the groups of a spec have distinct shapes,
counts are 1..4, total objects <= 5. `color=None` means "any color".
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Optional, Union

import numpy as np

from unigrpo_jax.data.tokenizer import Tokenizer, split_words

# Saturated, well-separated RGB values (min pairwise L2 distance ~ 100) on a black
# background; the reward segments pixels by nearest palette color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 230, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 240),
    "purple": (160, 50, 220),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_COUNT = 4
MAX_TOTAL = 5

CATEGORIES: tuple[str, ...] = (
    "single_object", "two_objects", "counting", "colors", "position", "attribute_binding",
    "reason_count", "reason_color", "reason_shape", "reason_compose",
)
REASONING_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if c.startswith("reason_"))
# Explicit categories 1/12 each, reasoning ones 1/8 each: half the tasks need reasoning.
_CATEGORY_P = np.array([1 / 12 if c not in REASONING_CATEGORIES else 1 / 8 for c in CATEGORIES])

PROMPT_PREFIXES: tuple[str, ...] = ("", "draw", "show", "generate", "a picture of", "an image of")
SCENE_PREFIX = "the image shows"  # reasoning traces end with SCENE_PREFIX + describe(spec)

# World knowledge for the reasoning-required color prompts ("a circle the color of grass").
COLOR_KNOWLEDGE: dict[str, tuple[str, ...]] = {
    "red": ("a tomato", "a strawberry", "blood"),
    "orange": ("a carrot", "a pumpkin", "a tangerine"),
    "yellow": ("a banana", "a lemon"),
    "green": ("grass", "a leaf", "a frog"),
    "blue": ("the sky", "the ocean"),
    "purple": ("an eggplant", "a plum", "lavender"),
}
# Descriptions for reasoning-required shapes: (singular, plural) noun phrases.
SHAPE_DESCRIPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "triangle": (("shape with three corners", "shapes with three corners"),
                 ("shape with three sides", "shapes with three sides")),
    "square": (("shape with four equal sides", "shapes with four equal sides"),
               ("shape with four corners", "shapes with four corners")),
    "circle": (("round shape", "round shapes"),
               ("shape with no corners", "shapes with no corners")),
}
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
# Words only the generator's fixed phrases use (enumerated for the tokenizer).
_TEMPLATE_WORDS = "a an and as many the color of is . , :"


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class Obj:
  """A group of `count` identical objects; color None = any color."""
  shape: str
  color: Optional[str] = None
  count: int = 1

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
    if self.color is not None and self.color not in COLORS:
      raise ValueError(f"unknown color {self.color!r}; known: {tuple(COLORS)}")
    if not isinstance(self.count, (int, np.integer)) or not 1 <= self.count <= MAX_COUNT:
      raise ValueError(f"count must be an int in 1..{MAX_COUNT}, got {self.count!r}")
    object.__setattr__(self, "count", int(self.count))

  def to_dict(self) -> dict:
    return {"shape": self.shape, "color": self.color, "count": self.count}


@dataclasses.dataclass(frozen=True)
class Spec:
  """A scene: 1-2 groups with distinct shapes; `relation` relates objects[0] to objects[1]."""
  objects: tuple[Obj, ...]
  relation: Optional[str] = None

  def __post_init__(self):
    objs = tuple(self.objects)
    object.__setattr__(self, "objects", objs)
    if not 1 <= len(objs) <= 2 or not all(isinstance(o, Obj) for o in objs):
      raise ValueError(f"a Spec needs 1 or 2 Obj, got {objs!r}")
    if len({o.shape for o in objs}) != len(objs):
      raise ValueError("the groups of a Spec must have distinct shapes")
    if sum(o.count for o in objs) > MAX_TOTAL:
      raise ValueError(f"at most {MAX_TOTAL} objects in a scene")
    if self.relation is not None:
      if self.relation not in RELATIONS:
        raise ValueError(f"unknown relation {self.relation!r}; known: {RELATIONS}")
      if len(objs) != 2:
        raise ValueError("a relation needs exactly two groups")

  def to_dict(self) -> dict:
    return {"objects": [o.to_dict() for o in self.objects], "relation": self.relation}

  @classmethod
  def from_dict(cls, d: dict) -> "Spec":
    return cls(objects=tuple(Obj(**o) for o in d["objects"]), relation=d.get("relation"))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "Spec":
    return cls.from_dict(json.loads(s))


@dataclasses.dataclass(frozen=True)
class Task:
  """prompt -> reasoning (ends with the canonical scene) -> spec. `hidden`: answer
  words the prompt must not contain (empty for explicit categories)."""
  prompt: str
  reasoning: str
  spec: Spec
  category: str
  hidden: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- text
def _obj_text(o: Obj, article: bool = False) -> str:
  noun = o.shape if o.count == 1 else PLURALS[o.shape]
  words = [o.color, noun] if o.color else [noun]
  if o.count == 1 and article:
    return _with_article(" ".join(words))
  return " ".join([NUMBER_WORDS[o.count]] + words)


def _with_article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(spec: Spec) -> str:
  """Canonical scene text, e.g. 'two green triangles left of one red square'."""
  parts = [_obj_text(o) for o in spec.objects]
  if len(parts) == 1:
    return parts[0]
  return f"{parts[0]} {spec.relation or 'and'} {parts[1]}"


def _tokens(text: str) -> list[str]:
  return split_words(str(text))


_SHAPE_OF = {**{s: (s, False) for s in SHAPES}, **{p: (s, True) for s, p in PLURALS.items()}}
_REL_TOKENS = {tuple(r.split()): r for r in RELATIONS}


def _parse_obj(toks: list[str], i: int, allow_article: bool):
  """Parse COUNT [COLOR] SHAPE at toks[i:]; returns (Obj, next_i) or None."""
  if i >= len(toks):
    return None
  w = toks[i]
  if allow_article and w in ("a", "an"):
    count = 1
  elif w in NUMBER_WORDS[1:MAX_COUNT + 1]:
    count = NUMBER_WORDS.index(w)
  else:
    return None
  i += 1
  color = None
  if i < len(toks) and toks[i] in COLORS:
    color, i = toks[i], i + 1
  if i >= len(toks) or toks[i] not in _SHAPE_OF:
    return None
  shape, plural = _SHAPE_OF[toks[i]]
  if plural != (count > 1):  # canonical grammar requires number agreement
    return None
  if allow_article and w in ("a", "an") and w != ("an" if (color or shape)[0] in "aeiou" else "a"):
    return None
  return Obj(shape, color, count), i + 1


def _parse_scene(toks: list[str], allow_article: bool = False) -> Optional[Spec]:
  """Parse a whole token list as a scene; None unless it all matches."""
  try:
    first = _parse_obj(toks, 0, allow_article)
    if first is None:
      return None
    o0, i = first
    if i == len(toks):
      return Spec((o0,))
    relation = None
    if toks[i] == "and":
      i += 1
    else:
      for rt, r in _REL_TOKENS.items():
        if tuple(toks[i:i + len(rt)]) == rt:
          relation, i = r, i + len(rt)
          break
      else:
        return None
    second = _parse_obj(toks, i, allow_article)
    if second is None or second[1] != len(toks):
      return None
    return Spec((o0, second[0]), relation)
  except ValueError:  # grammatical but not a valid world scene (e.g. repeated shape)
    return None


_SCENE_WORDS = frozenset(
    NUMBER_WORDS[1:MAX_COUNT + 1] + tuple(COLORS) + SHAPES + tuple(PLURALS.values())
    + ("and",) + tuple(w for r in RELATIONS for w in r.split()))


def parse_reasoning(text: str) -> Optional[Spec]:
  """Spec named by the final clause of `text`, or None (never raises).

  The final clause is the trailing run of scene-grammar words (special tokens and
  trailing punctuation ignored), read from its first count word; it must parse whole,
  so an invalid scene is None rather than a shorter valid suffix."""
  try:
    toks = [t for t in _tokens(text) if not (t.startswith("<") and t.endswith(">"))]
    while toks and toks[-1] in ".,:;!?":
      toks.pop()
    start = len(toks)
    while start > 0 and toks[start - 1] in _SCENE_WORDS:
      start -= 1
    run = toks[start:]
    for k, w in enumerate(run):
      if w in NUMBER_WORDS:
        return _parse_scene(run[k:])
    return None
  except Exception:  # never raise on model output
    return None


def parse_prompt(prompt: str) -> Spec:
  """Spec of an explicit-category prompt ('draw a red circle left of two squares').

  Raises ValueError for text outside the explicit prompt grammar (reasoning-required
  prompts have no parser: give their spec explicitly)."""
  toks = _tokens(prompt)
  while toks and toks[-1] in ".,:;!?":
    toks.pop()
  for prefix in sorted(PROMPT_PREFIXES, key=len, reverse=True):
    p = prefix.split()
    if toks[:len(p)] == p:
      spec = _parse_scene(toks[len(p):], allow_article=True)
      if spec is not None:
        return spec
  raise ValueError(f"prompt is not in the ShapeWorld explicit prompt grammar: {prompt!r}")


def vocabulary() -> list[str]:
  """Every word the world's prompts and traces can contain (sorted, deduplicated)."""
  texts = [_TEMPLATE_WORDS, SCENE_PREFIX, " ".join(PROMPT_PREFIXES), " ".join(NUMBER_WORDS),
           " ".join(COLORS), " ".join(SHAPES), " ".join(PLURALS.values()), " ".join(RELATIONS),
           " ".join(OPS)]
  texts += [t for ts in COLOR_KNOWLEDGE.values() for t in ts]
  texts += [d for ds in SHAPE_DESCRIPTIONS.values() for pair in ds for d in pair]
  return sorted({w for t in texts for w in _tokens(t)})


def shapeworld_tokenizer() -> Tokenizer:
  """The ShapeWorld tokenizer: a deterministic vocabulary of every word the grammar can produce."""
  return Tokenizer(vocabulary())


# ----------------------------------------------------------------------------- sampling
def _arith(rng: np.random.Generator, result: int) -> str:
  """'x op y' over one..nine equal to result, with neither operand named like the result."""
  options = [(a, op, b) for op, f in OPS.items() for a in range(1, 10) for b in range(1, 10)
             if f(a, b) == result and result not in (a, b)]
  a, op, b = options[rng.integers(len(options))]
  return f"{NUMBER_WORDS[a]} {op} {NUMBER_WORDS[b]}"


def pick(rng, seq):
  return seq[rng.integers(len(seq))]


def _phrase(rng, o: Obj, hide: frozenset) -> tuple[str, list[str], list[str]]:
  """Prompt noun phrase for `o` hiding attributes in `hide` ⊆ {count,color,shape}.

  Returns (phrase, derivation sentences, hidden answer words)."""
  derivs, hidden = [], []
  plural = o.count > 1 or "count" in hide
  if "shape" in hide:
    sing, plur = pick(rng, SHAPE_DESCRIPTIONS[o.shape])
    noun = plur if plural else sing
    derivs.append(f"{_with_article(sing)} is a {o.shape} .")
    hidden += [o.shape, PLURALS[o.shape]]
  else:
    noun = PLURALS[o.shape] if plural else o.shape
  # Adjective goes before the noun; a knowledge color goes after it.
  if o.color and "color" in hide:
    thing = pick(rng, COLOR_KNOWLEDGE[o.color])
    core = f"{noun} the color of {thing}"
    derivs.append(f"{thing} is {o.color} .")
    hidden.append(o.color)
  elif o.color:
    core = f"{o.color} {noun}"
  else:
    core = noun
  if "count" in hide:
    expr = _arith(rng, o.count)
    derivs.insert(0, f"{expr} is {NUMBER_WORDS[o.count]} .")
    hidden.append(NUMBER_WORDS[o.count])
    return f"as many {core} as {expr}", derivs, hidden
  if o.count == 1:
    return _with_article(core), derivs, hidden
  return f"{NUMBER_WORDS[o.count]} {core}", derivs, hidden


def _rand_color(rng, p_color: float = 1.0) -> Optional[str]:
  return pick(rng, tuple(COLORS)) if rng.random() < p_color else None


def _two_shapes(rng):
  a, b = rng.choice(len(SHAPES), size=2, replace=False)
  return SHAPES[a], SHAPES[b]


def _two_colors(rng):
  a, b = rng.choice(len(COLORS), size=2, replace=False)
  names = tuple(COLORS)
  return names[a], names[b]


def _sample_spec_and_hides(rng, category: str):
  """Scene for `category` plus, per object, which attributes the prompt hides."""
  none = frozenset()
  if category == "single_object":
    return Spec((Obj(pick(rng, SHAPES)),)), [none]
  if category == "counting":
    return Spec((Obj(pick(rng, SHAPES), None, int(rng.integers(1, 5))),)), [none]
  if category == "colors":
    return Spec((Obj(pick(rng, SHAPES), _rand_color(rng)),)), [none]
  if category == "two_objects":
    s0, s1 = _two_shapes(rng)
    return Spec((Obj(s0, None, int(rng.integers(1, 3))),
                 Obj(s1, None, int(rng.integers(1, 3))))), [none, none]
  if category == "attribute_binding":
    s0, s1 = _two_shapes(rng)
    c0, c1 = _two_colors(rng)
    return Spec((Obj(s0, c0), Obj(s1, c1))), [none, none]
  if category == "position":
    s0, s1 = _two_shapes(rng)
    c0, c1 = _two_colors(rng)
    colored = rng.random() < 0.5
    return Spec((Obj(s0, c0 if colored else None), Obj(s1, c1 if colored else None)),
                pick(rng, RELATIONS)), [none, none]
  if category == "reason_count":
    o = Obj(pick(rng, SHAPES), _rand_color(rng, 0.5), int(rng.integers(1, 5)))
    return Spec((o,)), [frozenset({"count"})]
  if category == "reason_color":
    o = Obj(pick(rng, SHAPES), _rand_color(rng), int(rng.integers(1, 4)))
    return Spec((o,)), [frozenset({"color"})]
  if category == "reason_shape":
    o = Obj(pick(rng, SHAPES), _rand_color(rng, 0.5), int(rng.integers(1, 3)))
    return Spec((o,)), [frozenset({"shape"})]
  if category == "reason_compose":
    s0, s1 = _two_shapes(rng)
    c0, c1 = _two_colors(rng)
    hides, objs = [], []
    for s, c in ((s0, c0), (s1, c1)):
      subsets = [frozenset(x) for r in (1, 2) for x in itertools.combinations(
          ("count", "color", "shape"), r)]
      h = pick(rng, subsets)
      color = c if ("color" in h or rng.random() < 0.5) else None
      objs.append(Obj(s, color, int(rng.integers(1, 3))))
      hides.append(h)
    relation = pick(rng, RELATIONS) if rng.random() < 0.5 else None
    return Spec(tuple(objs), relation), hides
  raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")


def sample_task(rng: Union[int, np.random.Generator], category: Optional[str] = None) -> Task:
  """One task (category drawn with CATEGORY weights unless given)."""
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  if category is None:
    category = CATEGORIES[rng.choice(len(CATEGORIES), p=_CATEGORY_P)]
  for _ in range(100):  # rejection: a hidden answer word must not leak into the prompt
    spec, hides = _sample_spec_and_hides(rng, category)
    pieces = [_phrase(rng, o, h) for o, h in zip(spec.objects, hides)]
    scene = pieces[0][0] if len(pieces) == 1 else (
        f"{pieces[0][0]} {spec.relation or 'and'} {pieces[1][0]}")
    prefix = pick(rng, PROMPT_PREFIXES)
    prompt = f"{prefix} {scene}".strip()
    hidden = tuple(dict.fromkeys(w for p in pieces for w in p[2]))
    if set(hidden) & set(_tokens(prompt)):
      continue
    derivs = [d for p in pieces for d in p[1]]
    reasoning = " ".join(derivs + [f"{SCENE_PREFIX} {describe(spec)}"])
    return Task(prompt, reasoning, spec, category, hidden)
  raise RuntimeError(f"could not sample a leak-free {category} task")  # pragma: no cover


def sample_tasks(n: int, seed: int) -> list[Task]:
  """n tasks, deterministic in seed."""
  rng = np.random.default_rng(seed)
  return [sample_task(rng) for _ in range(n)]
