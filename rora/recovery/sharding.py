"""Data parallel and FSDP through accelerate: the accelerator, and what a sharded student needs beyond DDP.

`accelerate launch --config_file rora/accelerate/fsdp.yaml -m rora recover ...` shards the student (FSDP2: each
decoder layer its own unit, the embeddings, final norm and LM head the root's) and trains only its adapters; the
teacher is replicated, one frozen copy per process (see DistillLoss and the README). Under FSDP:
  * the adapter's tensors are DTensor shards: `gathered` makes them whole on every process (a collective: every
    process calls it), and the main process alone writes them;
  * code that runs the student without going through the prepared module (held-out evaluation, prose figures)
    runs inside `whole_root`, which gathers the root unit's parameters (the decoder layers gather their own);
    every process must then make the same number of forward calls;
  * a resumed optimizer's whole tensors are cut back into the parameters' shards with `shard_like`.
Without FSDP every function here is the identity.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..numerics import bfloat16_autocast


def accelerator(precision: str = "auto"):
    """The run's accelerate.Accelerator: bf16 autocast for precision 'bfloat16' and for 'auto' on a GPU, else fp32;
    data parallel or FSDP as `accelerate launch` configured it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    gpu = torch.cuda.is_available()
    mixed = "bf16" if bfloat16_autocast(precision, gpu) else "no"
    # accelerate refuses to change a process's mixed precision once an Accelerator has set it; each accelerator here
    # lives for one recovery, and one process may run recoveries of different precisions (the Python API, benchmarks)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state()
    # cpu=True on CPU-only machines: accelerate then sets up gloo data parallel under torchrun/accelerate launch.
    acc = Accelerator(mixed_precision=mixed, cpu=not gpu)
    if acc.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _cpu_fsdp(acc)
    return acc


def _cpu_fsdp(acc) -> None:
    """accelerate (1.16) turns an FSDP config into FSDP only on GPUs and other accelerators: on CPUs its state
    stays MULTI_CPU and `prepare` wraps the model in DDP, silently. torch's FSDP2 itself shards on CPU over gloo,
    and accelerate's FSDP2 preparation runs there unchanged once the state says FSDP; so a CPU run (and the
    test of this path) gets the sharding its config asked for, through the same code as a GPU run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables accelerate launch set
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def whole_root(wrapped):
    """Within it, the student can be run directly (not through `wrapped`, the prepared module): under FSDP the
    root unit's parameters are gathered, and each decoder layer's forward gathers its own."""
    if not is_sharded(wrapped):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole) cut as `like` is sharded when `like` is a DTensor of its shape; else `tensor` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and tuple(tensor.shape) == tuple(like.shape):
        return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements)
    return tensor
