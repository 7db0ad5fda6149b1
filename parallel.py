"""
Where a run executes: processes, devices, precision, and the parallelism and compilation applied to the model from
outside (model.py knows nothing of them). Checkpoints are checkpoint.py's.

  data_parallel = "ddp":  every process holds the whole model and its AdamW state; DistributedDataParallel
                     all-reduces the gradients.
  data_parallel = "fsdp": FSDP2 (torch.distributed.fsdp.fully_shard) on every transformer block and at the root
                     (embeddings, final norm, head). Each process keeps 1/N of every parameter, gradient and
                     AdamW moment; a block's parameters are all-gathered for its forward and again for its
                     backward, then freed. CR-Net recomputation composes: each block's backward rebuilds its
                     own input lanes with its own parameters (recompute.py). With dtype=bfloat16 the gathered
                     parameters are bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy); a block's
                     inputs are not cast, so the float32 lanes that recompute inverts stay float32, and so does
                     the residual stream (Transformer.embed): on bf16-rounded weights the loss is DDP's, bit
                     for bit (tests/test_reversible.py).

Both modes build the model on the meta device and draw every full parameter tensor, in a fixed order, from
one seeded CPU generator; each process keeps its own shard. So every mode and process count starts from
bit-identical weights; under FSDP a 7B model is never materialized whole on one process (one tensor at a time).
"""
import os
import re
import resource
import sys
import types
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import recompute as rc
from configurator import ConfigError
from model import Transformer

MODES = ("ddp", "fsdp")


@torch.no_grad()
def materialize(model, device, seed):
    """Allocate a meta-device (possibly sharded) model on `device` and initialize it: every parameter's full
    value is drawn on the CPU from one generator in Transformer.init_order, and this process keeps its shard."""
    model.to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    for name in model.init_order():
        p = params[name]
        full = torch.empty(p.shape, dtype=p.dtype)  # a DTensor's shape is the global one
        model.init_tensor(name, full, g)
        full = full.to(device)
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)  # no communication
        p.copy_(full)
    model.reset_buffers()
    return model


def build_model(mcfg, data_parallel, device, seed, mixed_precision=False, compile=False, recompute=("none", 8)):
    """(model to call, raw model to checkpoint). raw is the Transformer itself: for FSDP it is sharded in place.
    Applied from outside, in this order: recomputation (recompute.apply), compile, then DDP or FSDP2."""
    if data_parallel not in MODES:
        raise ValueError(f"data_parallel={data_parallel!r} must be one of {MODES}")
    with torch.device("meta"):
        raw = rc.apply(Transformer(mcfg), *recompute, compile=compile)
    if data_parallel == "fsdp":
        # A block returns its lanes, some of them views (unflatten); nothing modifies them in place (Eq. 6 is an
        # out-of-place addcmul), which is all FSDP2's warning asks.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
        # Blocks take their inputs as given, as under DDP, not cast to param_dtype: the float32 lanes recompute.apply
        # asks for under crnet and reversible must stay float32 (inverting Eq. 6 grows a bf16 lane's rounding by
        # 1/|s| per rebuilt layer), and so must x, float32 under autocast from the embedding on; the float32 RoPE tables
        # are cast in apply_rope (inductor may fuse that cast away: compiled RoPE then rounds less). Autocast still
        # runs the matmuls in bf16.
        block_mp = MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False)
        if compile:
            compile_regions(raw)  # before sharding (as torchtitan does)
        for block in raw.blocks:
            fully_shard(block, mp_policy=block_mp)
        fully_shard(raw, mp_policy=mp)
        return materialize(raw, device, seed), raw
    materialize(raw, device, seed)
    model = compile_regions(raw) if compile else raw
    if dist.is_initialized() and dist.get_world_size() > 1:
        # bucket views: the gradients live in DDP's buckets, not in a second copy (the planner counts one)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model, raw


def compile_regions(raw):
    """torch.compile per region, as torchtitan does: each block, the embedding and the head. Identical blocks share
    one graph (dynamo reuses it across modules of one kind), so a 24-layer model compiles about as fast as a
    2-layer one. Under crnet and reversible recompute the blocks run an autograd Function that no compile can
    trace; recompute.apply(..., compile=True) compiles its bodies instead, and only embedding and head are
    compiled here. Shapes are static: layer 2's input lanes (views of layer 1's X W) have other strides than the
    later layers' lanes, and dynamo would otherwise make the strides of the graph for layers 3..L symbolic."""
    if getattr(raw, "recompute", ("none",))[0] not in ("crnet", "reversible"):
        for block in raw.blocks:
            block.compile(dynamic=False)
    # bound to raw as methods (not closures over it), so that copy.deepcopy rebinds them to the copy
    raw.embed, raw.head = (types.MethodType(torch.compile(getattr(Transformer, f), dynamic=False), raw)
                           for f in ("embed", "head"))
    return raw


def gradient_sync(model, data_parallel, sync):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
    if data_parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


def clip_grad_norm(params, max_norm):
    """The global gradient norm (over all shards under FSDP), clipping to max_norm; returns it as a 0-d tensor on
    the device (no host sync here: train.py reads it together with the loss)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # replicated already (the norm reduces over shards): a plain tensor for the log
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


# ----------------------------------------------------------------------------- processes and devices
def setup(c):
    """Processes, device, threads and precision: everything that depends on where this process runs. rt["proc"] is
    this process's index (torch.distributed's rank: not CR-Net's rank r), rt["world"] the number of processes."""
    proc, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(c["device"], local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend)
    elif c["data_parallel"] == "fsdp":  # FSDP2 needs a process group even for one process (e.g. resuming on one GPU)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    threads = c["cpu_threads"] or max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    dtype = c["dtype"] if c["dtype"] != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    say = (lambda *a: print(*a, flush=True)) if proc == 0 else (lambda *a: None)  # flushed: a redirected log grows live
    return dict(proc=proc, world=world, device=device, dtype=dtype, autocast=autocast, threads=threads, say=say)


def pick_device(name, local):
    """"auto" is cuda, else mps (Apple silicon), else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local}"
    return torch.device(name)


def check_device(dev, preflight=False, cpu_threads=0):
    if dev not in ("auto", "cpu", "cuda", "mps") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError("device", dev, "must be auto, cpu, cuda, cuda:N or mps")
    if preflight:
        return  # the machines that train may have it
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", dev, "CUDA is not available here (no GPU, or a CPU build of torch)")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", dev, "the Apple GPU (mps) is not available here")
    if cpu_threads > (os.cpu_count() or 1):  # never faster, and far more kill the process in OpenMP without a word
        raise ConfigError("cpu_threads", cpu_threads, f"is more than this machine's {os.cpu_count()} CPUs")


def peak_memory_mb(device):
    """Peak memory of this process: CUDA's max_memory_allocated; on MPS the Metal driver's current allocation
    (torch.mps keeps no peak); on the CPU the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # macOS reports bytes, Linux KiB


def close():
    """End the process group (train.py's last call)."""
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the checkpoint: gloo aborts if a peer tears down first
        dist.destroy_process_group()


# Dense bf16 (V100, T4: fp16, which have no bf16) tensor-core peak FLOP/s from vendor datasheets, matched against torch.cuda.get_device_name()
# as whole words (so "L4" is not an "L40"), the longest matching key winning ("H100 PCIe" beats "H100"). Not listed:
# pass peak_flops explicitly.
PEAK_FLOPS = {
    "H200": 989e12, "H200 NVL": 835e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100S": 130e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops_for(device_name):
    keys = [k for k in PEAK_FLOPS if re.search(rf"(?<![a-z0-9]){re.escape(k.lower())}(?![a-z0-9])", (device_name or "").lower())]
    return PEAK_FLOPS[max(keys, key=len)] if keys else None


def estimate_mfu(flops_per_token, tokens_per_s, peak_flops):
    """Model FLOPs utilization in [0, 1], or None where the peak is unknown (e.g. CPU)."""
    return None if not peak_flops else flops_per_token * tokens_per_s / peak_flops
