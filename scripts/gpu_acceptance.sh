#!/usr/bin/env bash
# GPU acceptance check (issue 19, item 10): one command, at most 8 minutes on one H100/H200. It runs the tests
# marked `gpu`, the bench at equal precision with compile off and on (MFU against this GPU model's peak at the
# precision used), the methods sweep for one epoch with model.base_dtype=bf16 (measured / predicted peak per
# method, LoRA / full), QLoRA's peak (LoRA on a bf16, nf4 and int8 base: measured / predicted, each over bf16),
# the merged-inference latency and packs of 1 / 4 / 16 LoRA jobs on one base (issue 28: samples/s per job, MFU,
# peak memory), and writes ONE JSON summary (details:
# lora_exp/bench/gpu_acceptance.py).
#
# Prepare on the CPU machine, from the project root (the GPU image has torch, transformers, peft, pandas,
# matplotlib; it lacks hydra-core, omegaconf, datasets, wandb and maybe pytest; the Hub is unreachable):
#   bash ../shared/gpu/wheels.sh --no-wandb pytest iniconfig pluggy pygments bitsandbytes   # -> .whl/
#   bash ../shared/gpu/offline_assets.sh                                       # -> .gpu_assets/ (MiniLM + corpus)
# (with --no-wandb, runs use logger=none, which needs no wandb). Then, on the GPU machine:
#   bash scripts/gpu_acceptance.sh [SUMMARY.json]       default: $OUT/gpu_acceptance.json (or ./ without $OUT)
# The stages share a budget of 470 s (--budget; each also has a cap: tests 150, bench 270, sweep 180, qlora 120,
# latency 90 s);
# the summary is rewritten after each stage, so a run cut off keeps what finished; --skip splits it over calls.
# Extra options go to the Python module, e.g. --skip tests or --steps 100:
#   bash scripts/gpu_acceptance.sh "$OUT/gpu.json" --skip sweep
# The packs stage comes last; to give it its full cap on its own:  --skip tests,bench,sweep,latency
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
