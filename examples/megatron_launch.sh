#!/usr/bin/env bash
# Megatron-LM / MindSpeed-LLM pretraining under the resumekit supervisor.
#
# Megatron resumes from whatever latest_checkpointed_iteration.txt names. Before every start `resumekit run` checks
# the iter_NNNNNNN/ directories (torch_dist: metadata.json written last + .metadata + *.distcp; legacy: every
# mp_rank_* of the tensor/pipeline/expert grid with complete model_optim_rng.pt) and, when the tracker points at a
# missing or broken iteration, rewrites it to the newest valid one (the old content is kept in
# latest_checkpointed_iteration.txt.bak). --save and --load must be the same directory, as in the usual recipe.
set -euo pipefail

CKPT=${CKPT:-${train_output:-/home/ma-user/modelarts/outputs/train_output_0}}

resumekit run --dir "$CKPT" --layout megatron --max-restarts 20 --grace 180 --hang-timeout 1800 \
    -- bash pretrain.sh

# pretrain.sh is the usual launch line, e.g. (MindSpeed-LLM uses the same flags; --layout mindspeed is an alias):
#   torchrun --nproc_per_node 8 --nnodes $NNODES --node_rank $NODE_RANK \
#       --master_addr $MASTER_ADDR --master_port $MASTER_PORT pretrain_gpt.py \
#       --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
#       ... model and data flags ... \
#       --save-interval 1000 --save "$CKPT" --load "$CKPT" --ckpt-format torch_dist
#
# Without the supervisor, the same checks by hand:
#   resumekit ls "$CKPT" --layout megatron
#   resumekit repair "$CKPT" --layout megatron --dry-run
