#!/usr/bin/env bash
# The Lens adapter for the default bundled model, Qwen2.5-Coder-0.5B-Instruct (docs/lens-study.md;
# issue 15 item 5). This model is at chance on every scored task in English too (no English
# advantage to transfer), but about 1 in 10 of its answers to target-language verse prompts comes
# out in another language: fidelity is what an adapter can gain here, without costing anything else.
#   1. probes at the final norm (layer 23) on the parallel instruction prompts (300 items x en de es
#      fr it): subspaces/qwen2.5-coder-0.5b-instruct-instructions-final-norm;
#   2. recipes/tune_lens.py trains two variations of the `instructions` preset (the settings
#      SmolLM2's dev items chose: scale-free units, push 3, retain 2, no pull, alpha 0.3, LoRA r=8 on
#      the top 2 layers, 4 epochs) in bfloat16 and scores them on dev items
#      (recipes/tune_lens_qwen0.5b.toml: verse prompts, held-out verses, multiemo reviews; never a
#      scored item). The preset itself, carried over from SmolLM2, had cost the target text's
#      likelihood, multiemo and retrieval on the scored items (docs/lens-study.md), so the
#      variations lower push (weight 1) and the push strength (alpha 0.1). The rule chose neither
#      (alpha 0.1 broke the likelihood limit by 0.0007 nats/byte and English fidelity by one answer
#      of 40); configuration 1 (alpha 0.1), the nearest, was shipped by hand (--ship-config 1;
#      tune.json records it) and scored; it lowered multiemo (docs/lens-study.md);
#   3. three variations of alpha 0.1 on the same dev items (alpha 0.05; one trained layer; LoRA
#      rank 4). The rule chose none again (each with a fidelity gain lowered the target text's
#      likelihood by more than 0.005 nats/byte); rank 4, the only one with a dev fidelity gain
#      excluding zero and no accuracy lower, is shipped by hand (--ship-config 2) to
#      checkpoints/qwen2.5-coder-0.5b-instruct-lens, recording step 2's dev items as well
#      (--earlier-selection);
#   4. the powered comparison (recipes/compare_full_qwen2.5-coder-0.5b-instruct.toml).
# Wall time on 2 cores: probe 6 min, training 8-10 min per configuration (15 on 1 thread), dev
# scoring 6-10 min, comparison about 22-27 min (its report header has the exact figure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
lenssteer=".venv/bin/lenssteer"
model=qwen2.5-coder-0.5b-instruct
subspace=subspaces/$model-instructions-final-norm
"$lenssteer" probe --model "$model" --corpus instructions --languages en,de,es,fr,it --limit 300 \
  --layers=-1 --representation final_norm --out "$subspace" --force
.venv/bin/python recipes/tune_lens.py --preset instructions --model "$model" --subspace "$subspace" \
  --corpus instructions --languages en,de,es,fr,it --limit 300 --train-dtype bfloat16 \
  --configs '[{"push_weight": 1}, {"alpha": 0.1}]' \
  --dev-config recipes/tune_lens_qwen0.5b.toml \
  --scored-config "recipes/compare_full_$model.toml" \
  --out runs/lens-qwen0.5b/tune --ship runs/lens-qwen0.5b/tune/chosen --ship-config 1
.venv/bin/python recipes/tune_lens.py --preset instructions --model "$model" --subspace "$subspace" \
  --corpus instructions --languages en,de,es,fr,it --limit 300 --train-dtype bfloat16 \
  --configs '[{"alpha": 0.05}, {"alpha": 0.1, "n_layers": 1}, {"alpha": 0.1, "lora_rank": 4}]' \
  --dev-config recipes/tune_lens_qwen0.5b.toml \
  --scored-config "recipes/compare_full_$model.toml" --out runs/lens-qwen0.5b/tune2 \
  --ship "checkpoints/$model-lens" --ship-config 2 --earlier-selection runs/lens-qwen0.5b/tune/chosen
"$lenssteer" compare --config "recipes/compare_full_$model.toml"
