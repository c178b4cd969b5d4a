"""The zoo's pictures for the README (issue 24, part 4), from what ships and what trained it:

- per zoo model, a grid of 64 samples (seed 0) and, for the autoregressive ones, completions: the first 8
  images of the valid split (tests/data/bmnist-valid-256.npz) with their top 14 rows kept and the rest drawn
  by the model three times (seeds 0-2); the VAE shows interpolations between valid images instead;
- one learning-curve figure, the valid NLL of every run in zoo-runs/ against the training images it had
  seen, from the runs' own metrics.jsonl (the GAN's Fréchet distance has its own panel: it has no NLL).

    python benchmarks/zoo_figures.py            # writes docs/images/zoo-*.png and docs/images/learning-curves.svg
    python benchmarks/zoo_figures.py --table    # prints the README's zoo table from genforge/runtime/zoo/zoo.json
    python benchmarks/zoo_figures.py --readme   # writes it, and the pictures' table, into README.md

Sampling runs the zoo bundles through the runtime (onnxruntime), so the pictures are what a user gets from
``gen-sample zoo:NAME``. The SVG is written by hand (no plotting dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
RUNS = ROOT / "zoo-runs"
SLICE = ROOT / "tests" / "data" / "bmnist-valid-256.npz"
KEPT_ROWS = 14
# Issue 24's goals (nats per image on the test split; the VAE's is the k=5000 estimate of an ELBO-trained VAE).
GOALS = {"pixelcnn-bmnist": 82.5, "gated-pixelcnn-bmnist": 81.0, "row-lstm-bmnist": 82.0,
         "diagonal-bilstm-bmnist": 80.5, "vae-bmnist": 88.0}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def valid_slice() -> np.ndarray:
    with np.load(SLICE) as f:
        shape = tuple(int(v) for v in f["shape"])
        return np.unpackbits(f["bits"], axis=1)[:, : int(np.prod(shape[1:]))].reshape(shape)


def pictures(names: list[str]) -> list[Path]:
    from genforge.runtime import AutoregressiveSampler, LatentSampler, load
    from genforge.runtime.files import save_grid

    written = []
    images = valid_slice()
    for name in names:
        s = load(f"zoo:{name}", backend="onnx")
        path = OUT / f"zoo-{name}-samples.png"
        save_grid(path, s.sample(64, seed=0), levels=s.levels, nrow=8, scale=2)
        written.append(path)
        if isinstance(s, AutoregressiveSampler):
            prefix = images[:8]
            shown = prefix.copy()
            shown[:, KEPT_ROWS:] = 0
            rows = [shown] + [s.complete(prefix, KEPT_ROWS, seed=seed) for seed in range(3)] + [prefix]
            path = OUT / f"zoo-{name}-completion.png"
            save_grid(path, np.concatenate(rows), levels=s.levels, nrow=8, scale=2)
            written.append(path)
        elif isinstance(s, LatentSampler):
            grid = s.interpolate(images[:6], images[6:12], 8)  # (pairs, steps, H, W, C)
            path = OUT / f"zoo-{name}-interpolation.png"
            save_grid(path, grid.reshape(-1, *grid.shape[2:]), levels=s.levels, nrow=8, scale=2)
            written.append(path)
    return written


def curves() -> dict[str, list[tuple[float, float]]]:
    """run -> [(training images seen, valid NLL or FD)] from its metrics.jsonl."""
    out: dict[str, list[tuple[float, float]]] = {}
    for run in sorted(p for p in RUNS.iterdir() if (p / "metrics.jsonl").exists()):
        batch = json.loads((run / "config.json").read_text())["train"]["batch_size"]
        points = []
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("split") != "valid":
                continue
            value = r.get("nats_per_image", r.get("iwae_nll", r.get("fd")))
            if value is not None:
                points.append((r["step"] * batch, float(value)))
        if points:
            out[run.name] = points
    return out


def _panel(series: dict[str, list[tuple[float, float]]], x0: float, y0: float, w: float, h: float,
           y_range: tuple[float, float], y_label: str, colours: dict[str, str],
           goals: dict[str, float] | None = None) -> list[str]:
    goals = goals or {}
    xs = [x for pts in series.values() for x, _ in pts]
    x_max = max(xs) * 1.02
    lo, hi = y_range

    def px(x: float) -> float:
        return x0 + w * x / x_max

    def py(y: float) -> float:
        return y0 + h * (1 - (min(max(y, lo), hi) - lo) / (hi - lo))

    el = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    step = _nice((hi - lo) / 6)
    t = np.ceil(lo / step) * step
    while t <= hi + 1e-9:
        el.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{x0 - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        t += step
    xstep = _nice(x_max / 6)
    t = 0.0
    while t <= x_max:
        el.append(f'<text x="{px(t):.1f}" y="{y0 + h + 16}" text-anchor="middle">{t / 1e6:g}M</text>')
        t += xstep
    el.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle">training images seen</text>')
    el.append(f'<text transform="translate({x0 - 44},{y0 + h / 2}) rotate(-90)" text-anchor="middle">{y_label}</text>')
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if lo <= y <= hi]  # the first epochs of some runs lie far above the rest
        if name in goals:
            el.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{py(goals[name]):.1f}" y2="{py(goals[name]):.1f}" '
                      f'stroke="{colours[name]}" stroke-dasharray="6,4" stroke-width="1.2"/>')
        fit = trend(pts) if name in goals else None
        if fit is not None:  # the fitted curve, carried on to the panel's right edge
            a, b, c, start = fit
            xs_fit = np.linspace(start, x_max, 40)
            line = " ".join(f"{px(x):.1f},{py(a + b * np.exp(-c * x)):.1f}" for x in xs_fit)
            el.append(f'<polyline points="{line}" fill="none" stroke="{colours[name]}" stroke-width="1" '
                      'stroke-dasharray="2,3"/>')
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        el.append(f'<polyline points="{line}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
        for x, y in pts:
            el.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{colours[name]}"/>')
    return el


def trend(points: list[tuple[float, float]]) -> tuple[float, float, float, float] | None:
    """NLL = a + b exp(-c images), least squares over a run's evaluations from where it is within 5 nats of its
    best up to the best one (after it, overfitting bends the curve up): a is the level the recipe's curve
    approaches. c by a grid search, a and b linear for each c. None for runs with fewer than 4 such points."""
    if not points:  # a run whose evaluations all lie outside the panel so far
        return None
    best = min(range(len(points)), key=lambda i: points[i][1])
    tail = [p for p in points[: best + 1] if p[1] <= points[best][1] + 5.0]
    if len(tail) < 4:
        return None
    t = np.array([x for x, _ in tail])
    y = np.array([v for _, v in tail])
    fits = []
    for c in np.geomspace(0.1 / t[-1], 20.0 / t[-1], 400):
        design = np.stack([np.ones_like(t), np.exp(-c * t)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        fits.append((float(((design @ [a, b] - y) ** 2).sum()), float(a), float(b), float(c)))
    _, a, b, c = min(fits)
    return a, b, c, float(t[0])


def _nice(raw: float) -> float:
    mag = 10 ** np.floor(np.log10(raw))
    return float(min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag))


def learning_curves(path: Path) -> Path:
    data = curves()
    colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(data)}
    nll = {k: v for k, v in data.items() if not k.startswith("gan")}
    fd = {k: v for k, v in data.items() if k.startswith("gan")}
    width, height = 1000, 420
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
          'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
          '<text x="20" y="22" font-size="14">Zoo runs, static binarized MNIST, valid split after each epoch '
          '(EMA weights).</text>', '<text x="20" y="40" font-size="12">Dashed: issue 24\'s goal (test split); '
          'dotted: a + b exp(-c images) fitted up to the best epoch</text>']
    el += _panel(nll, 70, 60, 560, 300, (78, 106), "valid NLL, nats/image (VAE: 8-sample IWAE)", colours,
                 {k: v for k, v in GOALS.items() if k in nll})
    if fd:
        top = max(y for pts in fd.values() for _, y in pts[1:] or pts)
        el += _panel(fd, 730, 60, 220, 300, (0, max(1.0, top * 1.1)), "valid FD (classifier features)", colours)
    for i, name in enumerate(data):
        last = data[name][-1][1]
        best = min(y for _, y in data[name])
        fit = trend(data[name]) if name in GOALS else None
        level = f", trend levels at {fit[0]:.1f}" if fit is not None else ""
        y = 420 + 16 * i
        x = 70
        el.append(f'<rect x="{x}" y="{y - 9}" width="14" height="4" fill="{colours[name]}"/>')
        el.append(f'<text x="{x + 20}" y="{y - 3}">{name}: best {best:.2f}, last {last:.2f}{level}</text>')
    height_needed = 420 + 16 * len(data) + 6
    el[0] = el[0].replace(f'height="{height}"', f'height="{height_needed}"')
    el[1] = el[1].replace(f'height="{height}"', f'height="{height_needed}"')
    el.append("</svg>")
    path.write_text("\n".join(el) + "\n", encoding="utf-8")
    return path


def table() -> str:
    """The README's zoo table, from the cards."""
    from genforge.runtime import zoo

    lines = ["| zoo model | valid NLL, nats/image | FD (valid) | steps (epochs) | training | paper (test split) "
             "| goal | files |", "| --- | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    total = 0
    for c in zoo.cards():
        v = c["valid"]
        if "nats_per_image" in v:
            nll = f"{v['nats_per_image']:.2f}"
        elif "iwae_nll" in v:
            nll = f"{v['iwae_nll']:.2f} (k={v['iw_samples']})"
            extra = v.get("iwae_k5000_first_1000")
            if extra:
                nll += f"; first {extra['images']}: {extra['iwae_nll']:.2f} (k={extra['iw_samples']})"
        else:
            nll = "-"
        size = sum(f["bytes"] for f in c["files"].values())
        total += size
        lines.append(f"| `zoo:{c['name']}` | {nll} | {c['quality']['fd']:.2f} | {c['steps']:,} ({c['epochs']:g}) | "
                     f"{c['wall_hours']:.1f} h | {c['paper']} | {c['goal']} | {size / 1e6:.2f} MB |")
    lines.append(f"\nAll {len(zoo.zoo_names())} bundles: {total / 1e6:.1f} MB in the install.")
    return "\n".join(lines)


def pictures_table() -> str:
    from genforge.runtime import zoo

    rows = ["| zoo model | samples (seed 0) | completions: top 14 rows kept (first row), three draws, the originals "
            "(last row) |", "| --- | --- | --- |"]
    for name in zoo.zoo_names():
        comp, interp = OUT / f"zoo-{name}-completion.png", OUT / f"zoo-{name}-interpolation.png"
        third = (f"![completions](docs/images/{comp.name})" if comp.exists() else
                 f"interpolations between valid images: ![interpolations](docs/images/{interp.name})"
                 if interp.exists() else "-")
        rows.append(f"| `zoo:{name}` | ![samples](docs/images/zoo-{name}-samples.png) | {third} |")
    return "\n".join(rows)


def update_readme(path: Path) -> None:
    """Rewrite the README's generated blocks (between <!-- zoo-table ... --> and <!-- /zoo-table -->, and the
    same for zoo-pictures) from the cards."""
    text = path.read_text(encoding="utf-8")
    for tag, body in (("zoo-table", table()), ("zoo-pictures", pictures_table())):
        start = text.index(f"<!-- {tag}")
        start = text.index("-->", start) + 3
        end = text.index(f"<!-- /{tag} -->")
        text = text[:start] + "\n" + body + "\n" + text[end:]
    path.write_text(text, encoding="utf-8")


def main() -> None:
    from genforge.runtime import zoo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's zoo table and pictures table")
    ap.add_argument("--curves-only", action="store_true")
    ap.add_argument("names", nargs="*", help="zoo models to draw (default: all)")
    a = ap.parse_args()
    if a.table:
        print(table())
        return
    if a.readme:
        update_readme(ROOT / "README.md")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    written: list[Any] = [learning_curves(OUT / "learning-curves.svg")]
    if not a.curves_only:
        written += pictures(a.names or zoo.zoo_names())
    for p in written:
        print(p.relative_to(ROOT))


if __name__ == "__main__":
    main()
