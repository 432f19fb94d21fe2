"""The distill stage: short recovery of a pruned model from its dense teacher, masks frozen.

Student = the artifact's sparse weights; teacher = its dense twin (`dense.safetensors`, same channel
order) or any model source. Loss (method section 8):

    a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - a) * CE(labels, label smoothing)

Masks never change: gradients of pruned weights are zeroed before every optimizer step and the masks
are re-applied after it; at the end every masked layer must still be exactly its N:M pattern with the
zero set equal to the mask, or no artifact is written. Runs single-process or under `torchrun`
(DistributedDataParallel; gloo on CPU, nccl on CUDA). Each epoch is checkpointed beside the output
folder (`.distill-ckpt-<name>/`) so an interrupted run resumes from its last finished epoch.

`stage.py` runs it; `config.py` (the config, the paper's defaults, resolved settings), `teacher.py`,
`datasets.py` (training data, top-1), `train.py` (loss, optimizer, step, epoch), `masks.py` (frozen
masks and their check), `checkpoint.py`, `distributed.py` (device, torchrun) and `artifact.py` (the
output folder) hold the parts.
"""

from mpdeploy.distill.artifact import DUMP_ENV, state_hash, write_artifact
from mpdeploy.distill.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from mpdeploy.distill.config import (
    DEFAULT_OUT,
    KIND,
    MAX_LR_SCALE,
    OPTIMIZERS,
    PAPER_LR,
    PAPER_STEPS,
    RUN_ONLY_FIELDS,
    SGD_MOMENTUM,
    WEIGHT_DECAY,
    DistillConfig,
    default_lr,
    default_out,
    default_optimizer,
    reuse_config,
)
from mpdeploy.distill.datasets import evaluate
from mpdeploy.distill.masks import verify_masks, zero_masked_grads
from mpdeploy.distill.stage import distill
from mpdeploy.distill.train import Progress, kd_loss

__all__ = [
    "DEFAULT_OUT", "DUMP_ENV", "KIND", "MAX_LR_SCALE", "OPTIMIZERS", "PAPER_LR", "PAPER_STEPS", "RUN_ONLY_FIELDS",
    "SGD_MOMENTUM", "WEIGHT_DECAY", "DistillConfig", "Progress", "checkpoint_dir", "default_lr", "default_out",
    "distill", "evaluate", "default_optimizer", "kd_loss",
    "load_checkpoint", "reuse_config", "save_checkpoint", "state_hash",
    "verify_masks", "write_artifact", "zero_masked_grads",
]
