"""
CR-Net's premise, measured on our own checkpoints. CR-Net (arXiv 2509.18993) rests on an observation about
trained transformers: for a projection P (q, k, v, o, gate, up, down) the output at layer l is better
described as "a multiple of the same projection's output at layer l-1, plus something of low rank" than
as "something of low rank" alone. In symbols, with Y_l the (tokens x h_out) output of P at layer l and
best_r the best rank-r approximation (truncated SVD): some beta makes
    ||R - best_r(R)||_F  <  ||Y_l - best_r(Y_l)||_F,      R = R(beta) = Y_l - beta Y_{l-1}.

    python analyze.py --out_dir=out_full                   # any param type; rank defaults to n_embd / 4
    python analyze.py --out_dir=out_full --rank=32 --tokens=8192 --plot=observation.png
    python analyze.py --hf=openai-community/gpt2             # a pretrained Hugging Face model (hf.py), full-rank
    python analyze.py --hf=path/to/llama --data_dir=data/mine  # val.bin tokenized with that model's tokenizer

For every layer l >= 2 and position P, on `tokens` validation tokens, all relative to ||Y_l||_F:
    direct        ||Y_l - best_r(Y_l)||_F
    residual LS   the rank-r tail of R(beta_ls), beta_ls = <Y_l, Y_{l-1}> / ||Y_{l-1}||^2 (least squares on
                  the whole output; it can make the tail worse than beta = 0 does, i.e. ratio > 1)
    residual best the rank-r tail of R(beta_best), beta_best the beta that minimises that tail. beta = 0 gives
                  R = Y_l, so the best ratio is <= 1 by construction; it is < 1 exactly when the claim holds.
    ratio         residual / direct, for either beta (the paper reports ratios of 0.4-0.97)
    cosine        <Y_l, Y_{l-1}> / (||Y_l|| ||Y_{l-1}||)
The tail energy of R(beta) is the sum of the h_out - r smallest eigenvalues of
    G(beta) = R^T R = G_yy - beta (G_yp + G_py) + beta^2 G_pp,
so the three h_out x h_out Gram matrices are formed once (float64) and beta_best is found by a 1-D search:
a grid over every beta that could beat beta = 0 (see best_beta), with 0 and beta_ls among its points, then
golden-section refinement around the best one. The reported errors are explicit SVDs at that beta.

On a CR-Net checkpoint the structure is built in (Y_l = s Y_{l-1} + X A B, rank(X A B) <= the model's rank),
so ratios near 0 there say nothing about the observation; a full-rank model (param=full) is the real test.

With --hf the model is loaded by hf.load_pretrained (a local directory or a hub name) and run on tokens of its
own tokenizer: --data_dir, or for GPT-2 models (OpenAI's 50257-token BPE) the bundled corpus as GPT-2 BPE
(data/shakespeare_gpt2, prepared on first use). prepare_data.py tokenizes with bytes or tiktoken encodings only;
for a LLaMA tokenizer write val.bin (uint16 ids, so at most 65536 of them: not LLaMA 3's) and meta.json in its
format yourself. Under grouped-query attention k and v are kv_dim wide, and r must be below that too.

The plot needs matplotlib (optional).
"""
import math
from pathlib import Path

import numpy as np
import torch

import configurator
from parallel import load_for_inference
from plot import image_path, save_figure
from prepare_data import ROOT, load_meta, prepare

# ----------------------------------------------------------------------------- config
out_dir = "out"    # checkpoint directory written by train.py: ckpt.pt or ckpt_dcp/iter_*
hf = ""            # a Hugging Face model name or local directory: analyze a pretrained model instead of out_dir
data_dir = ""      # prepared tokens (val.bin) to run; "" = the checkpoint's, or with hf the bundled corpus (GPT-2 only)
rank = 0           # r of the rank-r approximations; 0 = min(n_embd, kv_dim) // 4; else below every width and the tokens [>=0]
tokens = 8192      # validation tokens run through the model, in whole blocks of block_size [>=1]
below = 0.95       # the summary counts the best-beta ratios under this [>0]
plot = ""          # image path for the errors per layer, written if matplotlib is installed; "" = no plot
# -----------------------------------------------------------------------------

GPT2_DATA = ROOT / "data" / "shakespeare_gpt2"  # the bundled corpus as GPT-2 BPE, as train.py prepares it
GPT2_VOCAB = 50257
GRID = 41                     # uniform grid points over [-2 rho, 2 rho]; see best_beta
GOLDEN = (math.sqrt(5) - 1) / 2


def tail_energy(m, r):
    """||M - best_r(M)||_F: the singular values beyond the r-th (Eckart-Young)."""
    s = torch.linalg.svdvals(m.double())
    return s[r:].square().sum().sqrt().item()


def grams(y_prev, y):
    """(G_yy, G_yp + G_py, G_pp) in float64: everything the tail of Y - beta Y_prev depends on."""
    y_prev, y = y_prev.double(), y.double()
    g_yp = y.T @ y_prev
    return y.T @ y, g_yp + g_yp.T, y_prev.T @ y_prev


def tail_sq(g, beta, r):
    """||R - best_r(R)||_F^2 for R = Y - beta Y_prev, from g = grams(Y_prev, Y): the h_out - r smallest
    eigenvalues of R^T R (clamped at 0 against round-off)."""
    g_yy, g_sym, g_pp = g
    ev = torch.linalg.eigvalsh(g_yy - beta * g_sym + beta * beta * g_pp)  # ascending
    return ev[:ev.numel() - r].clamp_min(0).sum().item()


def best_beta(y_prev, y, r, grid=GRID, tol=1e-7):
    """The beta minimising the rank-r tail of Y - beta Y_prev, and that tail's squared energy. Never worse
    than beta = 0 or the least-squares beta: both are candidates.

    Where to look: with R = Y - beta Y_prev and M = best_r(R), -M is a rank-r approximation of beta Y_prev
    = Y - R with error ||Y - (R - M)|| <= ||Y|| + tail_r(R); so tail_r(R) >= |beta| tail_r(Y_prev) - ||Y||,
    and no |beta| > B = (||Y|| + tail_r(Y)) / tail_r(Y_prev) can beat beta = 0. The grid is uniform over
    [-2 rho, 2 rho], rho = ||Y|| / ||Y_prev|| (beta_ls lies there), and geometric (4 points an octave)
    from there out to B; B can be far out when Y_prev has a large low-rank part."""
    g = grams(y_prev, y)
    pp = g[2].trace().item()
    if pp == 0.0:
        return 0.0, tail_sq(g, 0.0, r)
    yy = g[0].trace().item()
    rho = math.sqrt(yy / pp)
    beta_ls = 0.5 * g[1].trace().item() / pp
    ev_p = torch.linalg.eigvalsh(g[2])
    tail_p = math.sqrt(ev_p[:ev_p.numel() - r].clamp_min(0).sum().item())
    bound = (math.sqrt(yy) + math.sqrt(tail_sq(g, 0.0, r))) / tail_p if tail_p > 0 else math.inf
    bound = min(bound, 2.0 ** 20 * rho)  # Y_prev of rank <= r: no finite bound; stop a million rho out
    outer = [2 * rho * 2.0 ** (k / 4) for k in range(1, 4 * 21) if 2 * rho * 2.0 ** ((k - 1) / 4) < bound]
    points = sorted(set(np.linspace(-2 * rho, 2 * rho, grid).tolist()) | {0.0, beta_ls}
                    | set(outer) | {-b for b in outer})
    f = {b: tail_sq(g, b, r) for b in points}
    i = min(range(len(points)), key=lambda k: f[points[k]])
    lo, hi = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
    # golden section on [lo, hi]; a unimodal f there is not guaranteed, so the grid's best stays a candidate
    c, d = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fc, fd = tail_sq(g, c, r), tail_sq(g, d, r)
    f[c], f[d] = fc, fd
    for _ in range(200):  # 0.618^200: far past float resolution; the cap only guards against a stuck bracket
        if hi - lo <= tol * max(rho, abs(lo), abs(hi)):
            break
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - GOLDEN * (hi - lo)
            fc = f[c] = tail_sq(g, c, r)
        else:
            lo, c, fc = c, d, fd
            d = lo + GOLDEN * (hi - lo)
            fd = f[d] = tail_sq(g, d, r)
    beta = min(f, key=lambda b: (f[b], abs(b)))  # ties go to the smaller |beta|, so to 0 if it ties
    return beta, f[beta]


def observation(y_prev, y, r):
    """One position between adjacent layers; y_prev, y: (N, h_out). dict of direct, ls_residual, ls_ratio,
    best_residual, best_ratio (errors relative to ||Y_l||), ls_beta, best_beta, cosine."""
    y_prev, y = y_prev.double(), y.double()
    norm, norm_prev, dot = y.norm().item(), y_prev.norm().item(), (y * y_prev).sum().item()
    beta_ls = dot / norm_prev ** 2 if norm_prev else 0.0
    beta, _ = best_beta(y_prev, y, r)
    direct = tail_energy(y, r)
    ls = tail_energy(y - beta_ls * y_prev, r)
    best = tail_energy(y - beta * y_prev, r) if beta != 0.0 else direct
    if best > direct:  # the search compared Gram eigenvalues; SVD round-off must not put beta above beta = 0
        beta, best = 0.0, direct
    ratio = lambda e: e / direct if direct else float("nan")
    rel = lambda e: e / norm if norm else float("nan")
    return {"direct": rel(direct), "ls_residual": rel(ls), "ls_ratio": ratio(ls), "best_residual": rel(best),
            "best_ratio": ratio(best), "ls_beta": beta_ls, "best_beta": beta,
            "cosine": dot / (norm * norm_prev) if norm and norm_prev else float("nan")}


@torch.no_grad()
def collect_outputs(model, idx):
    """{(layer, position name): (N, h_out) float32 output} for every projection, via forward hooks."""
    names = {"qkv": ["q", "k", "v"], "o": ["o"], "up": ["gate", "up"] if model.cfg.arch == "llama" else ["fc"],
             "down": ["down"]}
    out, hooks = {}, []
    h, kv = model.cfg.n_embd, model.cfg.kv_dim
    for l, blk in enumerate(model.blocks):
        for group in names:
            def hook(mod, inp, y, l=l, group=group):  # y: (B, T, n, h_out)
                # grouped-query attention: one (B, T, 1, h + 2 kv_dim) output, cut into q, k, v
                gqa = y.shape[2] != len(names[group])
                parts = y[:, :, 0].split((h, kv, kv), -1) if gqa else y.unbind(2)
                for name, t in zip(names[group], parts, strict=True):
                    out.setdefault((l, name), []).append(t.reshape(-1, t.shape[-1]).float())
            hooks.append(getattr(blk, group).register_forward_hook(hook))
    for i in range(0, len(idx), 8):
        model(idx[i:i + 8])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def check_rank(r, widths, n_tokens):
    """r must leave a tail: 1 <= r < every projection width and < the number of tokens."""
    limit = min(min(widths), n_tokens)
    if not 1 <= r < limit:
        raise configurator.ConfigError(
            "rank", r, f"must be 1 <= rank <= {limit - 1}: below the narrowest projection width ({min(widths)}) "
                       f"and the number of tokens ({n_tokens}); at rank >= width the rank-r approximation is exact "
                       f"and there is no tail to compare")


def structure_note(cfg):
    """A line saying when the checkpoint's own parameterization makes the measurement trivial, else None."""
    ranks = [cfg.layer_rank(l) for l in range(1, cfg.n_layer)]
    rk = f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
    if cfg.param == "crnet":
        return (f"note: param=crnet: this model computes Y_l = s*Y_{{l-1}} + X A B with rank(X A B) <= {rk} at every "
                f"layer l >= 2, so the structure holds by construction (beta = s, ratio ~0 at r >= {rk}). A ratio "
                f"near 0 here says nothing about the paper's observation; the meaningful test is a full-rank model "
                f"(param=full).")
    if cfg.param in ("lowrank", "cola", "cola_mlp"):
        return (f"note: param={cfg.param}: every output has rank <= {rk} by construction; at r >= {rk} the direct "
                f"error is ~0 and the ratios are meaningless; the meaningful test is a full-rank model (param=full).")
    return None


def hf_data_dir(c, cfg):
    """Where a pretrained model's validation tokens are: data_dir, or the bundled corpus for GPT-2's BPE."""
    if c["data_dir"]:
        return Path(c["data_dir"])
    if cfg.arch == "gpt2" and cfg.vocab_size == GPT2_VOCAB:
        if not (GPT2_DATA / "meta.json").is_file():
            print(f"preparing {GPT2_DATA} from the bundled corpus (tiktoken gpt2)")
            prepare(GPT2_DATA, tokenizer="gpt2")
        return GPT2_DATA
    raise configurator.ConfigError(
        "data_dir", c["data_dir"], f"{c['hf']} is a {cfg.arch} model with a {cfg.vocab_size}-token vocabulary, not "
                                   f"GPT-2's BPE: pass --data_dir=DIR with val.bin prepared (prepare_data.py) with that "
                                   f"model's own tokenizer")


def load(c):
    """(model, directory of the val.bin to run, the name to print)."""
    if c["hf"]:
        from hf import load_pretrained
        model = load_pretrained(c["hf"])
        data_dir = hf_data_dir(c, model.cfg)
    else:
        model, ckpt = load_for_inference(c["out_dir"])
        data_dir = Path(c["data_dir"] or ckpt["config"]["data_dir"])
    if c["hf"] or c["data_dir"]:
        meta = load_meta(data_dir)
        if meta["max_token_id"] >= model.cfg.vocab_size:
            raise configurator.ConfigError(
                "data_dir", str(data_dir), f"holds token ids up to {meta['max_token_id']} ({meta['tokenizer']} "
                                           f"tokenizer), beyond the model's vocabulary of {model.cfg.vocab_size}")
    return model, data_dir, c["hf"] or c["out_dir"]


def main(argv):
    c, _ = configurator.load(argv, "analyze.py", doc=__doc__)
    if c["plot"]:
        image_path("plot", c["plot"])
    model, data_dir, name = load(c)
    cfg = model.cfg
    r = c["rank"] or min(cfg.n_embd, cfg.kv_dim) // 4
    val = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    T = cfg.block_size
    n = min(c["tokens"] // T, (len(val) - 1) // T)
    if n < 1:
        raise configurator.ConfigError("tokens", c["tokens"], f"is less than one block of {T}")
    check_rank(r, (cfg.n_embd, cfg.ff_dim, cfg.kv_dim), n * T)
    idx = torch.from_numpy(val[:n * T].astype(np.int64)).view(n, T)
    ys = collect_outputs(model, idx)
    positions = [p for (l, p) in ys if l == 0]
    print(f"{name}: param={cfg.param}, {cfg.n_layer} layers, h={cfg.n_embd}, rank r={r}, {n * T} val tokens"
          f"{f' from {data_dir}' if c['hf'] or c['data_dir'] else ''}")
    note = structure_note(cfg)
    if note:
        print(note)
    print("errors relative to ||Y_l||; LS = least-squares beta, best = beta minimising the rank-r tail")
    print("| layer | position | direct | residual LS | ratio LS | residual best | ratio best | beta LS | beta best | cosine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for l in range(1, cfg.n_layer):
        for p in positions:
            o = observation(ys[(l - 1, p)], ys[(l, p)], r)
            rows.append((l + 1, p, o))
            print(f"| {l + 1} | {p} | {o['direct']:.4f} | {o['ls_residual']:.4f} | {o['ls_ratio']:.3f} | "
                  f"{o['best_residual']:.4f} | {o['best_ratio']:.3f} | {o['ls_beta']:.3f} | {o['best_beta']:.3f} | "
                  f"{o['cosine']:.3f} |")
    ls = np.array([o["ls_ratio"] for *_, o in rows])
    best = np.array([o["best_ratio"] for *_, o in rows])
    print(f"ratio residual/direct at r={r}: LS beta median {np.median(ls):.3f}, range {ls.min():.3f}-{ls.max():.3f}; "
          f"best beta median {np.median(best):.3f}, range {best.min():.3f}-{best.max():.3f}; "
          f"best-beta ratio below {c['below']:g} in {int((best < c['below']).sum())} of {len(best)} "
          f"(paper: 0.4-0.97)")
    if c["plot"]:
        plot_errors(rows, positions, c["plot"], f"{name} ({cfg.param}, r={r})")
    return rows


def plot_errors(rows, positions, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the table above has the numbers")
        return
    fig, axes = plt.subplots(1, len(positions), figsize=(2.6 * len(positions), 2.9), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), positions):
        mine = [(l, o) for l, q, o in rows if q == p]
        ls = [l for l, _ in mine]
        ax.plot(ls, [o["direct"] for _, o in mine], "o-", label="rank-r of Y_l")
        ax.plot(ls, [o["ls_residual"] for _, o in mine], "s--", label="LS beta Y_{l-1} + rank-r")
        ax.plot(ls, [o["best_residual"] for _, o in mine], "^-", label="best beta Y_{l-1} + rank-r")
        ax.set_title(p)
        ax.set_xlabel("layer")
    np.atleast_1d(axes)[0].set_ylabel("relative error")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    configurator.main_guard(main)
