#!/usr/bin/env bash
# The commands that started the zoo's runs (issue 24). Continue one with:
#   nice -n 19 gen-train --out zoo-runs/NAME --resume --threads 1 --quiet
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/binarized_mnist.npz}

# Gated PixelCNN, the default architecture (h=64, 8 gated layers, 0.98 M parameters), bf16 autocast on the CPU
# (1.65 s a step of 64 on one thread against 3.1 s in float32, measured on this project's CPU), 12,000 steps of
# 64 (17 epochs of the 45,000 training images), cosine from 1e-3, EMA 0.9995, the whole valid split every epoch.
nice -n 19 gen-train --model gated-pixelcnn --data binarized-mnist --data-path "$DATA" \
    --steps 12000 --batch-size 64 --lr 1e-3 --warmup-steps 200 --ema 0.9995 --cpu-bf16 \
    --checkpoint-every 200 --eval-limit 0 --samples 16 --threads 1 --quiet \
    --out zoo-runs/gated-pixelcnn-bmnist

# VAE, one stochastic layer of 32 Gaussian latents, the conv encoder/decoder at hidden=32 (issue 24's 2-hour VAE run),
# batch 100, cosine from 1e-3, KL warm-up over the first 2,000 steps, EMA 0.999, the whole valid split every epoch
# (8-sample importance-weighted NLL; gen-eval gives the k=5000 figure).
nice -n 19 gen-train --model vae --data binarized-mnist --data-path "$DATA" --set latent_size=32 \
    --steps 20000 --batch-size 100 --lr 1e-3 --warmup-steps 200 --kl-warmup-steps 2000 --ema 0.999 \
    --checkpoint-every 500 --eval-limit 0 --samples 16 --threads 1 --quiet \
    --out zoo-runs/vae-bmnist
