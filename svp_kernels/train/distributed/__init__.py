"""Layer-parallel (pipeline) and data-parallel SVP training over torch.distributed.

Pipeline (``--stages K``): the blocks are split into K contiguous stages, one process each. Stage s receives
(h, v_prev, targets) of batch t from stage s − 1, trains its blocks on it with ``train_block`` and sends
(h_out, v_out, targets) on; no gradient ever crosses a stage. That is the sequential trainer's computation
in another order (each block's dropout seed is block_step_seed(run seed, block, step)), so with the same
device type and thread count the parameters after any number of steps are bit-identical to ``svp-train``
without ``--stages``. A stage keeps at most ``max_in_flight`` unfinished sends, so a slow stage
back-pressures its predecessors instead of growing their memory; it receives batch t + 1 while it computes
batch t. Unless given, the split balances the blocks' measured step times.

Data parallel (``--data-parallel N`` or torchrun without ``--stages``): every rank holds the whole model and
trains each global batch (``--batch-size``) on its contiguous 1/N share of the rows. The SVP loss couples a
batch through its B×B similarity Gram, so each block all-gathers the (B/N, C) projections v of all ranks
and evaluates the global loss with only its own rows differentiable; one bucketed all_reduce (sum) of the
block's gradients then gives every rank the global-batch gradient before the block's step. Matches a single
process to float32 rounding, except BatchNorm, whose batch statistics are per rank (running statistics are
broadcast from rank 0 before each evaluation).

Both (``--stages K --data-parallel N``): a K × N grid; rank r · K + s trains stage s as replica r. Each stage
trains its blocks as the data-parallel mode does, within the process group of its N replicas, on the share
of every batch that replica r of stage 0 takes; the messages carry the replica's rows of h and the whole
batch's v and targets. Bit-identical to data parallel with N ranks, as the pipeline is to one process.

Backprop (``--method bp --data-parallel N``): the same model trained end to end through torch's
DistributedDataParallel, each rank on its share of every global batch (backprop.py); it matches one process to
float32 rounding. It has no pipeline mode (its gradient crosses every stage).

Every mode logs its evaluations on the training clock (``--eval-every N``: svp_kernels/train/evaluations.py)
and counts the bytes each process hands to torch.distributed (traffic.py).

Processes are started here (torch.multiprocessing, spawn) or by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in
the environment). gloo on CPU, nccl on CUDA (one GPU per process). A process that raises or dies makes the
others exit within ``timeout`` seconds with an error naming it; children die with their parent.

Checkpoints (``checkpoint_dir``): after every epoch each process atomically writes rank-<r>-epoch-<e>.pt
(its blocks' parameters and buffers, their optimizer states and local losses, step, epoch, curves, config);
a restarted run resumes from the newest epoch that every rank has saved.

Modules, one job each: plan.py (the Plan, the CLI flags and torchrun's environment, the split of the blocks),
protocol.py (the pipeline's messages and links), pipeline.py, data_parallel.py and backprop.py (one process of
each mode), traffic.py (the bytes communicated), checkpoint.py (per-process checkpoints), launch.py (spawning,
failures, the CLI entry), common.py (what the modes share).
"""

from .backprop import BackpropReplicaStep, run_backprop_rank
from .checkpoint import CHECKPOINT_FORMAT
from .common import EVAL_BATCH, Clock, DistributedTrainingError, epoch_batches, epoch_means
from .data_parallel import (ProcessShare, ReplicaStep, SvpReplicaStep, data_parallel_step, run_data_parallel_rank,
                            run_replica)
from .launch import free_port, launch, pin_to_cores, train_main
from .pipeline import run_pipeline_stage
from .plan import (MODES, Plan, balanced_split, choose_split, grid_position, measured_block_costs,
                   plan_from_arguments, role, share_sizes, trainable_batch, validate)
from .protocol import EPOCH_END, EVAL, STOP, TRAIN, Inbound, Message, Outbound
from .traffic import Traffic, counting, os_bytes_written

__all__ = ["BackpropReplicaStep", "CHECKPOINT_FORMAT", "EPOCH_END", "EVAL", "EVAL_BATCH", "MODES", "STOP", "TRAIN",
           "Clock", "DistributedTrainingError", "Inbound", "Message", "Outbound", "Plan", "ProcessShare",
           "ReplicaStep", "SvpReplicaStep", "Traffic", "balanced_split", "choose_split", "counting",
           "data_parallel_step", "epoch_batches", "epoch_means", "free_port", "grid_position", "launch",
           "measured_block_costs", "os_bytes_written", "pin_to_cores", "plan_from_arguments", "role",
           "run_backprop_rank", "run_data_parallel_rank", "run_pipeline_stage", "run_replica", "share_sizes",
           "trainable_batch", "train_main", "validate"]
