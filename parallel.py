"""
Parallelism and checkpoints, applied from outside the model (model.py knows nothing of them).

  parallel = "ddp":  every process holds the whole model and its AdamW state; DistributedDataParallel
                     all-reduces the gradients. Checkpoint: one file, out_dir/ckpt.pt, written by rank 0.
  parallel = "fsdp": FSDP2 (torch.distributed.fsdp.fully_shard) on every transformer block and at the root
                     (embeddings, final norm, head). Each process keeps 1/N of every parameter, gradient and
                     AdamW moment; a block's parameters are all-gathered for its forward and again for its
                     backward, then freed. CR-Net recomputation composes: each block's backward rebuilds its
                     own input lanes with its own parameters (recompute.py). On CUDA with dtype=bfloat16 the
                     gathered parameters are bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy).
                     Checkpoint: a torch.distributed.checkpoint directory out_dir/ckpt_dcp/iter_XXXXXXX/, one
                     file per process, loadable on any number of processes.

Both modes build the model on the meta device and draw every full parameter tensor, in a fixed order, from
one seeded CPU generator; each process keeps its own shard. So every mode and process count starts from
bit-identical weights, and a 7B model is never materialized whole on one process (one tensor at a time).
"""
import os
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import recompute as rc
from model import ModelConfig, Transformer

MODES = ("ddp", "fsdp")
CKPT_FILE, DCP_DIR = "ckpt.pt", "ckpt_dcp"


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


def build_model(mcfg, parallel, device, seed, mixed_precision=False, compile=False, recompute=("none", 8)):
    """(model to call, raw model to checkpoint). raw is the Transformer itself: for FSDP it is sharded in place.
    Applied from outside, in this order: recomputation (recompute.apply), compile, then DDP or FSDP2."""
    if parallel not in MODES:
        raise ValueError(f"parallel={parallel!r} must be one of {MODES}")
    with torch.device("meta"):
        raw = rc.apply(Transformer(mcfg), *recompute)
    if parallel == "fsdp":
        # A block returns its lanes, some of them views (unflatten); nothing modifies them in place (Eq. 6 is an
        # out-of-place addcmul), which is all FSDP2's warning asks.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
        for block in raw.blocks:
            if compile:
                block.compile()  # per block, before sharding (as torchtitan does)
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
        return materialize(raw, device, seed), raw
    materialize(raw, device, seed)
    model = torch.compile(raw) if compile else raw
    if dist.is_initialized() and dist.get_world_size() > 1:
        # bucket views: the gradients live in DDP's buckets, not in a second copy (the planner counts one)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model, raw


def gradient_sync(model, parallel, sync):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


def clip_grad_norm(params, max_norm):
    """The global gradient norm (over all shards under FSDP), clipping to max_norm; returns a float."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-shard norms are partial sums
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total.item()


# ----------------------------------------------------------------------------- checkpoints
def dcp_checkpoints(out):
    """Complete sharded checkpoints, oldest first: a directory gets its final name only when fully written."""
    root = Path(out) / DCP_DIR
    return sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()) if root.is_dir() else []


def find_checkpoint(out):
    """("ddp", out/ckpt.pt) or ("fsdp", newest DCP directory), or (None, None)."""
    newest = dcp_checkpoints(out)
    if (Path(out) / CKPT_FILE).is_file():
        if newest:
            raise ValueError(f"{out} holds both {CKPT_FILE} and {DCP_DIR}/: remove the one you do not want to resume")
        return "ddp", Path(out) / CKPT_FILE
    return ("fsdp", newest[-1]) if newest else (None, None)


def load_train_state(out, parallel=None):
    """Everything but the weights: config, iteration, RNG states... (for DDP the weights come along). parallel:
    the mode about to resume it (None: whichever wrote it)."""
    kind, path = find_checkpoint(out)
    if kind is None:
        raise FileNotFoundError(f"init_from='resume': no checkpoint in {out} (neither {CKPT_FILE} nor {DCP_DIR}/iter_*)")
    if parallel is not None and kind != parallel:
        raise ValueError(f"{path} was written with parallel={kind!r}: resume it with --parallel={kind}")
    # mmap: every DDP rank reads the file, and a 7B ckpt.pt is tens of GB; pages load only where touched
    return torch.load(path if kind == "ddp" else path / "train_state.pt", map_location="cpu", weights_only=False,
                      mmap=kind == "ddp")


def load_weights(out, parallel, ckpt, model, optimizer):
    if parallel == "ddp":
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    msd, osd = get_state_dict(model, optimizer)  # sharded; creates AdamW's state so it can be filled
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=find_checkpoint(out)[1])  # reshards to this process count
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(out, parallel, model, optimizer, train_state, rank):
    """Atomic in both modes: an interrupted save leaves the last good checkpoint as it was."""
    out = Path(out)
    if parallel == "ddp":
        if rank == 0:
            path, tmp = out / CKPT_FILE, out / (CKPT_FILE + ".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}, tmp)
            os.replace(tmp, path)
        return
    root = out / DCP_DIR
    final = root / f"iter_{train_state['iter']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)  # returns once every process has written
    if rank == 0:
        torch.save(train_state, tmp / "train_state.pt")
        if final.exists():  # the same iteration saved again: set the old copy aside until the new one is in
            os.replace(final, final.with_name(final.name + ".old"))
        os.replace(tmp, final)
        for p in root.iterdir():
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()


def load_for_inference(out, **overrides):
    """(model on the CPU in eval mode, train state) from either checkpoint format, without a process group."""
    kind, path = find_checkpoint(out)
    if kind is None:
        raise FileNotFoundError(f"no checkpoint in {out} (neither {CKPT_FILE} nor {DCP_DIR}/iter_*)")
    ckpt = load_train_state(out, kind)
    fields = set(ModelConfig.field_names())  # checkpoints from before recompute left ModelConfig still carry it
    model = Transformer(ModelConfig(**{k: v for k, v in {**ckpt["model_config"], **overrides}.items() if k in fields}))
    if kind == "ddp":
        model.load_state_dict(ckpt["model"])
    else:
        state = {"model": model.state_dict()}  # aliases the parameters, so loading fills the model
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=True)
    return model.eval(), ckpt
