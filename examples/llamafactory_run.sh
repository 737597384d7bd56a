#!/usr/bin/env bash
# LLaMA-Factory under the resumekit supervisor: restarts after crashes and preemption, each time from the newest
# *valid* checkpoint. Replaces the hand-written resume.py step of the usual ModelArts recipe.
#
# Before every start `resumekit run --config` rewrites resume_from_checkpoint in the YAML (comments kept, atomic
# write): the newest checkpoint-N under output_dir that validates, or null for a fresh start. A checkpoint-N left
# half-written by a kill is moved into output_dir/quarantine/ first (never deleted): LLaMA-Factory / the HF Trainer
# take the highest N when the value is null, so after that null really means "from scratch".
# LLaMA-Factory does not expand ${train_output}: the YAML the job reads has output_dir and resume_from_checkpoint
# written out as paths (an unset train_output stops the run with one line naming the key). When the run ends the
# YAML is put back exactly as it was, so a later plain `llamafactory-cli train` does not silently resume.
set -euo pipefail

export train_output=${train_output:-/home/ma-user/modelarts/outputs/train_output_0}
CONFIG=${CONFIG:-examples/llamafactory_sft.yaml}

resumekit run --layout llamafactory --config "$CONFIG" --max-restarts 20 --grace 120 \
    -- llamafactory-cli train "$CONFIG"

# One-shot equivalents, e.g. inside an existing launcher:
#   resumekit resolve "$CONFIG" --json          # rewrite resume_from_checkpoint now (exit 1: nothing valid yet)
#   resumekit latest "$train_output" --layout llamafactory
#   resumekit ls "$train_output" --layout llamafactory
