"""Every relative link in README.md and docs/*.md points at a file that exists, and every
``unigrpo_jax/...py`` path or ``python -m unigrpo_jax.X`` module they name exists."""
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MODULE_PATH = re.compile(r"unigrpo_jax/[\w/]+\.py")
PACKAGE_PATH = re.compile(r"(?<![\w/.])((?:models|rollout|rl|rewards|trainers|data|aot|testing)/[\w/]+\.py)")
DASH_M = re.compile(r"python -m (unigrpo_jax(?:\.\w+)+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
  text = page.read_text()
  broken = [t for t in LINK.findall(text)
            if "://" not in t and not (page.parent / t).exists()]
  assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_modules_exist(page):
  text = page.read_text()
  missing = [p for p in MODULE_PATH.findall(text) if not (REPO / p).exists()]
  missing += [p for p in PACKAGE_PATH.findall(text) if not (REPO / "unigrpo_jax" / p).exists()]
  for module in DASH_M.findall(text):
    base = REPO / module.replace(".", "/")
    if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
      missing.append(module)
  assert not missing, f"{page.name}: names modules that do not exist: {missing}"
