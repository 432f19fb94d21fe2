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
