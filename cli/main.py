"""The console scripts. Each command parses its options and calls one library function.

``gen-sample`` lives in sample.py, which imports no torch (the ONNX path stays torch-free).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from .common import (
    BACKEND_CHOICES,
    DATASET_CHOICES,
    MODEL_CHOICES,
    RECIPE_NAMES,
    load_config_file,
    load_recipe,
    one_line_errors,
)
from .sample import sample_command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config_file, is_eager=True,
              expose_value=False, help="JSON file of option values (keys as option names; 'model_config' for "
              "model fields). Flags given on the command line win.")
@click.option("--recipe", type=click.Choice(RECIPE_NAMES), callback=load_recipe, is_eager=True, expose_value=False,
              help="A named recipe: the options that trained the zoo's model of that name (genforge/train/recipes/"
              "NAME.json, a --config file to read and copy). Add --data-path; flags given win.")
@click.option("--model", type=click.Choice(MODEL_CHOICES), default="pixelcnn", show_default=True,
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
@click.option("--image-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Image side for --data folder.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True,
              help="Channels for --data folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Model config field, e.g. --set hidden=128 --set likelihood=logistic-mixture. Repeatable.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data [default: 30].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
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
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after this many epochs without a better held-out score (0: train every step). Every run "
              "keeps the weights of its best evaluation in model_best.safetensors (gen-export --weights best).")
@click.option("--kl-warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="VAE: raise the KL weight linearly from 0 to 1 over this many steps.")
@click.option("--iw-train", type=click.IntRange(min=0), default=0, show_default=True,
              help="VAE: train the k-sample importance-weighted bound (the IWAE, Burda et al. 2016) instead of the "
              "ELBO (0).")
@click.option("--iw-samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="VAE: importance samples for the held-out NLL estimate each epoch (0: skip).")
@click.option("--samples", "n_samples", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images in the sample grid written each epoch (0: none).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--cpu-bf16", is_flag=True,
              help="bfloat16 autocast on the CPU (float32 weights and likelihood), where the CPU has native bf16; "
              "CUDA always uses it.")
@click.option("--compile", is_flag=True,
              help="torch.compile the training step's loss (a minute to compile; then faster steps, see the README's "
              "training speed table). Not the GAN's step.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Torch CPU threads; 0: the cores no other job keeps busy (torch's own default, one per core, "
              "was 18x slower on 2 cores shared with 2 other jobs). OMP_NUM_THREADS, when set, wins over 0.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
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

    ctx = click.get_current_context()
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.DEFAULT_MAP,
             click.core.ParameterSource.ENVIRONMENT)
    explicit = {name for name in o if ctx.get_parameter_source(name) in typed}
    tcfg = TrainConfig(
        epochs=int(o["epochs"] or TrainConfig.epochs), steps=int(o["steps"] or 0),
        batch_size=int(o["batch_size"]), lr=float(o["lr"] or (2e-4 if o["model"] == "gan" else 3e-3)),
        weight_decay=float(o["weight_decay"]),
        schedule=str(o["schedule"]), warmup_steps=int(o["warmup_steps"]), grad_clip=float(o["grad_clip"]),
        seed=int(o["seed"]), eval_limit=int(o["eval_limit"]), checkpoint_every=int(o["checkpoint_every"]),
        log_every=int(o["log_every"]),
        n_samples=int(o["n_samples"]), dynamic_binarize=bool(o["dynamic_binarize"]), ema=float(o["ema"]),
        cpu_bf16=bool(o["cpu_bf16"]), patience=int(o["patience"]), compile=bool(o["compile"]),
    )
    # The family's own options; each family keeps the ones it has (objectives.OBJECTIVE_OPTIONS).
    objective = {k: o[k] for k in ("kl_warmup_steps", "iw_samples", "iw_train", "gan_k", "gan_loss")}
    data = DataSpec(
        name=str(o["data"]), path=o["data_path"], split=str(o["split"]),  # type: ignore[arg-type]
        eval_split="" if o["eval_split"] == "none" else str(o["eval_split"]),
        levels=o["levels"], image_size=int(o["image_size"]), channels=int(o["channels"]),  # type: ignore[arg-type]
        conditional=bool(o["conditional"]),
    )
    overrides = {**parse_overrides(ctx.meta.get("config_overrides", [])),
                 **parse_overrides(list(o["overrides"]))}  # type: ignore[call-overload]
    result = train_run(
        model=str(o["model"]), data=data, model_overrides=overrides,
        train=tcfg, out=o["out"], device=str(o["device"]), resume=bool(o["resume"]), explicit=explicit,  # type: ignore[arg-type]
        overwrite=bool(o["overwrite"]), progress=not o["quiet"], threads=int(o["threads"]),  # type: ignore[call-overload]
        objective=objective,
    )
    summary = " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    click.echo(f"run: {result.run_dir} (step {result.steps}) {summary}".rstrip())
    if result.samples is not None:
        click.echo(f"samples: {Path(result.samples)}")
    run_dir = shlex.quote(str(result.run_dir))
    click.echo(f"next: gen-export {run_dir} --format all -o {shlex.quote('bundles/' + result.run_dir.name)}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "formats", type=click.Choice(["onnx", "torchscript", "all"]), multiple=True,
              default=("onnx",), show_default=True, help="Graph format(s) to export; repeatable, or 'all'.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--opset", type=click.IntRange(13, 23), default=18, show_default=True,
              help="ONNX opset; from 18 on the supported (dynamo) exporter, below it the TorchScript-based one.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest |eager - exported| / (1 + |eager| / 50) allowed on fresh random inputs.")
@click.option("--weights", type=click.Choice(["last", "ema", "best"]), default="last", show_default=True,
              help="Which weights: the last step's, their moving average (a run trained with --ema), or those of "
              "the best held-out evaluation (model_best.safetensors).")
@click.option("--ema", is_flag=True, help="Same as --weights ema.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@one_line_errors
def export_command(run_dir: str, formats: tuple[str, ...], out: str, opset: int, tolerance: float, weights: str,
                   ema: bool, overwrite: bool) -> None:
    """Export the model of RUN_DIR to a verified bundle (manifest.json + graphs)."""
    from genforge.export import export_run

    if ema and weights not in ("last", "ema"):
        raise click.UsageError(f"--ema contradicts --weights {weights}")
    chosen = ("onnx", "torchscript") if "all" in formats else tuple(dict.fromkeys(formats))
    path = export_run(run_dir, out, formats=chosen, opset=opset, tolerance=tolerance, overwrite=overwrite,
                      weights="ema" if ema else weights)
    click.echo(f"bundle: {path} ({', '.join(chosen)})")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("path", type=click.Path())
@click.option("--data", type=click.Choice(DATASET_CHOICES), default=None,
              help="Data set [default: the one the model was trained on, as its run or bundle records].")
@click.option("--data-path", type=click.Path(), default=None, help="Its files [default: the recorded ones].")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test", show_default=True,
              help="Split to score. Splits the data set lacks are carved with the model's own training seed, so "
              "test and valid are exactly the images it was trained without.")
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
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="For --data folder [default: 32].")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="For --data folder [default: 3].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True, help="For bundles.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Randomness of the VAE's importance samples and of the quality samples (image i from (seed, i)); "
              "not of the split, which the model's training seed fixes.")
@click.option("--weights", type=click.Choice(["last", "ema", "best"]), default="last", show_default=True,
              help="For run directories: the last step's weights, their moving average, or the best evaluation's.")
@click.option("--quiet", is_flag=True)
@one_line_errors
def eval_command(path: str, data: str | None, data_path: str | None, split: str, batch_size: int, iw_samples: int,
                 quality: bool, quality_samples: int, inception_weights: str | None,
                 limit: int, levels: int | None, image_size: int | None, channels: str | None,
                 backend: str, seed: int, weights: str, quiet: bool) -> None:
    """Evaluate a run directory or a bundle on a data split; prints one JSON object (nats_per_image is the
    negative log-likelihood, -log p(x), averaged over the split's images)."""
    import json

    from genforge.train.evaluate import evaluate_path

    given = {"name": data, "path": data_path, "levels": levels, "image_size": image_size,
             "channels": None if channels is None else int(channels)}
    result = evaluate_path(path, {k: v for k, v in given.items() if v is not None}, split=split,
                           batch_size=batch_size, iw_samples=iw_samples, quality=quality,
                           quality_samples=quality_samples, limit=limit, seed=seed, backend=backend,
                           progress=not quiet, inception_weights=inception_weights, weights=weights)
    click.echo(json.dumps(result, sort_keys=True))


__all__ = ["eval_command", "export_command", "sample_command", "train_command"]
