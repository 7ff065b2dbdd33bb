"""Paths the user may write in a config: ``package://NAME`` names an asset shipped in this package
(e.g. ``package://shapes_sft``, the SFT warm start); other paths are used as given."""
from __future__ import annotations

import os

PACKAGE_PREFIX = "package://"
ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")


def resolve_path(path: str) -> str:
  """``package://NAME`` -> the asset shipped inside this package; other paths unchanged."""
  if path.startswith(PACKAGE_PREFIX):
    return os.path.join(ASSETS_DIR, path[len(PACKAGE_PREFIX):])
  return os.path.abspath(os.path.expanduser(path))
