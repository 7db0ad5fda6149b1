"""
Train a CR-Net (or baseline) transformer. Read main() top to bottom: config, setup, data, model, the loop; the
helpers it calls follow it.

    python train.py                                   # CPU default: small CR-Net LLaMA on bundled Shakespeare
    python train.py configs/crnet_llama_60m.py --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py configs/crnet_llama_1b.py
    python train.py --init_from=auto --out_dir=out    # resume if out holds a checkpoint, else start (job scripts)
    python train.py --eval_only --out_dir=out --data_dir=data/x   # loss and perplexity of out's checkpoint on x
    python train.py --init_from=out --out_dir=out_ft --learning_rate=3e-4   # fine-tune: out's weights, fresh optimizer

Config: the defaults below, then config files (plain assignments) and --key=value arguments in the order given
(--help lists every key). A resumed run (--init_from=resume) reads its saved config; checkpoint.py says which keys
may change. The merged config is printed and saved to out_dir/config.json.
"""
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint as ck
import configurator
import parallel as par
import plan
import recompute as rc  # not `recompute`: the config key below of that name is a module global
from configurator import ConfigError
from model import model_config
from prepare_data import check_token_ids, open_splits, ready_data, schedule_reads, unigram_entropy
from runlog import check_sinks, fmt_time, start_logs, write_atomic

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
seed = 1337                         # weights, batches and dropout all derive from it [0,4294967296)
# model: every ModelConfig field (model.py documents them); vocab_size None = the data's
arch = "llama"                      # LLaMA (RMSNorm, RoPE, SwiGLU), GPT-2 (LayerNorm, learned positions, GELU), Qwen-3 (LLaMA + QK-norm), Qwen-3-MoE {llama|gpt2|qwen3|qwen3_moe}
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
n_kv_head = 0                       # key/value heads: 0 = n_head; fewer = grouped-query attention [>=0]
head_dim = 0                        # 0 = n_embd / n_head; q is n_head * head_dim wide, k and v n_kv_head * head_dim [>=0]
tie_embeddings = None               # the LM head shares the token embedding; None = the arch's: GPT-2 tied, LLaMA and Qwen-3 untied
n_expert = 0                        # qwen3_moe: experts per layer (0: the dense archs) [>=0]
expert_top_k = 2                    # qwen3_moe: experts per token; intermediate_size is each expert's width [>=1]
router_aux_coef = 0.001             # qwen3_moe: weight of the load-balancing loss in the training loss [>=0]
moe_lane = True                     # crnet + qwen3_moe: Eq. 6 on the MoE output; False: the ablation without that lane
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
stop_iter = 0                       # end this process at this iteration (checkpointed, not evaluated), schedule unchanged; 0 = max_iters [>=0]
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
torch_compile = False               # torch.compile each block, the embedding and the head (parallel.compile_regions)
data_parallel = "ddp"               # "ddp": a replica per process; "fsdp": FSDP2 shards params/grads/AdamW {ddp|fsdp}
cpu_threads = 0                     # 0 = torch's default, divided among local processes under torchrun [>=0]
peak_flops = 0.0                    # one GPU's; 0 = look it up in parallel.PEAK_FLOPS; MFU is n/a when unknown [>=0]
preflight = False                   # run every check a launch makes (config, batch, data, memory plan), then exit
world_size = 0                      # preflight: the number of processes to check for; 0 = this launch's [>=0]
TYPES = {"rank": (int, list), "vocab_size": (int, None), "tie_embeddings": (bool, None)}
# -----------------------------------------------------------------------------


@ck.releasing  # out_dir's lock is freed however main leaves
def main(argv):
    # ---- config: defaults <- files <- --key=value; init_from resolved (scratch, resume, auto, a run to fine-tune)
    c, given = configurator.load(argv, "train.py", doc=__doc__)
    c, ckpt = ck.start(c, given)
    world = int(os.environ.get("WORLD_SIZE", 1))
    grad_accum = check_config(c, c["world_size"] or world if c["preflight"] else world)
    ck.refuse_to_clobber(c)
    if c["preflight"]:
        return plan.preflight(c, c["world_size"] or world, grad_accum, ckpt)

    # ---- setup: processes, device, precision (parallel.py)
    rt = par.setup(c)
    proc, world, device, autocast, say = rt["proc"], rt["world"], rt["device"], rt["autocast"], rt["say"]

    # ---- data: memory-mapped uint16 token files, checked against the config and the checkpoint (prepare_data.py)
    data_dir, meta = ready_data(c, proc, world, say)
    ck.check_same_start(c, rt, ckpt, meta)  # every process: the same checkpoint and token files
    train_data, val_data = open_splits(c, data_dir, meta)
    c["vocab_size"] = c["vocab_size"] or meta["vocab_size"]
    resuming, bsz, T = c["init_from"] == "resume", c["batch_size"], c["block_size"]
    firsts = [train_batch(train_data, ckpt["iter"] if resuming else 0, micro, proc, world, bsz, T, c["seed"],
                          torch.device("cpu")) for micro in range(grad_accum)]
    check_token_ids(c, data_dir, meta, (train_data, val_data), firsts, device)
    out = Path(c["out_dir"])
    if proc == 0 and resuming and not c["eval_only"]:  # every check passed: damaged checkpoints leave the rotation
        ck.set_aside(ckpt["damaged"], out, say)

    # ---- model: recompute, compile and DDP/FSDP applied from outside (same weights everywhere); AdamW; checkpoint
    mode = c["recompute"]
    if mode == "auto":  # the fastest mode whose memory plan fits this device (plan.py)
        memory = c["device_gib"] * 2 ** 30 or plan.device_memory(device)
        mode, why = plan.auto_recompute({**c, "dtype": rt["dtype"]}, world, memory)
        say(why)
    rc_args = (mode, c["recompute_every"], c["keep_z"] or mode != "reversible", c["recompute_rtol"],
               plan.adamw_drift(c["learning_rate"] if c["beta_learnable"] else 0.0, (c["beta1"], c["beta2"])))
    model, raw = par.build_model(model_config(c), c["data_parallel"], device, c["seed"], rt["dtype"] == "bfloat16",
                                 c["torch_compile"], rc_args)
    optimizer = raw.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device.type)
    start_iter, best_val = ck.restore(ckpt, raw, optimizer, c, rt) if ckpt else (0, float("inf"))
    if not resuming:
        torch.manual_seed(c["seed"] + proc)  # dropout differs per process (a resumed run restored its RNG)
    path, ckpt = ckpt and ckpt["path"], None  # free the checkpoint's tensors
    if c["eval_only"]:
        losses = [evaluate(model, d, c, rt) for d in (val_data, train_data)]
        say(f"eval_only {path} (iteration {start_iter}) on {data_dir}: " + " | ".join(
            f"{s} loss {x:.4f}, perplexity {math.exp(x):.3f}" for s, x in zip(("val", "train"), losses)))
        return par.close()
    rt["log"] = start_logs(c, out, start_iter) if proc == 0 else (lambda row: None)
    counts, flops_per_token, tokens_per_step = raw.num_params(), raw.flops_per_token(), c["total_batch_tokens"]
    peak = c["peak_flops"] or par.peak_flops_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    say("config:", json.dumps(c))
    say(f"model: {counts['total'] / 1e6:.2f}M parameters " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v and k != "total"))
    say(f"data: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {len(train_data):,} train / {len(val_data):,} val tokens, "
        f"{schedule_reads(c, meta)}; val unigram entropy {unigram_entropy(val_data, meta['vocab_size']):.4f} nats")
    say(f"batch: {tokens_per_step:,} tokens/step = {bsz} seq x {T} tok x {world} proc x {grad_accum} accum; "
        f"device {device}, {rt['dtype']}, {rt['threads']} threads/proc; recompute {mode}; "
        f"{flops_per_token / 1e6:.1f} MFLOP/token")

    # ---- the loop: step `it` takes the model from iteration it to it + 1
    t_start = t0 = time.perf_counter()
    train_time, timed_iters = 0.0, 0  # since the last log line; evaluation excluded
    with ck.StopSignals() as signals:  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, save, stop
        for it in range(start_iter, c["max_iters"]):
            lr = lr_at(it, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = train_batch(train_data, it, micro, proc, world, bsz, T, c["seed"], device)
                with par.gradient_sync(model, c["data_parallel"], micro == grad_accum - 1):
                    with autocast:
                        loss = model(x, y)[1]  # not `_, loss =`: that would keep the (B, T, vocab) logits through backward
                    loss_sum += loss.detach().float()
                    (loss / grad_accum).backward()
                del loss  # frees the graph now, with what recompute stored for it, not during the next forward
            flag = loss_sum.new_full((), float(signals.signum > 0))  # a fill, not a host-to-device copy
            if world > 1:  # the stop flag rides on the loss's all-reduce: every process stops at the same iteration
                both = torch.stack([loss_sum, flag])
                dist.all_reduce(both, op=dist.ReduceOp.AVG)
                loss_sum, flag = both.unbind()
            grad_norm = par.clip_grad_norm(list(model.parameters()), c["grad_clip"] or float("inf"))
            # the step's one host sync: the non-finite check below needs both numbers before the optimizer step
            loss_val, grad_norm, stop = torch.stack([loss_sum / grad_accum, grad_norm.float(), flag]).tolist()
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                if proc == 0:  # a mark that scripts (tools/ablate.py) read, whatever a launcher prints after this
                    write_atomic(out / "diverged.json", json.dumps({"iter": it, "loss": loss_val, "grad_norm": grad_norm}))
                raise SystemExit(f"iteration {it}: non-finite loss {loss_val} or grad norm {grad_norm}; stopped before the "
                                 f"optimizer step. The last checkpoint in {out} is untouched." if proc == 0 else 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            train_time, timed_iters, t0, done = train_time + t1 - t0, timed_iters + 1, t1, it + 1
            if done % c["log_interval"] == 0 or done == c["max_iters"]:
                dt, train_time, timed_iters = train_time / timed_iters, 0.0, 0
                tps = tokens_per_step / dt
                mfu = par.estimate_mfu(flops_per_token, tps / world, peak)  # tps: all processes'; peak: one GPU's
                elapsed = t1 - t_start
                end = c["stop_iter"] if c["stop_iter"] >= done else c["max_iters"]
                eta = elapsed / (done - start_iter) * (end - done)
                row = {"iter": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "ms_per_iter": 1000 * dt,
                       "tokens_per_s": tps, "mfu": mfu, "peak_mem_mb": par.peak_memory_mb(device),
                       "tokens": done * tokens_per_step, "elapsed_s": elapsed}
                say(f"iter {done:6d} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {1000 * dt:7.1f} ms | "
                    f"{tps:9.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {row['peak_mem_mb']:.0f} MiB | "
                    f"{row['tokens'] / 1e6:.2f}M tok | {fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}")
                rt["log"](row)
            stopping = done == c["stop_iter"] or (stop > 0 and done < c["max_iters"])
            if done % c["eval_interval"] == 0 or done == c["max_iters"]:
                best_val = evaluate_and_save(c, rt, model, raw, optimizer, meta, train_data, val_data, done, best_val)
                t0 = time.perf_counter()  # evaluation and saving are not training time
            elif stopping or (c["checkpoint_interval"] and done % c["checkpoint_interval"] == 0):
                ck.save(c, rt, raw, optimizer, meta, done, best_val)
                t0 = time.perf_counter()
            if stopping:
                say(f"stopped at iteration {done}; resume with: python train.py --init_from=resume --out_dir={c['out_dir']}")
                break
    par.close()
    if signals.signum == signal.SIGINT and done < c["max_iters"]:
        raise SystemExit(130)  # Ctrl-C's usual exit status


# ----------------------------------------------------------------------------- the helpers main calls

def lr_at(it, c):
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio at max_iters."""
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / c["warmup_iters"]
    progress = min(1.0, (it - c["warmup_iters"]) / max(1, c["max_iters"] - c["warmup_iters"]))
    floor = c["learning_rate"] * c["min_lr_ratio"]
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c["learning_rate"] - floor)


def train_batch(data, it, micro, proc, world, bsz, T, seed, device):
    """The batch is a pure function of (seed, iteration, global slot): resuming needs no sampler state, and
    1 process with grad_accum=2 sees exactly the sequences 2 processes with grad_accum=1 see."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)
    n_global = bsz * world * (micro + 1)
    starts = torch.randint(len(data) - T - 1, (n_global,), generator=g)[(micro * world + proc) * bsz:][:bsz]
    return windows(data, starts, T, device)


def windows(data, starts, T, device):
    x, y = (torch.stack([torch.from_numpy(data[s + o:s + o + T].astype(np.int64)) for s in starts.tolist()]) for o in (0, 1))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)  # mps; a no-op on the CPU


@torch.no_grad()
def evaluate(model, data, c, rt):
    """Mean loss over the first eval_tokens tokens of `data` in fixed windows, shared across processes."""
    T, bsz, proc, world, device = c["block_size"], c["batch_size"], rt["proc"], rt["world"], rt["device"]
    n_windows = min(c["eval_tokens"] // T, (len(data) - 1) // T)
    if n_windows < 1:
        raise ValueError(f"the split has {len(data)} tokens, fewer than one block of {T}")
    mine = torch.arange(proc, n_windows, world) * T
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of losses, number of windows)
    for i in range(0, -(-n_windows // world), bsz):  # every process makes the same number of calls (FSDP gathers)
        starts = mine[i:i + bsz]  # the last batch padded to bsz, its targets ignored: one shape, one compiled graph
        x, y = windows(data, torch.cat([starts, mine.new_zeros(bsz - len(starts))]), T, device)
        y[len(starts) or bsz:] = -1  # (a process without windows ignores none: its loss, weighted 0, stays finite)
        with rt["autocast"]:
            _, loss = model(x, y)
        total += torch.stack([loss.float() * len(starts), torch.tensor(float(len(starts)), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def check_config(c, world):
    """Checks that span keys, before any work: the batch arithmetic, evaluation sizes, the model config."""
    accum = plan.grad_accum(c, world)  # the batch arithmetic, stop_iter
    if c["eval_tokens"] < c["block_size"]:
        raise ConfigError("eval_tokens", c["eval_tokens"], f"is less than one block of block_size={c['block_size']} tokens")
    par.check_device(c["device"], preflight=c["preflight"], cpu_threads=c["cpu_threads"])
    if c["data_parallel"] == "fsdp" and c["device"] == "mps":
        raise ConfigError("data_parallel", "fsdp", "FSDP2 needs cuda or cpu (gloo), not mps")
    check_sinks(c)
    rc.check(c["recompute"], c["param"], c["recompute_every"], c["keep_z"], c["recompute_rtol"], c["moe_lane"])
    model_config(c)  # the model's own checks (divisibility, ranks, ...), named by key
    return accum


def evaluate_and_save(c, rt, model, raw, optimizer, meta, train_data, val_data, done, best_val):
    val_loss, train_loss = evaluate(model, val_data, c, rt), evaluate(model, train_data, c, rt)
    improved, best_val = val_loss < best_val, min(best_val, val_loss)
    rt["say"](f"eval {done:6d} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | best val {best_val:.4f}")
    rt["log"]({"iter": done, "val_loss": val_loss, "train_loss": train_loss})
    rt["last_eval"] = {"iter": done, "val_loss": val_loss}
    ck.save(c, rt, raw, optimizer, meta, done, best_val, best=c["keep_best"] and improved)
    return best_val


if __name__ == "__main__":
    configurator.main_guard(main)
