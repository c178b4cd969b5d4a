#!/usr/bin/env bash
# The commands that trained the zoo's runs (issue 24): each is its recipe, genforge/train/recipes/NAME.json.
# Continue one with:
#   nice -n 19 gen-train --out zoo-runs/NAME --resume --threads 1 --quiet
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/binarized_mnist.npz}

# pixelcnn-bmnist, gated-pixelcnn-bmnist and vae-bmnist were started before recipes existed, with the flags the
# recipes now hold (the tests check each recipe against its run's config.json); run today they are:
for name in pixelcnn-bmnist gated-pixelcnn-bmnist vae-bmnist row-lstm-bmnist gan-bmnist diagonal-bilstm-bmnist; do
    nice -n 19 gen-train --recipe "$name" --data-path "$DATA" --out "zoo-runs/$name" --threads 1 --quiet
done
