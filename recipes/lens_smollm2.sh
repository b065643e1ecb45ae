#!/usr/bin/env bash
# The first Lens study on the English-centric bundled model (docs/lens-study.md): probe at the final
# norm on the parallel instruction prompts, train a LoRA adapter with the scale-free preset, then the
# focused comparison (recipes/compare_lens_smollm2.toml). About 40 min on 2 busy cores. Everything
# lands in runs/lens-smollm2/. Extra arguments go to `lenssteer train` (e.g. --lr 1e-3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
lenssteer=".venv/bin/lenssteer"
out=runs/lens-smollm2
common=(--model smollm2-135m-instruct --corpus instructions --languages en,de,es,fr,it --limit 300)
"$lenssteer" probe "${common[@]}" --layers=-1 --representation final_norm --out "$out/subspace" --force
"$lenssteer" train "${common[@]}" --subspace "$out/subspace" --preset scale-free --out "$out/adapter" --force "$@"
"$lenssteer" compare --config recipes/compare_lens_smollm2.toml
