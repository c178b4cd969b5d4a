"""Shared pieces of the click commands: one-line errors and JSON config files."""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from genforge.models.catalog import MODEL_NAMES

F = TypeVar("F", bound=Callable[..., Any])

# The model registry's names, from its torch-free catalog: --help and argument errors answer without
# importing torch, which takes seconds.
MODEL_CHOICES = MODEL_NAMES
DATASET_CHOICES = ("digits", "binarized-mnist", "mnist", "fashion-mnist", "cifar10", "folder")
# The runtime's backends (genforge.runtime.BACKENDS, which a test ties to this); gen-sample and gen-eval alike.
BACKEND_CHOICES = ("auto", "onnx", "torchscript", "triton")

# Exceptions that mean "bad input" rather than a bug: they end the command with one line and exit 1.
# Matched by name so this module imports neither torch nor onnxruntime.
CLEAN_ERRORS = (
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InputError",
    "LockError",
    "ExportError",
    "RuntimeBackendError",
    "TrainingError",
    "UsageError",
)


def one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except FileExistsError as e:
            if e.strerror == "exists":  # save_images' own refusal; a path component that is a file is not one
                raise click.ClickException(f"{e.filename}: exists (pass --overwrite)") from None
            raise click.ClickException(_os_error(e)) from None
        except OSError as e:  # a read-only or full file system, a missing directory, permissions
            raise click.ClickException(_os_error(e)) from None
        except Exception as e:
            if any(cls.__name__ in CLEAN_ERRORS for cls in type(e).__mro__):
                raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            raise

    return wrapper  # type: ignore[return-value]


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or type(e).__name__}" + (" (is the disk full?)" if e.errno == 28 else "")


def recipes_dir() -> Path:
    """genforge.train's recipes/ folder, found without importing genforge.train (which imports torch)."""
    spec = importlib.util.find_spec("genforge.train")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / "recipes" if locations else Path("recipes")


RECIPE_NAMES = tuple(sorted(p.stem for p in recipes_dir().glob("*.json")))
# Keys of a recipe that document it; gen-train's options are the others.
RECIPE_ONLY_KEYS = ("recipe", "description")


def load_recipe(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--recipe NAME``: the package's recipes/NAME.json, read as --config reads a file."""
    if value is not None:
        load_config_file(ctx, param, str(recipes_dir() / f"{value}.json"))
    return value


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE.json``: its keys become the defaults of the command's options (flags still win)."""
    if value is None:
        return None
    path = Path(value)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"{path}: cannot read a JSON object ({e})") from None
    if not isinstance(obj, dict):
        raise click.BadParameter(f"{path}: expected a JSON object of option names to values")
    known = {p.name for p in ctx.command.params if p.name}
    mapped = {k.replace("-", "_"): v for k, v in obj.items() if k not in RECIPE_ONLY_KEYS}
    unknown = sorted(set(mapped) - known - {"model_config"})
    if unknown:
        raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}")
    if isinstance(mapped.get("model_config"), dict):
        mapped["overrides"] = [f"{k}={json.dumps(v)}" for k, v in mapped.pop("model_config").items()]
        # --set on the command line replaces the default list; the command merges these back under it, so a
        # flag changes one field and keeps the file's others.
        ctx.meta["config_overrides"] = [*ctx.meta.get("config_overrides", []), *mapped["overrides"]]
    ctx.default_map = {**(ctx.default_map or {}), **mapped}
    return value
