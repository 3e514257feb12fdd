#!/usr/bin/env bash
# GPU acceptance check (issue 11, item 8): one command on a machine with CUDA. It runs the tests marked
# `gpu`, the bench on a random DistilBERT-base at IMDB-like lengths, and the methods sweep for one epoch
# with model.base_dtype=bf16, and writes ONE JSON summary (details: lora_exp/bench/gpu_acceptance.py).
#
# Prepare on the CPU machine, from the project root (the GPU image has torch, transformers, peft, pandas,
# matplotlib; it lacks hydra-core, omegaconf, datasets, wandb and maybe pytest; the Hub is unreachable):
#   bash ../shared/gpu/wheels.sh --no-wandb pytest iniconfig pluggy pygments   # -> .whl/
#   bash ../shared/gpu/offline_assets.sh                                       # -> .gpu_assets/ (MiniLM + corpus)
# (with --no-wandb, runs use logger=none, which needs no wandb). Then, on the GPU machine:
#   bash scripts/gpu_acceptance.sh [SUMMARY.json]       default: $OUT/gpu_acceptance.json (or ./ without $OUT)
# Expected to take 5-8 minutes on an H100 (stages time out at 5 / 5 / 7 minutes; the summary is rewritten after
# each stage, so a run cut off by a 10-minute limit keeps what finished; --skip splits it over calls).
# Extra options go to the Python module, e.g. --skip tests or --steps 100:
#   bash scripts/gpu_acceptance.sh "$OUT/gpu.json" --skip sweep
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
out="${1:-${OUT:-.}/gpu_acceptance.json}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m lora_exp.bench.gpu_acceptance --out "$out" "$@"
