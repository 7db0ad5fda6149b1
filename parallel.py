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
import signal
import threading
import types
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import recompute as rc
from model import ModelConfig, Transformer

MODES = ("ddp", "fsdp")
CKPT_FILE, PREV_FILE, DCP_DIR = "ckpt.pt", "ckpt.prev.pt", "ckpt_dcp"


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
        raw = rc.apply(Transformer(mcfg), *recompute, compile=compile)
    if parallel == "fsdp":
        # A block returns its lanes, some of them views (unflatten); nothing modifies them in place (Eq. 6 is an
        # out-of-place addcmul), which is all FSDP2's warning asks.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
        if compile:
            compile_regions(raw)  # before sharding (as torchtitan does)
        for block in raw.blocks:
            fully_shard(block, mp_policy=mp)
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
    compiled here."""
    if getattr(raw, "recompute", ("none",))[0] not in ("crnet", "reversible"):
        for block in raw.blocks:
            block.compile()
    # bound to raw as methods (not closures over it), so that copy.deepcopy rebinds them to the copy
    raw.embed, raw.head = (types.MethodType(torch.compile(getattr(Transformer, f)), raw) for f in ("embed", "head"))
    return raw


def gradient_sync(model, parallel, sync):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


def clip_grad_norm(params, max_norm):
    """The global gradient norm (over all shards under FSDP), clipping to max_norm; returns it as a 0-d tensor on
    the device (no host sync here: train.py reads it together with the loss)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-shard norms are partial sums
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


# ----------------------------------------------------------------------------- checkpoints
# Both formats hold the same state dicts (torch.distributed.checkpoint.state_dict's: parameter names as keys, for
# the optimizer too), so a run resumes in either mode from either format: DCP reshards to any layout, and a full
# ckpt.pt is split into shards by set_state_dict. Each save keeps the previous checkpoint beside the new one
# (ckpt.prev.pt, or the previous iter_ directory): a latest file damaged after the fact falls back to it. Once a
# save has completed, the latest name never vanishes (a job script tests for it to choose between start and resume):
# ckpt.pt is linked to ckpt.prev.pt before the new file replaces it; an iter_ directory saved again at the same
# iteration is renamed iter_N.old (still listed) until the new one is in place.
TRAIN_KEYS = ("iter", "config", "model_config", "rng", "best_val_loss")  # what makes a checkpoint one of ours


class CheckpointError(ValueError):
    def __init__(self, message, damaged=True):
        super().__init__(message)
        self.damaged = damaged  # False: unreadable now (an OS error, no memory), not shown to be broken


def checkpoints(out):
    """Every checkpoint in out, newest first: ("ddp", file) and ("fsdp", DCP directory). A DCP directory gets its
    iter_ name only when complete; a ckpt.pt only when torch.save has finished (written as .tmp, then renamed).
    Within a format the order is by name (ckpt.pt, then ckpt.prev.pt; iter_ numbers, highest first), which a
    copy keeps; only between formats (a run that changed mode) does mtime decide the order."""
    out = Path(out)
    ddp = [("ddp", out / f) for f in (CKPT_FILE, PREV_FILE) if (out / f).is_file()]
    root = out / DCP_DIR
    dirs = {p.name for p in root.glob("iter_*") if p.is_dir()} if root.is_dir() else set()
    names = [n for n in dirs if n[5:].isdigit() or (n.endswith(".old") and n[5:-4].isdigit() and n[:-4] not in dirs)]
    fsdp = [("fsdp", root / n) for n in sorted(names, key=lambda n: int(n[5:].removesuffix(".old")), reverse=True)]
    if not (ddp and fsdp):
        return ddp + fsdp
    slots = sorted(ddp + fsdp, key=lambda kp: kp[1].stat().st_mtime_ns, reverse=True)  # which format, when
    queues = {"ddp": iter(ddp), "fsdp": iter(fsdp)}
    return [next(queues[kind]) for kind, _ in slots]  # each format's slots filled in its name order


def find_checkpoint(out):
    """The newest (kind, path), or (None, None); not opened (see open_checkpoint)."""
    return next(iter(checkpoints(out)), (None, None))


def read_checkpoint(kind, path):
    """The checkpoint's train state (a ckpt.pt's weights too, memory-mapped), or CheckpointError saying why not."""
    try:
        if kind == "fsdp":  # every shard file the metadata names must be there, whole
            meta = dcp.FileSystemReader(str(path)).read_metadata()
            for info in meta.storage_data.values():
                f = path / info.relative_path
                if not f.is_file() or f.stat().st_size < info.offset + info.length:
                    raise CheckpointError(f"shard {f.name} is missing or truncated")
        # mmap: every DDP rank reads the file, and a 7B ckpt.pt is tens of GB; pages load only where touched
        ckpt = torch.load(path if kind == "ddp" else path / "train_state.pt", map_location="cpu", weights_only=True,
                          mmap=kind == "ddp")
    except CheckpointError:
        raise
    except Exception as e:  # torch's zip reader, pickle, EOF, os errors: all mean "cannot be read"
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'empty'}"
        raise CheckpointError(f"cannot be read ({why})", damaged=not isinstance(e, (OSError, MemoryError))) from None
    missing = [k for k in TRAIN_KEYS + (("model", "optimizer") if kind == "ddp" else ()) if k not in (ckpt if isinstance(ckpt, dict) else {})]
    if missing:
        raise CheckpointError(f"is not a train.py checkpoint (no {', '.join(map(repr, missing))})")
    return {**ckpt, "kind": kind, "path": path}


def load_train_state(out, say=print):
    """The newest readable checkpoint's train state: config, iteration, RNG states... (a ckpt.pt's weights too).
    A damaged newer one is skipped with a note and listed in the state's "damaged" (see set_aside); none readable
    is an error naming every file and why."""
    tried = []
    for kind, path in checkpoints(out):
        try:
            ckpt = read_checkpoint(kind, path)
        except CheckpointError as e:
            tried.append((path, e))
            continue
        for bad, why in tried:
            say(f"note: checkpoint {bad} {why}; falling back to {path} (iteration {ckpt['iter']})")
        return {**ckpt, "damaged": [bad for bad, why in tried if why.damaged]}
    if not tried:
        raise FileNotFoundError(f"no checkpoint in {out} (neither {CKPT_FILE} nor {DCP_DIR}/iter_*)")
    raise CheckpointError("no readable checkpoint: " + "; ".join(f"{p} {e}" for p, e in tried) + ". Restore the "
                          "file, or start over with --init_from=scratch --overwrite")


def set_aside(damaged, out, say=print):
    """A resumed run (rank 0, once every check has passed) renames the damaged checkpoints it fell back past to
    out/<name>.damaged: kept for inspection, but out of the rotation, so that the next save cannot keep a
    damaged file as its fallback."""
    for bad in damaged:
        aside = Path(out) / f"{bad.name}.damaged"
        try:
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink(missing_ok=True)
            os.replace(bad, aside)
            say(f"note: moved the damaged {bad} to {aside}")
        except OSError as e:  # a read-only directory, say: the run goes on, and prune removes it later
            say(f"note: could not move the damaged {bad} aside ({e})")


def load_weights(ckpt, model, optimizer=None):
    """Fill model (and optimizer) from a checkpoint of either format, whatever the current mode and process count."""
    # the model's own (sharded or not) state dicts, AdamW's state created so that loading can fill it
    msd, osd = get_state_dict(model, optimizer) if optimizer else (get_model_state_dict(model), None)
    if ckpt["kind"] == "fsdp":
        state = {"model": msd, **({"optimizer": osd} if optimizer else {})}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=ckpt["path"], no_dist=not dist.is_initialized())  # reshards to this layout
        msd, osd, opts = state["model"], state.get("optimizer"), None
    else:  # full tensors: under FSDP each process keeps its shard
        msd, osd, opts = ckpt["model"], ckpt["optimizer"], StateDictOptions(full_state_dict=True)
        if optimizer and any(isinstance(k, int) for k in osd["state"]):
            osd = named_optimizer_state(model, optimizer, osd)
    if optimizer:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)
    else:
        set_model_state_dict(model, msd, options=opts)


def named_optimizer_state(model, optimizer, osd):
    """An optimizer.state_dict() (parameters numbered 0, 1, ... in param_groups order, as ckpt.pt files written
    before both formats shared one layout hold them) keyed by parameter names instead, as set_state_dict wants.
    The numbering is the order configure_optimizers puts parameters in, which this version keeps."""
    names = {p: n for n, p in model.named_parameters()}
    sizes = [(len(g["params"]), len(h["params"])) for g, h in zip(osd["param_groups"], optimizer.param_groups)]
    if len(osd["param_groups"]) != len(optimizer.param_groups) or any(a != b for a, b in sizes):
        raise CheckpointError(f"holds optimizer groups of {[a for a, _ in sizes]} parameters, the optimizer has "
                              f"{[len(g['params']) for g in optimizer.param_groups]}: written by another version")
    fqn = {i: names[p] for g, h in zip(osd["param_groups"], optimizer.param_groups) for i, p in zip(g["params"], h["params"])}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for i, state in osd["state"].items():
        if "exp_avg" in state and state["exp_avg"].shape != shapes[fqn[i]]:
            raise CheckpointError(f"holds optimizer state of shape {tuple(state['exp_avg'].shape)} for {fqn[i]}, "
                                  f"which has {tuple(shapes[fqn[i]])}: written by another version")
    return {"state": {fqn[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in osd["param_groups"]]}


def save_checkpoint(out, parallel, model, optimizer, train_state, rank, best=False):
    """Atomic in both modes: a kill at any instant leaves the last good checkpoint readable. Once the new one is
    complete, the one before it stays as the fallback and older ones (and the other format's) are removed.
    best=True also links it as out/best/, the best-val checkpoint."""
    out = Path(out)
    msd, osd = get_state_dict(model, optimizer)
    if parallel == "ddp":
        final = out / CKPT_FILE
        if rank == 0:
            tmp = out / (CKPT_FILE + ".tmp")
            torch.save({"model": msd, "optimizer": osd, **train_state}, tmp)
            if final.exists():  # ckpt.pt keeps its name throughout: linked (or copied) to ckpt.prev.pt, then replaced
                prev_tmp = out / (PREV_FILE + ".tmp")
                prev_tmp.unlink(missing_ok=True)
                link_or_copy(final, prev_tmp)
                os.replace(prev_tmp, out / PREV_FILE)
            os.replace(tmp, final)
            prune(out, final)
    else:
        root = out / DCP_DIR
        final = root / f"iter_{train_state['iter']:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        dist.barrier()
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)  # returns once every process has written
        if rank == 0:
            torch.save(train_state, tmp / "train_state.pt")
            if final.exists():  # the same iteration saved again: iter_N.old is listed until the new one is in
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            prune(out, final)
    if best and rank == 0:
        link_best(final, out / "best")
    if dist.is_initialized():
        dist.barrier()
    return final


class StopSignals:
    """SIGTERM and SIGUSR1 (a cluster's notice before it kills a job) and Ctrl-C (SIGINT) ask a run to stop: the
    handler only records the first one, so the step in progress and the save that follows finish (a save must not
    be cut short; a repeated signal, which torchrun adds to Ctrl-C, is ignored). train.py reduces the flag across
    ranks with the step's loss, so every rank stops and saves at the same iteration."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum, self.old = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers only there
            self.old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def prune(out, final):
    """Keep the new checkpoint and the newest one before it (of either format: the fallback); remove the rest,
    with anything an interrupted save left in the DCP directory."""
    keep = {final, *[p for _, p in checkpoints(out) if p != final][:1]}
    for f in (CKPT_FILE, PREV_FILE, PREV_FILE + ".tmp"):
        if out / f not in keep:
            (out / f).unlink(missing_ok=True)
    root = out / DCP_DIR
    for p in (root.iterdir() if root.is_dir() else ()):
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def link_best(src, best):
    """best/ holds hard links to the checkpoint's files (no copy; later saves replace names, not these files), or
    copies where the file system has no hard links. Built as best.tmp/; the old best/ is renamed to best.old/
    until the new one is in place, and restored from there if a kill came between the two renames."""
    tmp, old = best.with_name(best.name + ".tmp"), best.with_name(best.name + ".old")
    recover_best(best.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    dst = tmp / (src.relative_to(best.parent) if src.is_dir() else src.name)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(out):
    """A kill between link_best's two renames leaves best.old/ and no best/: put it back (a resumed run does)."""
    best, old = Path(out) / "best", Path(out) / "best.old"
    if old.is_dir() and not best.exists():
        os.replace(old, best)


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (some network and FAT file systems), or another device
        shutil.copy2(src, dst)


def remove_run(out):
    """A run started over (--overwrite) removes the old run's checkpoints and best/ once every check has passed,
    so that nothing of the old run can be resumed or fallen back to."""
    out = Path(out)
    for name in (CKPT_FILE, PREV_FILE, CKPT_FILE + ".tmp", PREV_FILE + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for name in (DCP_DIR, "best", "best.tmp", "best.old"):
        shutil.rmtree(out / name, ignore_errors=True)


def load_for_inference(out, **overrides):
    """(model on the CPU in eval mode, train state) from either checkpoint format, without a process group."""
    ckpt = load_train_state(out)
    fields = set(ModelConfig.field_names())  # checkpoints from before recompute left ModelConfig still carry it
    model = Transformer(ModelConfig(**{k: v for k, v in {**ckpt["model_config"], **overrides}.items() if k in fields}))
    load_weights(ckpt, model)
    return model.eval(), ckpt
