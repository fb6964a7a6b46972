#!/usr/bin/env bash
# The whole RLHF example on the default model: SFT -> reward model -> RL and DPO from the SFT adapter
# -> comparison on 500 held-out prompts. Run from the repository root:  bash examples/rlhf/run.sh
# Each step resumes if it was interrupted (rerun the script); outputs go to runs/rlhf/.
set -euo pipefail
TS=${TUNESMITH:-.venv/bin/tunesmith}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # measured with one thread per process on a shared 2-core machine
for step in sft reward rl dpo; do
  if [ -f "runs/rlhf/$step/summary.json" ]; then echo "== $step: done already"; continue; fi
  flag=""; [ -f "runs/rlhf/$step/recipe.yaml" ] && flag="--resume"
  echo "== $step"; start=$SECONDS
  $TS train "examples/rlhf/$step.yaml" $flag
  echo "$step took $((SECONDS - start)) s"
done
start=$SECONDS
.venv/bin/python examples/rlhf/compare.py
echo "compare took $((SECONDS - start)) s"
