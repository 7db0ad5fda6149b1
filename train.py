"""
Train a CR-Net (or baseline) transformer.

    python train.py                                   # CPU default: small CR-Net LLaMA on bundled Shakespeare
    python train.py configs/crnet_llama_60m.py --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py configs/crnet_llama_1b.py
    python train.py --out_dir=out --init_from=resume  # continue exactly where the checkpoint left off

Config: the defaults below, then config files (plain assignments) and --key=value arguments in the
order given. Unknown keys and values of the wrong type are errors. The merged config is printed and
saved to out_dir/config.json.
"""
import ast
import builtins
import difflib
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import parallel as par
from model import ModelConfig, estimate_mfu, peak_flops_for
from prepare_data import ROOT, load_meta, prepare

# ----------------------------------------------------------------------------- defaults
# The CPU default run: a 1.07M-parameter CR-Net LLaMA on byte-level Shakespeare; ~3.5 minutes on 2 CPU cores.
# I/O
out_dir = "out"
data_dir = "data/shakespeare_byte"  # prepared automatically when it is one of the bundled corpus's dirs
init_from = "scratch"               # "scratch" or "resume" (from out_dir/ckpt.pt, or the newest out_dir/ckpt_dcp/iter_*)
overwrite = False                   # scratch into an out_dir that holds a checkpoint needs this
eval_interval = 150                 # evaluate and checkpoint every this many iterations (and at the end)
eval_tokens = 131072                # fixed validation (and train) tokens per evaluation, split over ranks
log_interval = 25
seed = 1337
# model (every ModelConfig field; vocab_size None = the data's)
arch = "llama"
n_layer = 4
n_head = 4
n_embd = 192
intermediate_size = 512             # ~8/3 * n_embd, as LLaMA
vocab_size = None
block_size = 128
bias = False
dropout = 0.0
param = "crnet"
rank = 48                           # n_embd / 4
beta_init = 0.5 ** 0.5
beta_eps = 1e-6
beta_learnable = True               # False: the fixed-beta ablation
first_layer = "full"                # "lowrank": the low-rank-first-layer ablation
init_std = 0.02
recompute = "none"
recompute_every = 8
# optimization
batch_size = 32                     # micro-batch sequences per process
total_batch_tokens = 4096           # tokens per optimizer step = batch_size * block_size * world_size * grad_accum
max_iters = 450
stop_iter = 0                       # end this process at this iteration (checkpointed) without changing the schedule; 0 = max_iters
learning_rate = 3e-3
min_lr_ratio = 0.1                  # cosine decays to learning_rate * min_lr_ratio
warmup_iters = 50
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                     # 0 = no clipping (the norm is still computed and checked)
# system
device = "auto"                     # "auto" = cuda if available, else cpu
dtype = "auto"                      # "auto" = bfloat16 autocast on cuda, float32 on cpu; or "float32" / "bfloat16"
compile = False
parallel = "ddp"                    # "ddp": a replica per process | "fsdp": FSDP2, parameters/grads/AdamW sharded (parallel.py)
cpu_threads = 0                     # 0 = torch's default (divided among local processes under torchrun)
peak_flops = 0.0                    # 0 = look the device up in model.PEAK_FLOPS; MFU is n/a when unknown
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, str, bool, list, type(None)))}
TYPES = {"rank": (int, list), "vocab_size": (int, type(None))}  # keys whose type is not their default's
assert set(ModelConfig.field_names()) <= set(DEFAULTS), "every ModelConfig field needs a default here"
# -----------------------------------------------------------------------------


def coerce(key, value, default):
    """Type-check one config value against its default; ints are accepted where floats are expected."""
    want = TYPES.get(key, type(default))
    if isinstance(value, tuple):
        value = list(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)  # e.g. max_iters=1e4
    if isinstance(value, bool) != (want is bool or (isinstance(want, tuple) and bool in want)) or not isinstance(value, want):
        raise ValueError(f"config key {key!r}: expected {getattr(want, '__name__', want)}, got {value!r}")
    return value


def load_config(argv, defaults=None):
    """defaults <- config files (plain assignments) <- --key=value, in order; unknown keys are errors."""
    defaults = DEFAULTS if defaults is None else defaults
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"argument {arg!r}: use --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string
            updates, origin = {key: value}, "command line"
        else:
            path = Path(arg)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {arg}")
            ns = {}
            exec(builtins.compile(path.read_text(), str(path), "exec"), ns)  # `compile` is a config key here
            updates = {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v)
                       and type(v).__name__ != "module"}
            origin = str(path)
        for key, value in updates.items():
            if key not in defaults:
                near = difflib.get_close_matches(key, defaults, n=1)
                raise ValueError(f"unknown config key {key!r} in {origin}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            cfg[key] = coerce(key, value, defaults[key])
    return cfg


def lr_at(it, c):
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio at max_iters."""
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / c["warmup_iters"]
    progress = min(1.0, (it - c["warmup_iters"]) / max(1, c["max_iters"] - c["warmup_iters"]))
    floor = c["learning_rate"] * c["min_lr_ratio"]
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c["learning_rate"] - floor)


def train_batch(data, it, micro, rank, world, B, T, seed, device):
    """The batch is a pure function of (seed, iteration, global slot): resuming needs no sampler state, and
    1 process with grad_accum=2 sees exactly the sequences 2 processes with grad_accum=1 see."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)
    n_global = B * world * (micro + 1)
    starts = torch.randint(len(data) - T - 1, (n_global,), generator=g)[(micro * world + rank) * B:][:B]
    return windows(data, starts, T, device)


def windows(data, starts, T, device):
    x = torch.stack([torch.from_numpy(data[s:s + T].astype(np.int64)) for s in starts.tolist()])
    y = torch.stack([torch.from_numpy(data[s + 1:s + 1 + T].astype(np.int64)) for s in starts.tolist()])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


@torch.no_grad()
def evaluate(model, data, c, rank, world, device, autocast):
    """Mean loss over the first eval_tokens tokens of `data` in fixed windows, shared across ranks."""
    T, B = c["block_size"], c["batch_size"]
    n_windows = min(c["eval_tokens"] // T, (len(data) - 1) // T)
    if n_windows < 1:
        raise ValueError(f"the split has {len(data)} tokens, fewer than one block of {T}")
    mine = torch.arange(rank, n_windows, world) * T
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of losses, number of windows)
    for i in range(0, -(-n_windows // world), B):  # every rank makes the same number of calls (FSDP gathers)
        starts = mine[i:i + B]
        x, y = windows(data, starts if len(starts) else mine.new_zeros(1), T, device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float() * len(starts), torch.tensor(float(len(starts)), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: KiB -> MiB (peak RSS)


def log_metrics(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def unigram_entropy(data, vocab_size):
    """Entropy (nats) of the token distribution: the loss of the best model that ignores context."""
    p = np.bincount(data, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def main(argv):
    c = load_config(argv)
    if c["parallel"] not in par.MODES:
        raise ValueError(f"parallel={c['parallel']!r} must be one of {par.MODES}")
    fsdp = c["parallel"] == "fsdp"
    multi = int(os.environ.get("WORLD_SIZE", 1)) > 1  # more than one process (torchrun), whichever the mode
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    device = torch.device(dev)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if multi:
        dist.init_process_group(backend=backend)
    elif fsdp:  # FSDP2 needs a process group even for one process (e.g. resuming a sharded run on one GPU)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    threads = c["cpu_threads"] or (max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    torch.set_num_threads(threads)
    dtype = c["dtype"] if c["dtype"] != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data
    data_dir = Path(c["data_dir"])
    bundled = {f"data/shakespeare_{t}": t for t in ("byte", "gpt2")}
    if not (data_dir / "meta.json").is_file() and c["data_dir"] in bundled:
        if master:
            say(f"preparing {data_dir} from the bundled corpus")
            prepare(ROOT / data_dir, tokenizer=bundled[c["data_dir"]])
        if multi:
            dist.barrier()
        data_dir = ROOT / data_dir
    meta = load_meta(data_dir)
    train_data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    val_data = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    if c["vocab_size"] is None:
        c["vocab_size"] = meta["vocab_size"]
    elif c["vocab_size"] < meta["vocab_size"]:
        raise ValueError(f"vocab_size={c['vocab_size']} is smaller than the data's vocabulary ({meta['vocab_size']}, "
                         f"tokenizer {meta['tokenizer']!r} in {data_dir}): token ids would overflow the embedding")

    # ---- batch arithmetic
    B, T = c["batch_size"], c["block_size"]
    per_micro = B * T * world
    if c["total_batch_tokens"] % per_micro:
        raise ValueError(f"total_batch_tokens={c['total_batch_tokens']} must be a multiple of batch_size * block_size * "
                         f"world_size = {B} * {T} * {world} = {per_micro}")
    grad_accum = c["total_batch_tokens"] // per_micro

    # ---- model, optimizer, resume
    out = Path(c["out_dir"])
    metrics_path = out / "metrics.jsonl"
    if c["init_from"] not in ("scratch", "resume"):
        raise ValueError(f"init_from={c['init_from']!r} must be 'scratch' or 'resume'")
    ckpt_kind, ckpt_path = par.find_checkpoint(out)
    if c["init_from"] == "scratch" and ckpt_kind and not c["overwrite"]:
        raise FileExistsError(f"{ckpt_path} exists: continue it with --init_from=resume, or pass --overwrite=True "
                              f"or another --out_dir to start over")
    ckpt = par.load_train_state(out, c["parallel"]) if c["init_from"] == "resume" else None
    if ckpt is not None:  # the checkpoint's model and data must be what we are about to train
        for k in ModelConfig.field_names() + ["data_dir", "seed", "total_batch_tokens"]:
            if ckpt["config"][k] != c[k] and not (k == "data_dir" and Path(ckpt["config"][k]).resolve() == data_dir.resolve()):
                raise ValueError(f"resume: config {k}={c[k]!r} differs from the checkpoint's {ckpt['config'][k]!r}")
    mcfg = ModelConfig(**{k: c[k] for k in ModelConfig.field_names()})
    # identical weights on every rank and in every mode; raw_model is what we checkpoint (no compile/DDP prefixes)
    model, raw_model = par.build_model(mcfg, c["parallel"], device, c["seed"], dtype == "bfloat16",  # FSDP: bf16 parameters
                                       c["compile"])
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device.type)
    start_iter, best_val = 0, float("inf")
    if ckpt is not None:
        par.load_weights(out, c["parallel"], ckpt, raw_model, optimizer)
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
        states = ckpt["rng"]
        if len(states) != world:
            say(f"warning: checkpoint has RNG states of {len(states)} processes, running {world}: dropout draws will differ")
        s = states[rank % len(states)]
        torch.set_rng_state(s["torch"])
        if s["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(s["cuda"])
        del ckpt
    else:
        torch.manual_seed(c["seed"] + rank)  # dropout differs per rank

    counts = raw_model.num_params()
    flops_per_token = raw_model.flops_per_token()
    peak = c["peak_flops"] or peak_flops_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(c, indent=2) + "\n")
        os.replace(tmp, out / "config.json")
        if metrics_path.exists():  # drop rows an interrupted run wrote after its last checkpoint
            rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
            keep = [r for r in rows if r["iter"] <= start_iter] if c["init_from"] == "resume" else []
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    say("config:", json.dumps(c))
    say(f"model: {counts['total'] / 1e6:.2f}M parameters " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v and k != "total"))
    say(f"data: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {len(train_data):,} train / {len(val_data):,} val tokens; "
        f"val unigram entropy {unigram_entropy(val_data, meta['vocab_size']):.4f} nats")
    say(f"batch: {c['total_batch_tokens']:,} tokens/step = {B} seq x {T} tok x {world} proc x {grad_accum} accum; "
        f"device {device}, {dtype}, {threads} threads/proc; {flops_per_token / 1e6:.1f} MFLOP/token")

    # ---- loop: step `it` takes the model from iteration it to it + 1
    t0, tokens_per_step = time.perf_counter(), c["total_batch_tokens"]
    train_time, timed_iters = 0.0, 0  # since the last log line; evaluation excluded
    for it in range(start_iter, c["max_iters"]):
        lr = lr_at(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = train_batch(train_data, it, micro, rank, world, B, T, c["seed"], device)
            with par.gradient_sync(model, c["parallel"], micro == grad_accum - 1):
                with autocast:
                    loss = model(x, y)[1]  # not `_, loss =`: that would keep the (B, T, vocab) logits through backward
                (loss / grad_accum).backward()
            loss_sum += loss.detach().float()
        if multi:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = par.clip_grad_norm(list(model.parameters()), c["grad_clip"] or float("inf"))
        loss_val = loss_sum.item() / grad_accum
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            raise SystemExit(f"iteration {it}: non-finite loss {loss_val} or grad norm {grad_norm}; stopped before the "
                             f"optimizer step. The last checkpoint in {out} is untouched.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        train_time, timed_iters, t0 = train_time + t1 - t0, timed_iters + 1, t1
        done = it + 1
        if done % c["log_interval"] == 0 or done == c["max_iters"]:
            dt, train_time, timed_iters = train_time / timed_iters, 0.0, 0
            tps = tokens_per_step / dt
            mfu = estimate_mfu(flops_per_token, tps, peak)
            row = {"iter": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "ms_per_iter": 1000 * dt,
                   "tokens_per_s": tps, "mfu": mfu, "peak_mem_mb": peak_memory_mb(device)}
            say(f"iter {done:6d} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {1000 * dt:7.1f} ms | "
                f"{tps:9.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {row['peak_mem_mb']:.0f} MiB")
            if master:
                log_metrics(metrics_path, row)
        stopping = done == c["stop_iter"]
        if done % c["eval_interval"] == 0 or done == c["max_iters"] or stopping:
            val_loss = evaluate(model, val_data, c, rank, world, device, autocast)
            train_loss = evaluate(model, train_data, c, rank, world, device, autocast)
            best_val = min(best_val, val_loss)
            say(f"eval {done:6d} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | best val {best_val:.4f}")
            states = [None] * world
            if multi:
                dist.all_gather_object(states, rng_state())
            else:
                states = [rng_state()]
            if master:
                log_metrics(metrics_path, {"iter": done, "val_loss": val_loss, "train_loss": train_loss})
            par.save_checkpoint(out, c["parallel"], raw_model, optimizer, {
                "iter": done, "best_val_loss": best_val, "config": c, "model_config": asdict(mcfg), "data_meta": meta,
                "rng": states}, rank)
            if master:
                say(f"saved {par.find_checkpoint(out)[1]}")
            t0 = time.perf_counter()  # evaluation time is not training time
        if stopping:
            say(f"stop_iter={done} reached; continue with --init_from=resume")
            break
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the checkpoint: gloo aborts if a peer tears down first
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")
