#!/usr/bin/env bash
# The whole RLHF example on the default model: SFT -> reward model -> RL and DPO from the SFT adapter
# -> comparison on 500 held-out prompts. Run from the repository root:  bash examples/rlhf/run.sh
# Each step resumes if it was interrupted (rerun the script); outputs go to runs/rlhf/.
set -euo pipefail
TS=${TUNESMITH:-.venv/bin/tunesmith}
for step in sft reward rl dpo; do
  if [ -f "runs/rlhf/$step/summary.json" ]; then echo "== $step: done already"; continue; fi
  flag=""; [ -f "runs/rlhf/$step/recipe.yaml" ] && flag="--resume"
  echo "== $step"; /usr/bin/time -f "$step took %e s, peak RSS %M KiB" $TS train "examples/rlhf/$step.yaml" $flag
done
/usr/bin/time -f "compare took %e s" .venv/bin/python examples/rlhf/compare.py
