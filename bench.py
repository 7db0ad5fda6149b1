"""
Benchmarks that print tables (never assertions; tests/ holds those).

    python bench.py recompute            # none / block / crnet recompute side by side, one fresh process each
    python bench.py recompute --profile  # plus where crnet's step time goes
    python bench.py init                 # per-layer output std at init, CR-Net vs full-rank (README "Initialization")

Defaults are a 7B-like CR-Net LLaMA shape scaled to a CPU: h 1024, 16 layers, r 256, h_ff 2736,
sequence 256. Pass --n_embd=... etc. to change it. On a GPU (when one is lent) the same command also
reports torch.cuda.max_memory_allocated.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from model import ModelConfig, Projection, Transformer


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_mode(a):
    """Runs in a fresh process: held bytes, resident memory growth over the forward, step times."""
    from recompute import held_activation_bytes, plan_stored_lanes, stored_numbers_per_token
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, intermediate_size=a.ff, rank=a.rank,
                      vocab_size=256, block_size=a.seq, param="crnet", recompute=a.mode, recompute_every=a.every)
    m = Transformer(cfg).to(dev)
    idx = torch.randint(0, 256, (a.batch, a.seq), device=dev)
    tokens = idx.numel()
    before = rss_bytes()
    held, loss = held_activation_bytes(m, idx, idx)  # counted, inside the layer loop
    rss_first = rss_bytes() - before  # resident growth over the first forward of this fresh process
    loss.backward()
    m.zero_grad(set_to_none=True)
    del loss
    formula = None
    if a.mode != "none":
        store = plan_stored_lanes(m.blocks, a.every, torch.float32) if a.mode == "crnet" else None
        formula = stored_numbers_per_token(cfg, a.mode, store) * 4 * tokens
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
    if a.profile and a.mode == "crnet":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _, loss = m(idx, idx)
            loss.backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), file=sys.stderr)
    return {"mode": a.mode, "held": held, "formula": formula, "rss_delta": rss_first,
            "step_s": statistics.median(times), "cuda_peak": cuda_peak, "tokens": tokens}


def recompute_table(a, argv):
    rows = []
    for mode in ("none", "block", "crnet"):
        p = subprocess.run([sys.executable, __file__, "recompute", "--_one", f"--mode={mode}", *argv],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
        if p.stderr.strip():
            print(p.stderr)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    r = {row["mode"]: row for row in rows}
    mib = 2 ** 20
    print(f"\nCR-Net LLaMA h={a.n_embd} L={a.n_layer} r={a.rank} h_ff={a.ff} heads={a.n_head}, batch {a.batch} x {a.seq} "
          f"tokens, checkpoint every {a.every}; float32, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print("| recompute | held activations (counted) | formula | vs block | RSS growth, first forward | step time | vs none |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("none", "block", "crnet"):
        x = r[mode]
        f = "-" if x["formula"] is None else f"{x['formula'] / mib:.1f} MiB"
        print(f"| {mode} | {x['held'] / mib:.1f} MiB | {f} | {x['held'] / r['block']['held']:.3f}x | "
              f"{x['rss_delta'] / mib:.1f} MiB | {x['step_s']:.3f} s | {x['step_s'] / r['none']['step_s']:.3f}x |")
        if x["cuda_peak"]:
            print(f"|   cuda max_memory_allocated | {x['cuda_peak'] / mib:.1f} MiB |")
    print(f"\ncrnet / block held bytes: {r['crnet']['held'] / r['block']['held']:.3f}; "
          f"crnet step / none: {r['crnet']['step_s'] / r['none']['step_s']:.3f}; "
          f"crnet step / block: {r['crnet']['step_s'] / r['block']['step_s']:.3f}")


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["recompute", "init"])
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--n_layer", type=int, default=16)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--ff", type=int, default=2736)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--mode", default="crnet")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.what == "init":
        return init_table(a)
    if a._one:
        print(json.dumps(one_mode(a)))
    else:
        recompute_table(a, [x for x in sys.argv[2:] if not x.startswith("--mode")])


if __name__ == "__main__":
    main()
