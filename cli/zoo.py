"""``gen-zoo``: the zoo's models and their cards. Torch-free, like gen-sample."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import one_line_errors


def _score(c: dict[str, Any]) -> str:
    valid = c.get("valid") or {}
    if "nats_per_image" in valid:
        return f"NLL {valid['nats_per_image']:.2f}"
    if "iwae_nll" in valid:
        return f"NLL {valid['iwae_nll']:.2f} (k={int(valid['iw_samples'])})"
    if "fd" in valid:
        return f"FD {valid['fd']:.2f}"
    return "-"


def _mb(c: dict[str, Any]) -> float:
    return sum(f["bytes"] for f in (c.get("files") or {}).values()) / 1e6


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the card(s) as JSON.")
@one_line_errors
def zoo_command(name: str | None, as_json: bool) -> None:
    """List the zoo's trained models (load one as zoo:NAME), or print NAME's card: the recipe and the
    commands that made it, its training compute, valid-split scores, files and sha256."""
    from genforge.runtime import zoo

    if name is not None:
        c = {"name": name.removeprefix(zoo.PREFIX), **zoo.card(name)}
        if as_json:
            click.echo(json.dumps(c, indent=2, sort_keys=True))
            return
        for key, value in c.items():
            shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            click.echo(f"{key}: {shown}")
        return
    cards = zoo.cards()
    if as_json:
        click.echo(json.dumps(cards, indent=2, sort_keys=True))
        return
    if not cards:
        click.echo("the zoo is empty in this install")
        return
    rows = [("name", "model", "valid (nats/image; FD)", "steps", "epochs", "train hours", "MB")]
    for c in cards:
        rows.append((zoo.PREFIX + c["name"], c["model"], _score(c), str(c["steps"]), f"{c['epochs']:g}",
                     f"{c['wall_hours']:.1f}", f"{_mb(c):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    click.echo("gen-zoo NAME prints a card; genforge.runtime.load('zoo:NAME') or gen-sample zoo:NAME samples.")


__all__ = ["zoo_command"]
