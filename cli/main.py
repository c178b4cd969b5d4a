"""The console scripts. Each command parses its options and calls one library function."""

from __future__ import annotations

from pathlib import Path

import click

from .common import load_config_file, one_line_errors

DATASET_CHOICES = ("digits", "binarized-mnist", "mnist", "fashion-mnist", "cifar10", "folder")


def _model_choices() -> list[str]:
    from genforge.models import MODELS

    return list(MODELS)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config_file, is_eager=True,
              expose_value=False, help="JSON file of option values (keys as option names; 'model_config' for "
              "model fields). Flags given on the command line win.")
@click.option("--model", type=click.Choice(_model_choices()), default="pixelcnn", show_default=True,
              help="Model family to train.")
@click.option("--data", type=click.Choice(DATASET_CHOICES), default="digits", show_default=True,
              help="Data set. 'digits' ships with scikit-learn; the others read --data-path.")
@click.option("--data-path", type=click.Path(), default=None,
              help="File or directory of the data set (local files only).")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True,
              help="Split to train on.")
@click.option("--eval-split", type=click.Choice(["train", "valid", "test", "none"]), default="valid",
              show_default=True, help="Held-out split scored every epoch ('none' to skip).")
@click.option("--levels", type=click.IntRange(2, 256), default=None,
              help="Quantize the data to this many levels (default: the data set's own).")
@click.option("--dynamic-binarize", is_flag=True, help="Resample binary images from grey levels each step.")
@click.option("--conditional", is_flag=True, help="Condition on the data set's class labels.")
@click.option("--image-size", type=int, default=32, show_default=True, help="Image side for --data folder.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="Channels for --data folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Model config field, e.g. --set hidden=128 --set likelihood=logistic-mixture. Repeatable.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data [default: 30].")
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="Total optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (AdamW; Adam for the GAN) [default: 3e-3; 2e-4 for gan].")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Clip the gradient norm to this (0: off).")
@click.option("--eval-limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Score at most this many held-out images per epoch (0: all).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Append a metrics line every N steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also checkpoint every N steps (0: at the end of each epoch only).")
@click.option("--gan-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="GAN: discriminator steps per generator step (Algorithm 1's k).")
@click.option("--gan-loss", type=click.Choice(["non-saturating", "minimax"]), default="non-saturating",
              show_default=True, help="GAN generator loss: maximize log D(G(z)), or minimize log(1 - D(G(z))).")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Keep an exponential moving average of the weights with this decay (e.g. 0.999); evaluation "
              "and sample grids use it, and gen-export --ema exports it.")
@click.option("--kl-warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="VAE: raise the KL weight linearly from 0 to 1 over this many steps.")
@click.option("--iw-samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="VAE: importance samples for the held-out NLL estimate each epoch (0: skip).")
@click.option("--samples", "n_samples", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images in the sample grid written each epoch (0: none).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory [default: runs/MODEL-DATA-N, a new one each run].")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@one_line_errors
def train_command(**o: object) -> None:
    """Train a model and write a run directory (config.json, weights, metrics, sample grids).

    With no arguments: a small PixelCNN on the 8x8 digits, about a minute on two CPU cores.
    """
    from genforge.train import DataSpec, TrainConfig, train_run
    from genforge.train.run import parse_overrides

    extend = {k: o[k] for k in ("epochs", "steps") if o[k] is not None}
    tcfg = TrainConfig(
        epochs=int(o["epochs"] or TrainConfig.epochs), steps=int(o["steps"] or 0),
        batch_size=int(o["batch_size"]), lr=float(o["lr"] or (2e-4 if o["model"] == "gan" else 3e-3)),
        weight_decay=float(o["weight_decay"]),
        schedule=str(o["schedule"]), warmup_steps=int(o["warmup_steps"]), grad_clip=float(o["grad_clip"]),
        seed=int(o["seed"]), eval_limit=int(o["eval_limit"]), checkpoint_every=int(o["checkpoint_every"]),
        log_every=int(o["log_every"]),
        n_samples=int(o["n_samples"]), dynamic_binarize=bool(o["dynamic_binarize"]),
        kl_warmup_steps=int(o["kl_warmup_steps"]), iw_samples=int(o["iw_samples"]),
        gan_k=int(o["gan_k"]), gan_loss=str(o["gan_loss"]), ema=float(o["ema"]),
    )
    data = DataSpec(
        name=str(o["data"]), path=o["data_path"], split=str(o["split"]),  # type: ignore[arg-type]
        eval_split="" if o["eval_split"] == "none" else str(o["eval_split"]),
        levels=o["levels"], image_size=int(o["image_size"]), channels=int(o["channels"]),  # type: ignore[arg-type]
        conditional=bool(o["conditional"]),
    )
    result = train_run(
        model=str(o["model"]), data=data, model_overrides=parse_overrides(list(o["overrides"])),  # type: ignore[arg-type]
        train=tcfg, out=o["out"], device=str(o["device"]), resume=bool(o["resume"]), extend=extend,  # type: ignore[arg-type]
        overwrite=bool(o["overwrite"]), progress=not o["quiet"],
    )
    summary = " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    click.echo(f"run: {result.run_dir} (step {result.steps}) {summary}".rstrip())
    if result.samples is not None:
        click.echo(f"samples: {Path(result.samples)}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "formats", type=click.Choice(["onnx", "torchscript", "all"]), multiple=True,
              default=("onnx",), show_default=True, help="Graph format(s) to export; repeatable, or 'all'.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--opset", type=click.IntRange(13, 23), default=17, show_default=True, help="ONNX opset.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest |eager - exported| allowed on fresh random inputs.")
@click.option("--ema", is_flag=True, help="Export the moving-average weights (a run trained with --ema).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@one_line_errors
def export_command(run_dir: str, formats: tuple[str, ...], out: str, opset: int, tolerance: float, ema: bool,
                   overwrite: bool) -> None:
    """Export the model of RUN_DIR to a verified bundle (manifest.json + graphs)."""
    from genforge.export import export_run

    chosen = ("onnx", "torchscript") if "all" in formats else tuple(dict.fromkeys(formats))
    path = export_run(run_dir, out, formats=chosen, opset=opset, tolerance=tolerance, overwrite=overwrite, ema=ema)
    click.echo(f"bundle: {path} ({', '.join(chosen)})")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", type=click.Path())
@click.option("-n", "--num", "n", type=click.IntRange(min=1), default=64, show_default=True, help="Images to draw.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image i's randomness comes from (seed, i): results do not depend on batch size or backend.")
@click.option("--backend", type=click.Choice(["auto", "onnx", "torchscript"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "cached", "naive"]), default="auto", show_default=True,
              help="cached: the incremental form, about one forward pass per image (auto picks it when the bundle "
              "has it); naive: one full forward pass per sub-pixel. Same seed, same images.")
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
    if isinstance(sampler, AutoregressiveSampler):
        kw["decoder"] = decoder
    elif isinstance(sampler, LatentSampler):
        kw["mode"] = mode
    elif mode != "mean":
        raise click.UsageError("--mode applies to autoencoder and VAE bundles")
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
    click.echo(f"wrote {len(images)} images ({sampler.backend.name}, {sampler.backend.device}) to {out}")


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("path", type=click.Path())
@click.option("--data", type=click.Choice(DATASET_CHOICES), default="digits", show_default=True)
@click.option("--data-path", type=click.Path(), default=None)
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--iw-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="VAE: importance samples for the NLL estimate (0: ELBO only).")
@click.option("--quality/--no-quality", default=False, show_default=True,
              help="Also the sample-quality distances (fd, kd) against the split.")
@click.option("--quality-samples", type=click.IntRange(min=2), default=500, show_default=True)
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="torchvision Inception-v3 weights (.safetensors or .pth): also report inception_fd/kd.")
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True, help="Score the first N images.")
@click.option("--levels", type=click.IntRange(2, 256), default=None, help="Quantize the data (default: the model's).")
@click.option("--image-size", type=int, default=32, show_default=True, help="For --data folder.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="For --data folder.")
@click.option("--backend", type=click.Choice(["auto", "onnx", "torchscript", "triton"]), default="auto",
              show_default=True, help="For bundles.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--quiet", is_flag=True)
@one_line_errors
def eval_command(path: str, data: str, data_path: str | None, split: str, batch_size: int, iw_samples: int,
                 quality: bool, quality_samples: int, inception_weights: str | None,
                 limit: int, levels: int | None, image_size: int, channels: str,
                 backend: str, seed: int, quiet: bool) -> None:
    """Evaluate a run directory or a bundle on a data split; prints one JSON object."""
    import json

    from genforge.train import DataSpec
    from genforge.train.evaluate import evaluate_path

    spec = DataSpec(name=data, path=data_path, split=split, levels=levels, image_size=image_size,
                    channels=int(channels))
    result = evaluate_path(path, spec, batch_size=batch_size, iw_samples=iw_samples, quality=quality,
                           quality_samples=quality_samples, limit=limit, seed=seed, backend=backend,
                           progress=not quiet, inception_weights=inception_weights)
    click.echo(json.dumps(result, sort_keys=True))


def _sample_maybe_distributed(sampler: object, n: int, kw: dict[str, object]) -> object:
    """Under torchrun each rank draws its contiguous share of image indices and rank 0 gathers them: image
    i's randomness comes from (seed, i), so the result equals a single process's."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return sampler.sample(n, **kw)  # type: ignore[attr-defined]
    import numpy as np
    import torch.distributed as dist

    from genforge.train.distributed import from_env, gather_to_main, shard

    info = from_env()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    start, stop = shard(n, info)
    labels = kw.get("labels")
    part_kw = {**kw, "labels": None if labels is None else list(labels)[start:stop], "start": start}  # type: ignore[call-overload]
    part = sampler.sample(stop - start, **part_kw)  # type: ignore[attr-defined]
    parts = gather_to_main(part, info)
    dist.destroy_process_group()
    return None if parts is None else np.concatenate(parts)  # type: ignore[arg-type]
