"""``gen-sample``: sampling from a bundle. Imports neither torch nor the models: on the ONNX backend the
command needs numpy and onnxruntime alone (torch comes in only with the backends that need it, with
``--interpolate DATASET``, and with torchrun sharding)."""

from __future__ import annotations

from pathlib import Path

import click

from genforge.runtime.strategies import DECODER_NAMES

from .common import BACKEND_CHOICES, one_line_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", type=click.Path())
@click.option("-n", "--num", "n", type=click.IntRange(min=1), default=64, show_default=True, help="Images to draw.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Image i's randomness comes from (seed, i): results do not depend on batch size or backend.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="auto: triton on CUDA when it imports, else onnx (torch-free), else torchscript.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", *DECODER_NAMES]), default="auto",
              show_default=True,
              help="cached: the incremental form, about one forward pass per image; naive: one full forward pass "
              "per sub-pixel; graph: the bundle's sample.onnx (onnx backend); parallel: the forward pass iterated "
              "to its fixed point. auto: on the CPU parallel for small batches and cached for large ones; in "
              "between (where the model decides) the faster of the two as timed on the first two batches of "
              "the size. Same seed, same images.")
@click.option("--complete", "complete_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Image completion: a .npz whose 'images' (N, H, W, C) uint8 levels are kept for --rows rows; "
              "the rest is sampled (N replaces -n).")
@click.option("--rows", type=click.IntRange(min=0), default=None, help="Rows kept with --complete.")
@click.option("--mode", type=click.Choice(["mean", "sample"]), default="mean", show_default=True,
              help="Autoencoder/VAE: show each sub-pixel's expected level, or draw it from p(x|z).")
@click.option("--interpolate", "interpolate_from", default=None, metavar="IMAGES.npz|DATASET",
              help="Autoencoder/VAE: a grid of interpolations between pairs of images, from a .npz ('images') or "
              "a data set name (with --data-path; valid split); -n pairs, --steps columns.")
@click.option("--data-path", type=click.Path(), default=None, help="Data set files for --interpolate DATASET.")
@click.option("--steps", type=click.IntRange(min=2), default=8, show_default=True, help="Columns of --interpolate.")
@click.option("--labels", default=None, metavar="I,J,...",
              help="Class labels for a conditional model: one per image, or one for all (default: i % classes).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Output: .png (a grid) or .npz (uint8 array under 'images').")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def sample_command(bundle: str, n: int, batch_size: int, seed: int, backend: str, device: str, decoder: str,
                   complete_path: str | None, rows: int | None, mode: str, interpolate_from: str | None,
                   data_path: str | None, steps: int, labels: str | None, out: str, overwrite: bool,
                   quiet: bool) -> None:
    """Sample N images from BUNDLE and write them to OUT."""
    from genforge.runtime import AutoregressiveSampler, InputError, LatentSampler, load
    from genforge.runtime.files import read_images_npz, save_images

    if not out.lower().endswith((".png", ".npz")):
        raise click.BadParameter("must end in .png or .npz", param_hint="--out")
    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out}: exists (pass --overwrite)")
    if (complete_path is None) != (rows is None):
        raise click.UsageError("--complete and --rows go together")
    sampler = load(bundle, backend=backend, device=device)
    prefix = None
    if complete_path is not None:
        prefix = read_images_npz(complete_path)
        n = len(prefix)
    lab = None
    if labels is not None:
        try:
            values = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--labels must be comma-separated integers, got {labels!r}") from None
        lab = values * n if len(values) == 1 else values
    kw: dict[str, object] = {"seed": seed, "batch_size": batch_size, "labels": lab, "progress": not quiet}
    nrow = None
    mode_given = click.get_current_context().get_parameter_source("mode") == click.core.ParameterSource.COMMANDLINE
    if isinstance(sampler, LatentSampler):
        kw["mode"] = mode
    elif mode_given:
        raise click.UsageError("--mode applies to autoencoder and VAE bundles")
    if isinstance(sampler, AutoregressiveSampler):
        kw["decoder"] = decoder
    if interpolate_from is not None:
        if not isinstance(sampler, LatentSampler):
            raise click.UsageError("--interpolate needs an autoencoder or VAE bundle")
        pairs = _interpolation_images(interpolate_from, data_path, 2 * n, sampler.levels)
        grid = sampler.interpolate(pairs[:n], pairs[n : 2 * n], steps, labels=lab)
        images, nrow = grid.reshape(-1, *grid.shape[2:]), steps
    elif prefix is not None:
        if not isinstance(sampler, AutoregressiveSampler):
            raise click.UsageError("--complete needs an autoregressive bundle")
        images = sampler.complete(prefix, int(rows or 0), **kw)  # type: ignore[arg-type]
    else:
        images = _sample_maybe_distributed(sampler, n, kw)
        if images is None:  # a rank other than 0 under torchrun: rank 0 writes the gathered result
            return
    save_images(out, images, levels=sampler.levels, overwrite=overwrite, nrow=nrow)
    how = ""
    if isinstance(sampler, AutoregressiveSampler) and sampler.last_stats:
        st = sampler.last_stats
        how = f", {st['decoder']} decoding"
        if st["passes"]:
            h, w, c = sampler.image_shape
            through = "window" if st.get("method") == "window" else "forward"
            per_image = st["forward_passes"] / max(st["parallel_images"], 1)
            how += (f" through the {through} graph: {max(st['passes'])} passes at most per batch of "
                    f"{h * w * c} sub-pixels, {per_image:.1f} forward-pass equivalents per image decoded in parallel")
    click.echo(f"wrote {len(images)} images ({sampler.backend.name}, {sampler.backend.device}{how}) to {out}")


def _interpolation_images(source: str, data_path: str | None, count: int, levels: int) -> object:
    """``count`` images for --interpolate: the first ones of a .npz, or of a data set's valid split."""
    from genforge.runtime import InputError
    from genforge.runtime.files import read_images_npz

    if source.lower().endswith(".npz"):
        images = read_images_npz(source)
    else:
        from genforge.train import load_dataset

        images = load_dataset(source, split="valid", path=data_path, levels=levels).images
    if len(images) < count:
        raise InputError(f"--interpolate needs {count} images, {source} has {len(images)}")
    return images[:count]


def _sample_maybe_distributed(sampler: object, n: int, kw: dict[str, object]) -> object:
    """Under torchrun each rank draws its contiguous share of image indices and rank 0 gathers them: image
    i's randomness comes from (seed, i), so the result equals a single process's."""
    import os

    if not os.environ.get("WORLD_SIZE"):
        return sampler.sample(n, **kw)  # type: ignore[attr-defined]
    import numpy as np
    import torch
    import torch.distributed as dist

    from genforge.train.distributed import gather_to_main, init, shard

    info = init(torch.device("cpu"))  # checks the environment: a stale WORLD_SIZE is a one-line error
    if not info.enabled:
        return sampler.sample(n, **kw)  # type: ignore[attr-defined]
    start, stop = shard(n, info)
    labels = kw.get("labels")
    part_kw = {**kw, "labels": None if labels is None else list(labels)[start:stop], "start": start}  # type: ignore[call-overload]
    part = sampler.sample(stop - start, **part_kw)  # type: ignore[attr-defined]
    parts = gather_to_main(part, info)
    dist.destroy_process_group()
    return None if parts is None else np.concatenate(parts)  # type: ignore[arg-type]
