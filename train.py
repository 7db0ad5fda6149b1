"""
Train a CR-Net (or baseline) transformer.

    python train.py                                   # CPU default: small CR-Net LLaMA on bundled Shakespeare
    python train.py configs/crnet_llama_60m.py --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py configs/crnet_llama_1b.py
    python train.py --init_from=resume --out_dir=out  # continue exactly where the checkpoint left off
    python train.py --init_from=auto --out_dir=out    # resume if out holds a checkpoint, else start: a job script's command
    python train.py --eval_only --out_dir=out --data_dir=data/x   # loss and perplexity of out's checkpoint on x
    python train.py --init_from=out --out_dir=out_ft --learning_rate=3e-4   # fine-tune: out's weights, fresh optimizer

Config: the defaults below, then config files (plain assignments) and --key=value arguments in the order given
(configurator.py; --help lists every key). A resumed run reads its saved config: keys that define the model,
the data stream and the optimization may not change; the others (logging, evaluation, recomputation, compile,
micro-batch, stop_iter, max_iters) may. The merged config is printed and saved to out_dir/config.json.
"""
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import configurator
import parallel as par
from configurator import ConfigError
from model import ModelConfig, estimate_mfu, peak_flops_for
from prepare_data import BUNDLED_DIRS, check_data, find_data, load_meta, prepare
from runlog import SINKS, fmt_time, sinks, start_logs, write_atomic

# ----------------------------------------------------------------------------- config
# The CPU default run: a 1.07M-parameter CR-Net LLaMA on byte-level Shakespeare; ~3.5 minutes on 2 CPU cores.
out_dir = "out"                     # checkpoint, config.json and metrics.jsonl go here
data_dir = "data/shakespeare_byte"  # prepared automatically when it is one of the bundled corpus's dirs
data_recipe = ""                    # the prepare_data.py command that makes data_dir: printed when it is missing
init_from = "scratch"               # "resume": continue out_dir's checkpoint; "auto": resume if it has one, else scratch; or a run's dir: its weights
overwrite = False                   # start over in an out_dir holding a run (its checkpoints, best/, logs go once all checks pass)
eval_interval = 150                 # evaluate and checkpoint every this many iterations (and at the end) [>=1]
checkpoint_interval = 0             # also checkpoint (without an eval) every this many iterations; 0 = at evals only [>=0]
eval_only = False                   # evaluate out_dir's checkpoint on data_dir (loss, perplexity), write nothing, exit
eval_tokens = 131072                # fixed validation (and train) tokens per evaluation, split over ranks [>=1]
log_interval = 25                   # print and append a row to metrics.jsonl every this many iterations [>=1]
keep_best = False                   # also keep the best-val checkpoint, as out_dir/best/ (hard links; a copy without them)
log_to = ""                         # also log to "tensorboard" (out_dir/tensorboard) and/or "wandb", comma-separated
wandb_project = "crnet"             # the wandb project, with log_to="wandb"
seed = 1337                         # weights, batches and dropout all derive from it [>=0]
# model: every ModelConfig field (model.py documents them); vocab_size None = the data's
arch = "llama"                      # LLaMA (RMSNorm, RoPE, SwiGLU) or GPT-2 (LayerNorm, learned positions, GELU) {llama|gpt2}
n_layer = 4                         # [>=1]
n_head = 4                          # [>=1]
n_embd = 192                        # [>=1]
intermediate_size = 512             # LLaMA's SwiGLU width, ~8/3 * n_embd (GPT-2 uses 4 * n_embd) [>=1]
vocab_size = None                   # None = the data's vocabulary [>=1]
block_size = 128                    # sequence length [>=1]
bias = False                        # GPT-2 only: biases in projections and norms
dropout = 0.0                       # [0,1)
param = "crnet"                     # projections: full-rank, CR-Net (Eq. 6), X A B, silu(X A) B (cola_mlp: MLP only) {full|crnet|lowrank|cola|cola_mlp}
rank = 48                           # n_embd / 4; one rank for layers 2..L, or a list of n_layer ranks [>=1]
beta_init = 0.5 ** 0.5              # initial beta of every CR-Net layer: the lane carries beta_init^2 of the variance
beta_eps = 1e-6                     # Eq. 6: s = sign(beta) (|beta| + eps) [>=0]
beta_learnable = True               # False: the paper's fixed-beta ablation
first_layer = "full"                # "lowrank": the paper's low-rank-first-layer ablation {full|lowrank}
init_std = 0.02                     # std of a full-rank projection [>0]
# activation recomputation (recompute.py): not part of the model, so a run may resume with another mode
recompute = "none"                  # "block": torch.utils.checkpoint; "crnet": the paper's Algorithm 1; "reversible": also inverts the residual stream; "auto": the fastest that the memory plan fits {none|block|crnet|reversible|auto}
device_gib = 0.0                    # recompute="auto", --preflight: memory per device to plan for; 0 = this device's [>=0]
recompute_every = 8                 # crnet, reversible: keep the lanes of every k-th layer, counted down from the last [>=1]
keep_z = True                       # reversible: keep every Z = X A (False: recompute it in backward, storing less)
recompute_rtol = 1e-5               # crnet, reversible: round-off a rebuilt lane may carry; above it a lane is stored [>0]
# optimization
batch_size = 32                     # micro-batch sequences per process [>=1]
total_batch_tokens = 4096           # tokens per optimizer step = batch_size * block_size * world_size * grad_accum [>=1]
max_iters = 450                     # optimizer steps; the cosine schedule ends here [>=1]
stop_iter = 0                       # end this process at this iteration (checkpointed), schedule unchanged; 0 = max_iters [>=0]
learning_rate = 3e-3                # peak [>0]
min_lr_ratio = 0.1                  # cosine decays to learning_rate * min_lr_ratio [0,1]
warmup_iters = 50                   # linear warmup [>=0]
weight_decay = 0.1                  # AdamW, on weight matrices and low-rank factors only [>=0]
beta1 = 0.9                         # [0,1)
beta2 = 0.95                        # [0,1)
grad_clip = 1.0                     # 0 = no clipping (the norm is still computed and checked) [>=0]
# system
device = "auto"                     # "auto" = cuda if available, else mps, else cpu; or cpu, cuda, cuda:N, mps
dtype = "auto"                      # "auto" = bfloat16 autocast on cuda, float32 elsewhere {auto|float32|bfloat16}
compile = False                     # torch.compile the model (per block under FSDP)
parallel = "ddp"                    # "ddp": a replica per process; "fsdp": FSDP2 shards params/grads/AdamW {ddp|fsdp}
cpu_threads = 0                     # 0 = torch's default, divided among local processes under torchrun [>=0]
peak_flops = 0.0                    # 0 = look the device up in model.PEAK_FLOPS; MFU is n/a when unknown [>=0]
preflight = False                   # run every check a launch makes (config, batch, data, memory plan), then exit
world_size = 0                      # preflight: the number of processes to check for; 0 = this launch's [>=0]
TYPES = {"rank": (int, list), "vocab_size": (int, None)}
# -----------------------------------------------------------------------------
# what a resumed run may change; everything else defines the model, the data stream or the optimization
FREE_ON_RESUME = {"out_dir", "init_from", "overwrite", "eval_interval", "checkpoint_interval", "eval_only", "eval_tokens",
                  "log_interval", "recompute", "device_gib", "recompute_every", "keep_z", "recompute_rtol", "batch_size",
                  "max_iters", "stop_iter", "device", "dtype", "compile", "cpu_threads", "peak_flops", "preflight", "world_size", "data_recipe", "parallel", "keep_best",
                  "log_to", "wandb_project"}


def load_config(argv):
    """The merged config dict (defaults <- files <- --key=value), checked key by key."""
    return configurator.load(argv, "train.py", doc=__doc__)[0]


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
    """Peak memory of this process: CUDA's max_memory_allocated; on MPS the Metal driver's current allocation
    (torch.mps keeps no peak); on the CPU the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # macOS reports bytes, Linux KiB


def unigram_entropy(data, vocab_size):
    """Entropy (nats) of the token distribution: the loss of the best model that ignores context."""
    p = np.bincount(data, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- the steps of main
def resume_config(c, given):
    """init_from='resume': the run's saved config, with the keys given now where a resumed run may change them."""
    ckpt = par.load_train_state(c["out_dir"], say=print if os.environ.get("RANK", "0") == "0" else lambda *a: None)
    saved = {k: v for k, v in ckpt["config"].items() if k in c}  # keys this version no longer has are dropped
    for k in sorted(given - FREE_ON_RESUME - ({"data_dir"} if c["eval_only"] else set())):  # eval_only: any data
        same_dir = k == "data_dir" and Path(c[k]).resolve() == Path(saved[k]).resolve()
        if c[k] != saved.get(k, c[k]) and not same_dir:
            raise ConfigError(k, c[k], f"the checkpoint in {c['out_dir']} was trained with {saved[k]!r}; a resumed run "
                                       f"keeps the model, data stream and optimization (start a new run to change it)")
    c = {**c, **saved, **{k: c[k] for k in given}, "init_from": "resume"}  # also under init_from=auto, eval_only
    if "stop_iter" not in given:
        c["stop_iter"] = 0  # the earlier process's stop: this one runs to max_iters unless told otherwise
    if c["max_iters"] <= ckpt["iter"] and not c["eval_only"]:
        raise ConfigError("max_iters", c["max_iters"], f"the checkpoint is at iteration {ckpt['iter']}: nothing to train "
                                                       f"(raise max_iters to continue)")
    if c["max_iters"] != saved["max_iters"]:
        print(f"note: max_iters {saved['max_iters']} -> {c['max_iters']}: the cosine schedule now ends there, so the "
              f"learning rate from iteration {ckpt['iter']} on differs from the original run's")
    return c, ckpt


def finetune_config(c, given):
    """init_from=<a run's out_dir>: its newest checkpoint's weights, and so its model keys, start a new run with a
    fresh optimizer, schedule and RNG; data and optimization come from this config. dropout may change."""
    src = Path(c["init_from"])
    if not src.is_dir() or par.find_checkpoint(src)[0] is None:
        raise ConfigError("init_from", c["init_from"], "is neither scratch, resume nor a directory holding a checkpoint")
    if src.resolve() == Path(c["out_dir"]).resolve():
        raise ConfigError("init_from", c["init_from"], "is out_dir itself: continue that run with --init_from=resume")
    if Path(c["out_dir"]).resolve() in src.resolve().parents:
        raise ConfigError("init_from", c["init_from"], "is inside out_dir, whose checkpoints a new run there removes: "
                                                       "copy it elsewhere first")
    ckpt = par.load_train_state(src, say=print if os.environ.get("RANK", "0") == "0" else lambda *a: None)
    saved = ckpt["config"]
    model_keys = [k for k in ModelConfig.field_names() if k != "dropout" and k in saved]
    for k in sorted(given & set(model_keys)):
        if c[k] != saved[k]:
            raise ConfigError(k, c[k], f"the checkpoint in {src} has {saved[k]!r}: fine-tuning keeps its model")
    return {**c, **{k: saved[k] for k in model_keys}}, ckpt


def check_config(c, world):
    """Checks that span keys, before any work: the batch arithmetic, evaluation sizes, the model config."""
    B, T = c["batch_size"], c["block_size"]
    per_micro = B * T * world
    if c["total_batch_tokens"] % per_micro:
        raise ConfigError("total_batch_tokens", c["total_batch_tokens"], f"must be a multiple of batch_size * block_size * "
                          f"world_size = {B} * {T} * {world} = {per_micro}")
    if c["eval_tokens"] < T:
        raise ConfigError("eval_tokens", c["eval_tokens"], f"is less than one block of block_size={T} tokens")
    if c["stop_iter"] > c["max_iters"]:
        raise ConfigError("stop_iter", c["stop_iter"], f"is beyond max_iters={c['max_iters']}")
    dev = c["device"]
    check_device(dev, preflight=c["preflight"])
    out = Path(c["out_dir"]).absolute()
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError("out_dir", c["out_dir"], f"{blocker} is a file, not a directory")
    if c["parallel"] == "fsdp" and dev == "mps":
        raise ConfigError("parallel", "fsdp", "FSDP2 needs cuda or cpu (gloo), not mps")
    for name in sinks(c):
        if name not in SINKS:
            raise ConfigError("log_to", c["log_to"], f"names {name!r}; choose from {', '.join(SINKS)}")
        if importlib.util.find_spec(SINKS[name]) is None:
            raise ConfigError("log_to", c["log_to"], f"needs the {SINKS[name]} package, which is optional: "
                                                     f"pip install {SINKS[name]}")
    if c["recompute"] in ("crnet", "reversible") and c["param"] != "crnet":
        raise ConfigError("recompute", c["recompute"], f"inverts Eq. 6 and needs param='crnet' (got param="
                                                       f"{c['param']!r}); use recompute='block'")
    if not c["keep_z"] and c["recompute"] not in ("reversible", "auto"):
        raise ConfigError("keep_z", False, f"applies to recompute='reversible' only (got {c['recompute']!r})")
    model_config(c)  # the model's own checks (divisibility, ranks, ...), named by key
    return c["total_batch_tokens"] // per_micro  # grad_accum


def check_device(dev, preflight=False):
    if dev not in ("auto", "cpu", "cuda", "mps") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError("device", dev, "must be auto, cpu, cuda, cuda:N or mps")
    if preflight:
        return  # the machines that train may have it
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", dev, "CUDA is not available here (no GPU, or a CPU build of torch)")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", dev, "the Apple GPU (mps) is not available here")


def model_config(c, vocab_size=None):
    return ModelConfig(**{**{k: c[k] for k in ModelConfig.field_names()}, "vocab_size": vocab_size or c["vocab_size"] or 256})


def pick_device(name, local_rank):
    """"auto" is cuda, else mps (Apple silicon), else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def setup(c):
    """Processes, device, threads and precision: everything that depends on where this process runs."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(c["device"], local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend)
    elif c["parallel"] == "fsdp":  # FSDP2 needs a process group even for one process (e.g. resuming on one GPU)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    threads = c["cpu_threads"] or max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    dtype = c["dtype"] if c["dtype"] != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)  # flushed: a redirected log grows live
    return dict(rank=rank, world=world, device=device, dtype=dtype, autocast=autocast, threads=threads, say=say)


def device_memory(device):
    """Bytes of memory on `device`: the GPU's, else the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_same_start(c, rt, ckpt, meta):
    """Every process starts from the same checkpoint (a run still saving into init_from could hand processes
    different ones), and a fine-tuned model reads the token ids it was trained on."""
    if rt["world"] > 1:
        seen = [None] * rt["world"]
        dist.all_gather_object(seen, (str(ckpt["path"]), ckpt["iter"]))
        if len(set(seen)) > 1:
            how = ("is a run still saving there? Copy one checkpoint out and start from the copy"
                   if c["init_from"] != "resume" else "is another run writing to this out_dir?")
            raise ValueError(f"processes read different checkpoints "
                             f"({', '.join(f'{p} at iteration {i}' for p, i in sorted(set(seen)))}): {how}")
    check_tokenizer(c, ckpt, meta)


def check_tokenizer(c, ckpt, meta):
    was, now = (TOKENIZER_IDS.get(t, t) for t in (ckpt["data_meta"]["tokenizer"], meta["tokenizer"]))
    if (c["init_from"] != "resume" or c["eval_only"]) and was != now:
        src = c["out_dir"] if c["init_from"] == "resume" else c["init_from"]
        raise ConfigError("data_dir", c["data_dir"], f"holds {meta['tokenizer']!r} tokens, but the checkpoint in {src} was "
                          f"trained on {ckpt['data_meta']['tokenizer']!r} tokens: its embeddings would read other ids "
                          f"(prepare the data with --tokenizer={ckpt['data_meta']['tokenizer']})")


TOKENIZER_IDS = {"r50k_base": "gpt2"}  # names with identical token ids


def load_data(c, rt, ckpt=None):
    """Memory-mapped token files, checked against the config (and the checkpoint) before the model is built."""
    data_dir, meta = find_data(c)
    if meta is None:  # a bundled corpus's dir: rank 0 prepares it, the others wait
        if rt["rank"] == 0:
            rt["say"](f"preparing {data_dir} from the bundled corpus")
            prepare(data_dir, tokenizer=BUNDLED_DIRS[c["data_dir"]])
        if rt["world"] > 1:
            dist.barrier()
        meta = load_meta(data_dir)
    if ckpt is not None:
        check_same_start(c, rt, ckpt, meta)
    check_data(c, data_dir, meta)
    splits = {s: np.memmap(data_dir / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
    return splits["train"], splits["val"], meta, data_dir


def check_token_ids(c, rt, data_dir, meta, train_data, val_data, grad_accum, it):
    """An id beyond the vocabulary (a meta.json that understates it) would fail inside F.embedding, on CUDA as a
    device-side assert. Before the first step every rank reads the ids of its first batches and of the evaluation
    windows (fixed, so every later eval is covered), and all ranks agree on the largest."""
    B, T = c["batch_size"], c["block_size"]
    firsts = [train_batch(train_data, it, m, rt["rank"], rt["world"], B, T, c["seed"], torch.device("cpu"))
              for m in range(grad_accum)]
    evals = [int(d[:min(c["eval_tokens"] // T, (len(d) - 1) // T) * T + 1].max()) for d in (train_data, val_data)]
    top = torch.tensor([max(int(t.max()) for xy in firsts for t in xy), *evals])
    if rt["world"] > 1:
        top = top.to(rt["device"])
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    for split, m in zip(("train", "train", "val"), top.tolist()):
        if m >= c["vocab_size"]:
            raise ValueError(f"{data_dir / (split + '.bin')} holds token id {m}, beyond the model's vocabulary of "
                             f"{c['vocab_size']} ({data_dir / 'meta.json'} says vocab_size {meta['vocab_size']}, max_token_id "
                             f"{meta['max_token_id']}): prepare the data again, or start a run with --vocab_size={m + 1}")


def build(c, rt, ckpt):
    """Model (identical weights on every rank and in every mode), optimizer, and the checkpoint's state if resuming.
    raw_model is the Transformer itself: what we checkpoint, free of compile and DDP wrappers."""
    mcfg = model_config(c)
    model, raw = par.build_model(mcfg, c["parallel"], rt["device"], c["seed"], rt["dtype"] == "bfloat16",  # FSDP: bf16 params
                                 c["compile"], (rt["recompute"], c["recompute_every"], c["keep_z"] or rt["recompute"] != "reversible",
                                                c["recompute_rtol"]))
    optimizer = raw.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), rt["device"].type)
    start_iter, best_val = 0, float("inf")
    if ckpt is None:
        torch.manual_seed(c["seed"] + rt["rank"])  # dropout differs per rank
        return model, raw, optimizer, mcfg, start_iter, best_val
    if c["init_from"] != "resume":  # fine-tuning: the weights only
        par.load_weights(ckpt, raw)
        torch.manual_seed(c["seed"] + rt["rank"])
        rt["say"](f"initialized from {ckpt['path']} (iteration {ckpt['iter']}): weights only, fresh optimizer and schedule")
        return model, raw, optimizer, mcfg, start_iter, best_val
    par.load_weights(ckpt, raw, optimizer)
    states = ckpt["rng"]
    if len(states) != rt["world"]:
        rt["say"](f"note: the checkpoint has RNG states of {len(states)} processes, running {rt['world']}: dropout draws differ")
    s = states[rt["rank"] % len(states)]
    torch.set_rng_state(s["torch"])
    if rt["device"].type == "cuda" and s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    elif bool(s.get("cuda")) != (rt["device"].type == "cuda") and ckpt["config"]["dropout"]:
        rt["say"]("note: the checkpoint's CUDA RNG state does not apply on this device: dropout draws differ")
    rt["last_eval"] = ckpt.get("last_eval")  # the latest eval's val loss: sample.py reports it
    rt["say"](f"{'evaluating' if c['eval_only'] else 'resuming from'} {ckpt['path']} at iteration {ckpt['iter']}")
    return model, raw, optimizer, mcfg, ckpt["iter"], ckpt["best_val_loss"]


# ----------------------------------------------------------------------------- main
def main(argv):
    c, given = configurator.load(argv, "train.py", doc=__doc__)
    if c["init_from"] == "auto":  # the one command a job script can repeat after every preemption
        c["init_from"] = "resume" if par.find_checkpoint(c["out_dir"])[0] else "scratch"
    if c["eval_only"] and c["init_from"] not in ("scratch", "resume"):
        raise ConfigError("init_from", c["init_from"], "eval_only evaluates out_dir's checkpoint: pass --out_dir=<run dir>")
    c["init_from"] = "resume" if c["eval_only"] else c["init_from"]
    ckpt = None
    if c["init_from"] == "resume":
        c, ckpt = resume_config(c, given)
    elif c["init_from"] != "scratch":
        c, ckpt = finetune_config(c, given)
    world = int(os.environ.get("WORLD_SIZE", 1))
    grad_accum = check_config(c, c["world_size"] or world if c["preflight"] else world)
    if c["init_from"] != "resume" and not c["overwrite"]:  # a new run removes the old one's checkpoints and best/
        path = par.find_checkpoint(c["out_dir"])[1] or par.find_checkpoint(Path(c["out_dir"]) / "best")[1]
        if path:
            raise FileExistsError(f"{path} exists: continue it with --init_from=resume, or pass --overwrite or "
                                  f"another --out_dir to start over")
    if c["preflight"]:
        import plan  # the memory plan and every other check a launch makes
        return plan.preflight(c, c["world_size"] or world, ckpt)
    rt = setup(c)
    rank, device, autocast, say = rt["rank"], rt["device"], rt["autocast"], rt["say"]
    train_data, val_data, meta, data_dir = load_data(c, rt, ckpt)
    if c["vocab_size"] is None:
        c["vocab_size"] = meta["vocab_size"]
    check_token_ids(c, rt, data_dir, meta, train_data, val_data, grad_accum, ckpt["iter"] if ckpt and c["init_from"] == "resume" else 0)
    out = Path(c["out_dir"])
    if rank == 0 and c["init_from"] == "resume" and not c["eval_only"]:  # every check passed: damaged ones leave the rotation
        par.set_aside(ckpt["damaged"], out, say)
    rt["recompute"] = c["recompute"]
    if c["recompute"] == "auto":
        import plan  # the memory plan picks the mode
        memory = c["device_gib"] * 2 ** 30 or device_memory(device)
        rt["recompute"], why = plan.auto_recompute({**c, "dtype": rt["dtype"]}, rt["world"], memory)
        say(why)
    model, raw_model, optimizer, mcfg, start_iter, best_val = build(c, rt, ckpt)
    path, ckpt = ckpt and ckpt["path"], None  # free the checkpoint's tensors
    if c["eval_only"]:
        losses = [evaluate(model, d, c, rank, rt["world"], device, autocast) for d in (val_data, train_data)]
        say(f"eval_only {path} (iteration {start_iter}) on {data_dir}: " + " | ".join(
            f"{s} loss {x:.4f}, perplexity {math.exp(x):.3f}" for s, x in zip(("val", "train"), losses)))
        return close()
    rt["log"] = start_logs(c, out, start_iter) if rank == 0 else (lambda row: None)
    counts = raw_model.num_params()
    flops_per_token = raw_model.flops_per_token()
    peak = c["peak_flops"] or peak_flops_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    B, T, tokens_per_step = c["batch_size"], c["block_size"], c["total_batch_tokens"]
    say("config:", json.dumps(c))
    say(f"model: {counts['total'] / 1e6:.2f}M parameters " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v and k != "total"))
    say(f"data: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {len(train_data):,} train / {len(val_data):,} val tokens; "
        f"val unigram entropy {unigram_entropy(val_data, meta['vocab_size']):.4f} nats")
    say(f"batch: {tokens_per_step:,} tokens/step = {B} seq x {T} tok x {rt['world']} proc x {grad_accum} accum; "
        f"device {device}, {rt['dtype']}, {rt['threads']} threads/proc; recompute {rt['recompute']}; "
        f"{flops_per_token / 1e6:.1f} MFLOP/token")

    # ---- loop: step `it` takes the model from iteration it to it + 1
    t_start = t0 = time.perf_counter()
    train_time, timed_iters = 0.0, 0  # since the last log line; evaluation excluded
    with par.StopSignals() as signals:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, save, stop (parallel.py)
        for it in range(start_iter, c["max_iters"]):
            lr = lr_at(it, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = train_batch(train_data, it, micro, rank, rt["world"], B, T, c["seed"], device)
                with par.gradient_sync(model, c["parallel"], micro == grad_accum - 1):
                    with autocast:
                        loss = model(x, y)[1]  # not `_, loss =`: that would keep the (B, T, vocab) logits through backward
                    loss_sum += loss.detach().float()
                    (loss / grad_accum).backward()
                del loss  # frees the graph now, with what recompute stored for it, not during the next forward
            flag = loss_sum.new_full((), float(signals.signum > 0))  # a fill, not a host-to-device copy
            if rt["world"] > 1:  # the stop flag rides on the loss's all-reduce: every rank stops at the same iteration
                both = torch.stack([loss_sum, flag])
                dist.all_reduce(both, op=dist.ReduceOp.AVG)
                loss_sum, flag = both.unbind()
            grad_norm = par.clip_grad_norm(list(model.parameters()), c["grad_clip"] or float("inf"))
            # the step's one host sync: the non-finite check below needs both numbers before the optimizer step
            loss_val, grad_norm, stop = torch.stack([loss_sum / grad_accum, grad_norm.float(), flag]).tolist()
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                if rank == 0:  # a mark that scripts (ablate.py) read, whatever a launcher prints after this
                    write_atomic(out / "diverged.json", json.dumps({"iter": it, "loss": loss_val, "grad_norm": grad_norm}))
                raise SystemExit(f"iteration {it}: non-finite loss {loss_val} or grad norm {grad_norm}; stopped before the "
                                 f"optimizer step. The last checkpoint in {out} is untouched." if rank == 0 else 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            train_time, timed_iters, t0 = train_time + t1 - t0, timed_iters + 1, t1
            done = it + 1
            if done % c["log_interval"] == 0 or done == c["max_iters"]:
                dt, train_time, timed_iters = train_time / timed_iters, 0.0, 0
                tps = tokens_per_step / dt
                mfu = estimate_mfu(flops_per_token, tps, peak)
                elapsed = t1 - t_start
                end = c["stop_iter"] if c["stop_iter"] > done else c["max_iters"]
                eta = elapsed / (done - start_iter) * (end - done)
                row = {"iter": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "ms_per_iter": 1000 * dt,
                       "tokens_per_s": tps, "mfu": mfu, "peak_mem_mb": peak_memory_mb(device), "tokens": done * tokens_per_step,
                       "elapsed_s": elapsed}
                say(f"iter {done:6d} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {1000 * dt:7.1f} ms | "
                    f"{tps:9.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {row['peak_mem_mb']:.0f} MiB | "
                    f"{row['tokens'] / 1e6:.2f}M tok | {fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}")
                rt["log"](row)
            stopping = done == c["stop_iter"] or (stop > 0 and done < c["max_iters"])
            if done % c["eval_interval"] == 0 or done == c["max_iters"] or done == c["stop_iter"]:
                best_val = evaluate_and_save(c, rt, model, raw_model, optimizer, mcfg, meta, train_data, val_data, done, best_val)
                t0 = time.perf_counter()  # evaluation and saving are not training time
            elif stopping or (c["checkpoint_interval"] and done % c["checkpoint_interval"] == 0):
                save(c, rt, raw_model, optimizer, mcfg, meta, done, best_val)
                t0 = time.perf_counter()
            if stopping:
                say(f"stopped at iteration {done}; resume with: python train.py --init_from=resume --out_dir={c['out_dir']}")
                break
    close()
    if signals.signum == signal.SIGINT and done < c["max_iters"]:
        raise SystemExit(130)  # Ctrl-C's usual exit status


def close():
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the checkpoint: gloo aborts if a peer tears down first
        dist.destroy_process_group()


def evaluate_and_save(c, rt, model, raw_model, optimizer, mcfg, meta, train_data, val_data, done, best_val):
    rank, world, say = rt["rank"], rt["world"], rt["say"]
    val_loss = evaluate(model, val_data, c, rank, world, rt["device"], rt["autocast"])
    train_loss = evaluate(model, train_data, c, rank, world, rt["device"], rt["autocast"])
    improved = val_loss < best_val
    best_val = min(best_val, val_loss)
    say(f"eval {done:6d} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | best val {best_val:.4f}")
    rt["log"]({"iter": done, "val_loss": val_loss, "train_loss": train_loss})
    rt["last_eval"] = {"iter": done, "val_loss": val_loss}
    save(c, rt, raw_model, optimizer, mcfg, meta, done, best_val, best=c["keep_best"] and improved)
    return best_val


def save(c, rt, raw_model, optimizer, mcfg, meta, done, best_val, best=False):
    states = [None] * rt["world"]
    if rt["world"] > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    out = Path(c["out_dir"])
    saved = par.save_checkpoint(out, c["parallel"], raw_model, optimizer, {
        "iter": done, "best_val_loss": best_val, "config": c, "model_config": asdict(mcfg), "data_meta": meta,
        "rng": states, "last_eval": rt.get("last_eval")}, rt["rank"], best=best)
    rt["say"](f"saved {saved}" + (f", linked as {out / 'best'} (best val so far)" if best else ""))


if __name__ == "__main__":
    configurator.main_guard(main)
