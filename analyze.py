"""
The paper's observation (method note, section 1) on our own checkpoints: the change of a projection's
output from layer l-1 to layer l is closer to low rank than the output itself.

    python analyze.py --out_dir=out_full                   # any param type; rank defaults to n_embd / 4
    python analyze.py --out_dir=out_full --rank=32 --tokens=8192 --plot=observation.png

For every layer l >= 2 and projection position P (q, k, v, o, gate, up, down; GPT-2: fc for gate/up), on
`tokens` validation tokens, with Y_l the (tokens x h_out) output of P at layer l:
    direct    ||Y_l - best_r(Y_l)||_F / ||Y_l||_F
    residual  ||R - best_r(R)||_F / ||Y_l||_F,   R = Y_l - beta* Y_{l-1},  beta* = <Y_l, Y_{l-1}> / ||Y_{l-1}||^2
    ratio     residual / direct (the paper reports 0.4-0.97)
    cosine    <Y_l, Y_{l-1}> / (||Y_l|| ||Y_{l-1}||)
best_r is the best rank-r approximation (truncated SVD). The plot needs matplotlib (optional).
"""
import sys
from pathlib import Path

import numpy as np
import torch

import configurator
from parallel import load_for_inference

# ----------------------------------------------------------------------------- config
out_dir = "out"      # the run to analyze
rank = 0             # r; 0 = n_embd // 4 [>=0]
tokens = 8192        # validation tokens [>=1]
plot = ""            # write a plot here (needs matplotlib)
# -----------------------------------------------------------------------------


def tail_energy(m, r):
    """||M - best_r(M)||_F: the singular values beyond the r-th (Eckart-Young)."""
    s = torch.linalg.svdvals(m.double())
    return s[r:].square().sum().sqrt().item()


def observation(y_prev, y, r):
    """dict(direct, residual, ratio, cosine, beta) for one position between adjacent layers; y: (N, h_out)."""
    y_prev, y = y_prev.double(), y.double()
    norm = y.norm().item()
    beta = (y * y_prev).sum() / y_prev.square().sum()  # least squares
    direct = tail_energy(y, r) / norm
    residual = tail_energy(y - beta * y_prev, r) / norm
    return {"direct": direct, "residual": residual, "ratio": residual / direct if direct else float("nan"),
            "cosine": ((y * y_prev).sum() / (norm * y_prev.norm())).item(), "beta": beta.item()}


@torch.no_grad()
def collect_outputs(model, idx):
    """{(layer, position name): (N, h_out) float32 output} for every projection, via forward hooks."""
    names = {"qkv": ["q", "k", "v"], "o": ["o"], "up": ["gate", "up"] if model.cfg.arch == "llama" else ["fc"],
             "down": ["down"]}
    out, hooks = {}, []
    for l, blk in enumerate(model.blocks):
        for group in names:
            def hook(mod, inp, y, l=l, group=group):  # y: (B, T, n, h_out)
                for j, name in enumerate(names[group]):
                    out.setdefault((l, name), []).append(y[:, :, j].reshape(-1, y.shape[-1]).float())
            hooks.append(getattr(blk, group).register_forward_hook(hook))
    for i in range(0, len(idx), 8):
        model(idx[i:i + 8])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv):
    c, _ = configurator.load(argv, "analyze.py", doc=__doc__)
    model, ckpt = load_for_inference(c["out_dir"])
    cfg = model.cfg
    r = c["rank"] or cfg.n_embd // 4
    data_dir = Path(ckpt["config"]["data_dir"])
    val = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    T = cfg.block_size
    n = min(c["tokens"] // T, (len(val) - 1) // T)
    if n < 1:
        raise ValueError(f"tokens={c['tokens']} is less than one block of {T}")
    idx = torch.from_numpy(val[:n * T].astype(np.int64)).view(n, T)
    ys = collect_outputs(model, idx)
    positions = [p for (l, p) in ys if l == 0]
    print(f"{c['out_dir']}: param={cfg.param}, {cfg.n_layer} layers, h={cfg.n_embd}, rank r={r}, {n * T} val tokens")
    print("| layer | position | direct | residual | ratio | cosine | beta* |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for l in range(1, cfg.n_layer):
        for p in positions:
            o = observation(ys[(l - 1, p)], ys[(l, p)], r)
            rows.append((l + 1, p, o))
            print(f"| {l + 1} | {p} | {o['direct']:.3f} | {o['residual']:.3f} | {o['ratio']:.3f} | {o['cosine']:.3f} | {o['beta']:.3f} |")
    ratios = np.array([o["ratio"] for *_, o in rows])
    print(f"ratio residual/direct: median {np.median(ratios):.3f}, range {ratios.min():.3f}-{ratios.max():.3f}; "
          f"residual below direct in {int((ratios < 1).sum())} of {len(ratios)} (paper: 0.4-0.97)")
    if c["plot"]:
        plot(rows, positions, cfg.n_layer, c["plot"], f"{c['out_dir']} (r={r})")
    return rows


def plot(rows, positions, n_layer, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the table above has the numbers")
        return
    fig, axes = plt.subplots(1, len(positions), figsize=(2.6 * len(positions), 2.8), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), positions):
        ls = [l for l, q, _ in rows if q == p]
        ax.plot(ls, [o["direct"] for _, q, o in rows if q == p], "o-", label="rank-r of Y_l")
        ax.plot(ls, [o["residual"] for _, q, o in rows if q == p], "s-", label="beta* Y_{l-1} + rank-r")
        ax.set_title(p)
        ax.set_xlabel("layer")
    np.atleast_1d(axes)[0].set_ylabel("relative error")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).stem + ".tmp" + Path(path).suffix)
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
