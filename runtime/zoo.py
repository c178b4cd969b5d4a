"""The model zoo: trained bundles that ship inside the package and load by name, ``zoo:MODEL-DATA``.

Each zoo model is an ordinary bundle directory under ``genforge/runtime/zoo/`` (ONNX graphs reading their
weights from ``weights.safetensors``: about the size of the weights), checked by the same reader as any
other bundle, and a card in ``zoo/zoo.json``: the recipe and the exact commands that trained, exported
and scored it, its steps and epochs, wall time and machine, its valid-split scores, and every file's size
and sha256. ``zoo-runs/build_zoo.py`` in the repository writes both from the training runs.

A name is looked up in the index, never joined to a path: ``zoo:../x`` is an unknown name, not a file.
Torch-free, like the rest of the ONNX path.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import BundleError

PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
INDEX = "zoo.json"
INDEX_FORMAT = "genforge-zoo"


@lru_cache(maxsize=1)
def _index() -> dict[str, Any]:
    path = ZOO_DIR / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": INDEX_FORMAT, "models": {}}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: the zoo's index is unreadable ({e}); reinstall genforge") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("models"), dict):
        raise BundleError(f"{path}: not a genforge zoo index; reinstall genforge")
    return index


def zoo_names() -> list[str]:
    """The zoo's model names (without the ``zoo:`` prefix), sorted."""
    return sorted(_index()["models"])


def card(name: str) -> dict[str, Any]:
    """The card of zoo model ``name`` (with or without the ``zoo:`` prefix)."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    models = _index()["models"]
    if key not in models:
        have = ", ".join(PREFIX + n for n in sorted(models)) or "none (this install has no zoo)"
        raise BundleError(f"unknown zoo model {name!r}; the zoo has {have}")
    return dict(models[key])


def is_zoo_name(path: object) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """The bundle directory of a ``zoo:NAME``; any other path unchanged."""
    if not is_zoo_name(path):
        return path
    folder = card(str(path)).get("bundle")
    if not isinstance(folder, str) or not folder or folder in (".", "..") or "/" in folder or "\\" in folder:
        raise BundleError(f"{path}: the zoo's index names no bundle folder for it; reinstall genforge")
    return ZOO_DIR / folder


def cards() -> list[dict[str, Any]]:
    """Every card, in name order, each with its ``name``."""
    return [{"name": n, **card(n)} for n in zoo_names()]


__all__ = ["PREFIX", "ZOO_DIR", "card", "cards", "is_zoo_name", "resolve", "zoo_names"]
