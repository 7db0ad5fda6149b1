"""
Benchmarks that print tables (never assertions; tests/ holds those).

    python tools/bench.py recompute            # none / block / crnet / reversible (keep_z True, False) side by side,
                                         # one fresh process each
    python tools/bench.py recompute --profile  # plus where crnet's and reversible's step time goes
    python tools/bench.py init                 # per-layer output std at init, CR-Net vs full-rank (results/init.md)
    python tools/bench.py bytes                # bytes allocated and ops run in one bf16 training step (torch.profiler)
    python tools/bench.py sizes                # full vs CR-Net at each paper size that fits here: step time, tokens/s,
                                         # peak memory (and the planner's figure), MFU on a GPU; none/block/crnet
    python tools/bench.py sizes --sizes=60m,130m --batch=8 --steps=5
    python tools/bench.py moe                  # Qwen-3-MoE (8 experts, top 2) vs dense Qwen-3 at equal active parameters:
                                         # step time and memory, full and CR-Net (configs/*_qwen3_moe_60m.py),
                                         # the experts looped and as grouped GEMMs (CPU, sm90 GPUs; others loop)
    python tools/bench.py gpu                  # one GPU: full vs CR-Net at 350M (micro-batch 64) and 1B (32), recompute
                                         # none / crnet / reversible, eager and compiled, as train.py builds them;
                                         # within --budget_s=480 (rows past it say so)

recompute and init use a 7B-like CR-Net LLaMA shape scaled to a CPU: h 1024, 16 layers, r 256, h_ff 2736,
sequence 256 (--n_embd=... etc. change it). sizes uses configs/{full,crnet}_llama_{size}.py with the paper's
vocabulary (32000) and skips what plan.py says will not fit 90% of the memory here. On a GPU the same
commands report torch.cuda.max_memory_allocated (and sizes runs bf16 autocast and reports MFU).
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python tools/x.py: the core modules are one folder up

import torch

import configurator
import moe
import recompute
import parallel as par
import plan
from model import ModelConfig, Projection, Transformer, model_config

# ----------------------------------------------------------------------------- config
what = "recompute"          # which table (also as a bare word: python tools/bench.py sizes) {recompute|init|sizes|gpu|bytes|moe}
n_embd = 1024               # recompute, init: the model's width [>=1]
n_layer = 16                # [>=1]
n_head = 16                 # [>=1]
ff = 2736                   # SwiGLU width [>=1]
rank = 256                  # CR-Net rank, layers 2..L [>=1]
seq = 256                   # sequence length [>=1]
batch = 2                   # sequences per step [>=1]
every = 8                   # crnet recompute: keep the lanes of every k-th layer [>=1]
steps = 3                   # timed steps (the median is reported) after the warm-up steps (gpu: 6 when left at 3) [>=1]
profile = False             # recompute: also print where crnet's and reversible's step time goes (torch.profiler)
sizes = "60m,130m,350m,1b,7b"  # sizes: which paper sizes to try (each if the planner says it fits); gpu: 350m,1b unless set
torch_compile = False             # sizes: torch.compile the model (per region, as train.py does)
mode = "crnet"              # one row's recompute mode (set by the table for each fresh process) {none|block|crnet|reversible}
keep_z = True               # one row's keep_z (reversible; set by the table)
rtol = 1e-5                 # one row's recompute_rtol, the round-off guard's budget (set by the table) [>0]
size = "60m"                # one row's paper size (set by the table)
param = "crnet"             # one row's parameterization (set by the table) {full|crnet}
experts = "auto"            # one MoE row's experts (auto: moe.GROUPED's choice) {auto|loop|grouped}
budget_s = 480.0            # gpu: seconds for the whole table; a row may run for what is left, later ones do not run [>0]
one = False                 # run one row in this process and print it as JSON (the table launches these)
# -----------------------------------------------------------------------------


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_mode(a):
    """Runs in a fresh process: held bytes, resident memory growth over the forward, step times."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, intermediate_size=a.ff, rank=a.rank,
                      vocab_size=256, block_size=a.seq, param="crnet")
    m = recompute.apply(Transformer(cfg).to(dev), a.mode, a.every, a.keep_z or a.mode != "reversible", a.rtol,
                        beta_drift=0.0)  # no optimizer steps: the CUDA plan's margin for moving betas is 0
    idx = torch.randint(0, 256, (a.batch, a.seq), device=dev)
    tokens = idx.numel()
    before = rss_bytes()
    held, loss = plan.held_activation_bytes(m, idx, idx)  # counted, inside the layer loop
    rss_first = rss_bytes() - before  # resident growth over the first forward of this fresh process
    loss.backward()
    m.zero_grad(set_to_none=True)
    del loss
    formula = None
    if a.mode != "none":
        stream = a.mode == "reversible"
        store = plan.stored_lanes(m.blocks, a.every, torch.float32, stream, a.keep_z or not stream, a.rtol) if a.mode != "block" else None
        formula = plan.stored_numbers_per_token(cfg, a.mode, a.every, store, a.keep_z or not stream) * 4 * tokens
    times, cuda_peak = [], None
    for i in range(a.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, loss = m(idx, idx)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated()
        if i:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - t0)
        m.zero_grad(set_to_none=True)
        del loss
    if a.profile and a.mode in ("crnet", "reversible"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _, loss = m(idx, idx)
            loss.backward()
        print(f"{label(a.mode, a.keep_z, a.rtol)}: top ops by self CPU time", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), file=sys.stderr)
    return {"mode": label(a.mode, a.keep_z, a.rtol), "held": held, "formula": formula, "rss_delta": rss_first,
            "step_s": statistics.median(times), "cuda_peak": cuda_peak, "tokens": tokens, "grad_err": grad_error(m, cfg, idx)}


def grad_error(m, cfg, idx):
    """The largest gradient errors against plain autograd on the same weights and batch, (matrices, vectors: betas
    and norms), each tensor against its own norm (tiny ones against 1e-2 of the median), as the tests measure it.
    A beta's gradient is a sum with heavy cancellation, so its relative error is the larger one."""
    ref = Transformer(cfg).to(idx.device)
    ref.load_state_dict(m.state_dict())
    grads = []
    for model in (ref, m):
        model.zero_grad(set_to_none=True)
        model(idx, idx)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    typical = torch.stack([g.norm() for g in grads[0].values()]).median()
    err = {n: ((grads[1][n] - g).norm() / torch.clamp(g.norm(), min=1e-2 * typical)).item() for n, g in grads[0].items()}
    return [max(e for n, e in err.items() if (grads[0][n].dim() >= 2) == matrix) for matrix in (True, False)]


def fresh_process(*args, timeout=None):
    """Run `tools/bench.py *args --one` in a new process (clean allocator, its own peak RSS); its last stdout line is
    JSON. Its warnings go to stderr, out of the table; a failure or a timeout is a SystemExit that says which."""
    try:
        p = subprocess.run([sys.executable, __file__, *args, "--one"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"stopped at the time budget ({timeout:.0f} s left for it)") from None
    if p.returncode:
        raise SystemExit(p.stderr.strip() or f"exit code {p.returncode}, nothing on stderr")
    if p.stderr.strip():
        print(p.stderr, file=sys.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def last_line(e):
    return str(e).strip().splitlines()[-1][:120]


ROWS = [("none", True, 1e-5), ("block", True, 1e-5), ("crnet", True, 1e-5), ("reversible", True, 1e-5),
        ("reversible", False, 1e-5), ("reversible", False, 1.0)]  # the last: the guard off in effect, C only


def label(mode, keep_z, rtol=1e-5):
    return mode + (", keep_z=False" if mode == "reversible" and not keep_z else "") + (f", rtol={rtol:g}" if rtol != 1e-5 else "")


def recompute_table(a, argv):
    rows = [fresh_process("recompute", f"--mode={m!r}", f"--keep_z={k}", f"--rtol={t}", *argv) for m, k, t in ROWS]
    r = {row["mode"]: row for row in rows}
    mib = 2 ** 20
    print(f"\nCR-Net LLaMA h={a.n_embd} L={a.n_layer} r={a.rank} h_ff={a.ff} heads={a.n_head}, batch {a.batch} x {a.seq} "
          f"tokens, checkpoint every {a.every}; float32, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print("| recompute | held activations (counted) | formula | vs block | RSS growth, first forward | step time | vs none | "
          "grad error vs none: matrices, vectors |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in (label(*row) for row in ROWS):
        x = r[mode]
        f = "-" if x["formula"] is None else f"{x['formula'] / mib:.1f} MiB"
        print(f"| {mode} | {x['held'] / mib:.1f} MiB | {f} | {x['held'] / r['block']['held']:.3f}x | "
              f"{x['rss_delta'] / mib:.1f} MiB | {x['step_s']:.3f} s | {x['step_s'] / r['none']['step_s']:.3f}x | "
              f"{x['grad_err'][0]:.1e}, {x['grad_err'][1]:.1e} |")
        if x["cuda_peak"]:
            print(f"|   cuda max_memory_allocated | {x['cuda_peak'] / mib:.1f} MiB |")
    print()
    for mode in (label(*row) for row in ROWS[2:]):
        print(f"{mode} / block held bytes: {r[mode]['held'] / r['block']['held']:.3f}; "
              f"step / none: {r[mode]['step_s'] / r['none']['step_s']:.3f}; "
              f"step / block: {r[mode]['step_s'] / r['block']['step_s']:.3f}")


@torch.no_grad()
def init_table(a):
    """Output std of every projection position at init relative to the full-rank model's, per layer:
    ours (beta_init = 1/sqrt(2), Var(X A B) = (1 - beta^2) Var(full)) against a naive init (beta = 1,
    X A B with the full-rank variance), which lets the lane variance grow with depth."""
    kw = dict(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, intermediate_size=a.ff, rank=a.rank,
              vocab_size=256, block_size=a.seq)
    idx = torch.randint(0, 256, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))

    def stds(m):
        out = {}
        hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, o.std(dim=(0, 1, 3))))
                 for n, mod in m.named_modules() if isinstance(mod, Projection)]
        m(idx)
        [h.remove() for h in hooks]
        return out
    torch.manual_seed(0)
    full = stds(Transformer(ModelConfig(param="full", **kw)))
    torch.manual_seed(0)
    ours = stds(Transformer(ModelConfig(param="crnet", **kw)))
    torch.manual_seed(0)
    naive_m = Transformer(ModelConfig(param="crnet", **kw))
    for mod in naive_m.modules():
        if isinstance(mod, Projection) and mod.lane_in:
            mod.B.mul_((1 - mod.beta_init ** 2) ** -0.5)
            mod.beta.fill_(1.0)
    naive = stds(naive_m)
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    print(f"output std / full-rank output std at init, LLaMA h={a.n_embd} L={a.n_layer} r={a.rank}\n")
    print("| layer | " + " | ".join(names) + " | naive init: " + " | ".join(names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for l in range(a.n_layer):
        row = lambda d: [f"{v:.2f}" for pos in ("qkv", "o", "up", "down") for v in (d[f'blocks.{l}.{pos}'] / full[f'blocks.{l}.{pos}']).tolist()]
        print(f"| {l + 1} | " + " | ".join(row(ours)) + " | " + " | ".join(row(naive)) + " |")


SIZES = ("60m", "130m", "350m", "1b", "7b")


MOE_SIZES = {"qwen3_moe": [], "qwen3_dense": ["--arch='qwen3'", "--n_expert=0", "--intermediate_size=1376"]}  # 2 x 688


def size_config(a, size, param, mode, dev):
    """train.py config of configs/{param}_llama_{size}.py (or, for MOE_SIZES, {param}_qwen3_moe_60m.py as it is or
    made dense at its active width) at the bench's batch, the paper's vocabulary (32000), the given recompute mode
    and the device's dtype (bf16 autocast on CUDA, float32 on the CPU)."""
    name = f"{param}_qwen3_moe_60m" if size in MOE_SIZES else f"{param}_llama_{size}"
    return configurator.load([str(Path(__file__).resolve().parents[1] / f"configs/{name}.py"), *MOE_SIZES.get(size, []),
                              f"--batch_size={a.batch}", "--vocab_size=32000", f"--recompute={mode!r}",
                              f"--dtype={'bfloat16' if dev == 'cuda' else 'float32'!r}"], "train.py")[0]


def size_one(a):
    """Runs in a fresh process: full training steps (forward, backward, AdamW) of one size/param/recompute, the
    model built as train.py builds it (parallel.build_model: recompute, then compile per region)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.experts != "auto":  # grouped: grouped_mm in the row's dtype (moe.run_experts loops where it can't)
        moe.GROUPED = {} if a.experts == "loop" else {dev.type: (torch.bfloat16, torch.float32)}
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py sets them
    c = size_config(a, a.size, a.param, a.mode, dev.type)
    lr, betas = 1e-4, (0.9, 0.95)  # AdamW's, and from them the lane plan's margin, as train.py gives it
    m, raw = par.build_model(model_config(c), "ddp", dev, 0, False, a.torch_compile,
                             (a.mode, c["recompute_every"], True, plan.LANE_RTOL, plan.adamw_drift(lr, betas)))
    opt = raw.configure_optimizers(0.0, lr, betas, dev.type)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    torch.manual_seed(0)
    idx = torch.randint(0, 32000, (a.batch, c["block_size"]), device=dev)
    times, warm = [], 3 if a.what == "gpu" else 1  # the first step compiles
    for i in range(warm + a.steps):
        t0 = time.perf_counter()
        with autocast:
            loss = m(idx, idx)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the GPU
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[warm:])
    tps = idx.numel() / step
    peak = par.peak_memory_mb(dev) * 2 ** 20  # max_memory_allocated, or the CPU process's peak RSS
    mfu = par.estimate_mfu(raw.flops_per_token(), tps, par.peak_flops_for(torch.cuda.get_device_name() if dev.type == "cuda" else ""))
    return {"params": raw.num_params()["total"], "step_s": step, "tps": tps, "peak": peak, "mfu": mfu, "loss": loss,
            "first_s": times[0]}


def sizes_table(a):
    """Full and CR-Net LLaMA at each paper size whose planned memory fits 90% of this machine, side by side."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    limit, gib = plan.device_memory(torch.device(dev), available=True), 2 ** 30
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"LLaMA paper sizes, vocab 32000, batch {a.batch} x 256 tokens, {a.steps} timed steps (median) after one warm-up; "
          f"{'bf16 autocast' if dev == 'cuda' else 'float32'}; device {name}; memory limit 90% of {limit / gib:.1f} GiB "
          f"{'(GPU)' if dev == 'cuda' else '(MemAvailable)'}")
    print("| size | param | params | recompute | step | tokens/s | vs full | peak memory | planned | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        base = None
        for param in ("full", "crnet"):
            for mode in ("none", "block", "crnet") if param == "crnet" else ("none", "block"):
                c = size_config(a, size, param, mode, dev)
                planned, P = plan.plan(c, "ddp", mode, 1)
                head = f"| {size} | {param} | {P / 1e6:.1f}M | {mode} |"
                if planned["total"] > 0.9 * limit:
                    print(f"{head} - | - | - | - | {planned['total'] / gib:.1f} GiB | does not fit |", flush=True)
                    continue
                r = fresh_process("sizes", f"--size={size}", f"--param={param}", f"--mode={mode}", f"--batch={a.batch}",
                                  f"--steps={a.steps}", f"--torch_compile={a.torch_compile}")
                base = base or (r if param == "full" else None)  # full with no recompute, or block if none does not fit
                vs = f"{r['tps'] / base['tps']:.3f}x" if base else "-"
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                print(f"{head} {r['step_s']:.3f} s | {r['tps']:,.0f} | {vs} | {r['peak'] / gib:.2f} GiB | "
                      f"{planned['total'] / gib:.2f} GiB | {mfu} |", flush=True)
    print("vs full: tokens/s against the size's first full-rank row that ran (no recompute, or block where that does "
          "not fit). peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak RSS "
          "(including ~0.3 GiB of Python/torch runtime). planned: plan.py's DDP total for this batch on one device.")


def moe_table(a):
    """Qwen-3-MoE (8 experts of 688, top 2) against dense Qwen-3 of SwiGLU width 1376, so both run the same matmul
    parameters per token: full training steps, full-rank and CR-Net, no recompute, each in a fresh process."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"configs/{{full,crnet}}_qwen3_moe_60m.py and their dense twin (n_expert=0, intermediate_size=1376), vocab "
          f"32000, batch {a.batch} x 256 tokens, {a.steps} timed steps (median) after one warm-up, torch_compile="
          f"{a.torch_compile}; {'bf16 autocast' if dev == 'cuda' else 'float32'}; device {name}")
    if not moe.grouped_kernel(torch.device(dev)):  # then moe.run_experts loops
        print("the 'grouped' rows run the experts loop: grouped_mm needs the CPU or an sm90 GPU, and a torch with it")
    print("| param | MLP | experts | params | FLOPs/token | step | tokens/s | vs dense | peak memory | planned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for param in ("full", "crnet"):
        dense = None
        for size, experts in (("qwen3_dense", "-"), ("qwen3_moe", "loop"), ("qwen3_moe", "grouped")):
            c = size_config(a, size, param, "none", dev)
            planned, P = plan.plan(c, "ddp", "none", 1)
            with torch.device("meta"):
                flops = Transformer(model_config(c)).flops_per_token()
            mlp = "SwiGLU 1376" if size == "qwen3_dense" else "8 x 688, top 2"
            try:
                r = fresh_process("sizes", f"--size={size}", f"--param={param}", "--mode='none'", f"--batch={a.batch}",
                                  f"--steps={a.steps}", f"--torch_compile={a.torch_compile}",
                                  f"--experts={'auto' if experts == '-' else experts!r}")
            except SystemExit as e:  # e.g. out of memory: say so in the row, and go on with the others
                print(f"| {param} | {mlp} | {experts} | {P / 1e6:.1f}M | {flops / 1e6:.0f}M | failed: {last_line(e)} |",
                      flush=True)
                continue
            dense = r if experts == "-" else dense
            vs = f"{r['tps'] / dense['tps']:.3f}x" if dense else "-"  # "-": the dense row failed
            print(f"| {param} | {mlp} | {experts} | {P / 1e6:.1f}M | {flops / 1e6:.0f}M | {r['step_s']:.3f} s | "
                  f"{r['tps']:,.0f} | {vs} | {r['peak'] / 2 ** 30:.2f} GiB | "
                  f"{planned['total'] / 2 ** 30:.2f} GiB |", flush=True)
    print("peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak RSS (including ~0.3 GiB of "
          "Python/torch runtime). planned: plan.py's DDP total for this batch on one device.")


def bytes_table(a):
    """Memory traffic's first proxy, countable on any device: bytes allocated and aten ops run in one training step
    under bf16 autocast (torch.profiler with profile_memory), full rank against CR-Net, eager and compiled."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"one bf16-autocast training step, LLaMA h {a.n_embd}, {a.n_layer} layers, h_ff {a.ff}, r {a.rank}, "
          f"{a.batch} x {a.seq} tokens, vocab 256; device {dev}")
    print("| param | recompute | compile | allocated MiB | aten ops |")
    print("|---|---|---|---|---|")
    for param, mode, compiled in (("full", "none", False), ("crnet", "none", False), ("crnet", "crnet", False),
                                  ("full", "none", True), ("crnet", "none", True), ("crnet", "crnet", True)):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, intermediate_size=a.ff, rank=a.rank,
                          vocab_size=256, block_size=a.seq, param=param)
        # beta_drift 0: no optimizer step moves the betas between the two steps (the CUDA plan reads the first's)
        m, _ = par.build_model(cfg, "ddp", dev, 0, False, compiled, (mode, a.every, True, plan.LANE_RTOL, 0.0))
        idx = torch.randint(0, 256, (a.batch, a.seq), device=dev)
        for profiled in (False, True):  # the first step warms up (and compiles)
            m.zero_grad(set_to_none=True)  # as train.py: each step allocates its gradients
            with torch.profiler.profile(profile_memory=True) if profiled else contextlib.nullcontext() as prof, \
                    torch.autocast(dev.type, dtype=torch.bfloat16):
                m(idx, idx)[1].backward()
        events = prof.key_averages()
        alloc = sum(max(e.self_cpu_memory_usage, 0) + max(getattr(e, "self_device_memory_usage", 0), 0) for e in events)
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"| {param} | {mode} | {'yes' if compiled else 'no'} | {alloc / 2 ** 20:,.1f} | {ops:,} |", flush=True)


# (size, micro-batch, param, recompute, compile): the table of the GPU-speed targets, in one run; the rows the
# targets name first (each against the first row of its size), eager last, so a time budget cuts the least needed
GPU_ROWS = [("1b", 32, "full", "none", True), ("1b", 32, "crnet", "none", True),
            ("1b", 32, "crnet", "crnet", True), ("1b", 32, "crnet", "reversible", True),
            ("350m", 64, "full", "none", True), ("350m", 64, "crnet", "none", True),
            ("1b", 32, "full", "none", False), ("1b", 32, "crnet", "none", False)]


def gpu_table(a, given):
    """GPU_ROWS side by side, each in a fresh process, bf16 autocast (float32 on the CPU), fused AdamW on CUDA."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    steps = a.steps if "steps" in given else 6
    sizes = a.sizes.split(",") if "sizes" in given else ["350m", "1b"]
    rows = [r for r in GPU_ROWS if r[0] in sizes] + [(s, a.batch, p, m, c) for s in sizes if s not in ("350m", "1b")
                                                     for z, _, p, m, c in GPU_ROWS if z == "1b"]
    print(f"one training step (forward, backward, AdamW) of LLaMA at paper sizes, vocab 32000, sequence 256; "
          f"{'bf16 autocast' if dev == 'cuda' else 'float32'}; median of {steps} steps after 3 warm-up steps; device {name}; "
          f"torch {torch.__version__}; each row a fresh process built as train.py builds it")
    print("| size | param | recompute | compile | micro-batch | step | tokens/s | vs full, compiled | MFU | peak GiB | "
          "planned GiB | first step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base, t_start = {}, time.perf_counter()
    for size, batch, param, mode, compiled in rows:
        batch = a.batch if "batch" in given else batch
        head = f"| {size} | {param} | {mode} | {'yes' if compiled else 'no'} | {batch} x 256 |"
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 10:
            print(f"{head} not run: budget_s={a.budget_s:g} spent |", flush=True)
            continue
        try:
            r = fresh_process("gpu", f"--size={size}", f"--param={param}", f"--mode={mode}", f"--batch={batch}",
                              f"--steps={steps}", f"--torch_compile={compiled}", timeout=left)
        except SystemExit as e:  # e.g. out of memory or out of time: say so in the row, and go on with the others
            print(f"{head} failed: {last_line(e)} |", flush=True)
            continue
        if param == "full" and mode == "none" and compiled:
            base[size] = r["tps"]
        planned = plan.plan(size_config(SimpleNamespace(batch=batch), size, param, mode, dev), "ddp", mode, 1)[0]
        vs = f"{r['tps'] / base[size]:.2f}x" if size in base else "-"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{head} {r['step_s']:.3f} s | {r['tps']:,.0f} | {vs} | {mfu} | {r['peak'] / 2 ** 30:.1f} | "
              f"{planned['total'] / 2 ** 30:.1f} | {r['first_s']:.0f} s |", flush=True)
    print(f"vs full, compiled: tokens/s against full rank with no recompute, compiled, at the same size. MFU: "
          f"model.flops_per_token (6 x matmul parameters + attention) against parallel.PEAK_FLOPS. peak: torch.cuda.max_memory_allocated (the CPU: peak RSS). planned: plan.py's "
          f"DDP total. first step: includes compilation. Total {time.perf_counter() - t_start:.0f} s.")


def main(argv):
    c, given = configurator.load(argv, "tools/bench.py", positional="what", doc=__doc__)
    a = SimpleNamespace(**c)
    bad = [s for s in a.sizes.split(",") if s not in SIZES] if a.what in ("sizes", "gpu") else []
    if bad:  # before the table's first line
        raise configurator.ConfigError("sizes", a.sizes, f"{bad[0]!r} is not one of {', '.join(SIZES)}")
    if a.what == "init":
        return init_table(a)
    if a.what == "bytes":
        return bytes_table(a)
    if a.what == "moe":
        return moe_table(a)
    if a.what in ("sizes", "gpu"):
        if a.one:
            return print(json.dumps(size_one(a)))
        return sizes_table(a) if a.what == "sizes" else gpu_table(a, given)
    if a.one:
        print(json.dumps(one_mode(a)))
    else:
        for key in ("mode", "keep_z", "rtol"):  # each row sets these itself
            if any(x.startswith(f"--{key}=") for x in argv):
                raise configurator.ConfigError(key, c[key], "is set per row by the recompute table (see ROWS in tools/bench.py)")
        recompute_table(a, [x for x in argv if not x.startswith(("--mode", "--keep_z", "--rtol", "--what")) and x != "recompute"])


if __name__ == "__main__":
    configurator.main_guard(main)
