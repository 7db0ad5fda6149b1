"""
CR-Net's premise, measured on our own checkpoints. CR-Net (arXiv 2509.18993) rests on an observation about
trained transformers: for a projection P (q, k, v, o, gate, up, down) the output at layer l is better
described as "a multiple of the same projection's output at layer l-1, plus something of low rank" than
as "something of low rank" alone. In symbols, with Y_l the (tokens x h_out) output of P at layer l and
best_r the best rank-r approximation (truncated SVD): some beta makes
    ||R - best_r(R)||_F  <  ||Y_l - best_r(Y_l)||_F,      R = R(beta) = Y_l - beta Y_{l-1}.

    python tools/analyze.py --out_dir=out_full                   # any param type; rank: the narrowest width / 4
    python tools/analyze.py --out_dir=out_full --rank=32 --tokens=8192 --plot=observation.png
    python tools/analyze.py --hf=openai-community/gpt2             # a pretrained Hugging Face model (tools/hf.py), full-rank
    python tools/analyze.py --hf=path/to/llama --data_dir=data/mine  # val.bin tokenized with that model's tokenizer
    python tools/analyze.py --hf=model.gguf --data_dir=data/shakespeare_model --rank=144 --controls   # a GGUF model

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
refinement around the best one. observation() is the reference (explicit SVDs at the betas found); the
table comes from observe(), which gives the same errors and ratios (to 1e-5) fast enough for real models: see the
comment above it. Each pair is measured during the forward pass, as the second layer's outputs appear, so
only two layers' activations are held; a progress bar counts the layers.

rank2 adds a second rank to the table (default rank / 2: h/4 and h/8). --controls adds, at the first rank,
the same ratio for the residual stream (block inputs x_l vs x_{l-1}) and for every projection's input, and
for a .gguf model the weights' quantization noise: a fresh draw of each block's rounding error (uniform in
+-d/2, d the block's stored scale) gives E; its output X E is compared with the rank-r tail it could fill,
and added to the outputs once more (Y + X E) to see whether the ratios move.

On a CR-Net checkpoint the structure is built in (Y_l = s Y_{l-1} + X A B, rank(X A B) <= the model's rank),
so ratios near 0 there say nothing about the observation; a full-rank model (param=full) is the real test.

With --hf the model is loaded by hf.load_pretrained (a local directory or a hub name) and run on tokens of its
own tokenizer: --data_dir, or for GPT-2 models (OpenAI's 50257-token BPE) the bundled corpus as GPT-2 BPE
(data/shakespeare_gpt2, prepared on first use). A .gguf model's tokens: prepare_data.py --tokenizer=<the file>.
For another LLaMA tokenizer write val.bin (uint16 ids, so at most 65536 of them: not LLaMA 3's) and meta.json in
its format yourself. Under grouped-query attention k and v are kv_dim wide (Qwen-3: q is n_head * head_dim), and r
must be below every width.

The plot needs matplotlib (optional).
"""
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python tools/x.py: the core modules are one folder up

import numpy as np
import torch

import configurator
from checkpoint import check_same_tokenizer, load_for_inference
from tools.hf import load_gguf, load_pretrained
from tools.plot import image_path, save_figure
from prepare_data import load_meta, ready_data

# ----------------------------------------------------------------------------- config
out_dir = "out"    # checkpoint directory written by train.py: ckpt.pt or ckpt_dcp/iter_*
hf = ""            # a Hugging Face model name or local directory: analyze a pretrained model instead of out_dir
data_dir = ""      # prepared tokens (val.bin) to run; "" = the checkpoint's, or with hf the bundled corpus (GPT-2 only)
rank = 0           # r of the rank-r approximations; 0 = min(n_embd, q, k/v widths) // 4; else below every width and the tokens [>=0]
tokens = 8192      # validation tokens run through the model, in whole blocks of block_size [>=1]
rank2 = 0          # a second rank, measured beside rank; 0 = rank // 2 (h/8 by default), -1 = none [>=-1]
below = 0.95       # the summary counts the best-beta ratios under this [>0]
controls = False   # also the residual stream, the projection inputs and, for a .gguf model, its quantization noise
plot = ""          # image path for the errors per layer, written if matplotlib is installed; "" = no plot
# -----------------------------------------------------------------------------

GPT2_DATA = "data/shakespeare_gpt2"  # the bundled corpus as GPT-2 BPE, found and prepared as train.py does
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


# ----------------------------------------------------------------------------- the fast estimator
# observation() above is the reference: explicit SVDs, one rank at a time, float64 eigendecompositions of
# h_out x h_out Gram matrices at ~100-250 betas. On a real model (29 pairs x 7 projections, h_out up to 1536)
# that is hours on 2 cores. observe() returns the same errors and ratios (tests/test_analyze.py: to 1e-5) from the same
# Gram matrices, with four changes that do not change the answer:
#  1. one spectrum serves every rank: tail_r is a partial sum of the same eigenvalues;
#  2. the spectrum is taken in the span of Y and Y_prev's columns (a SwiGLU gate/up output of a 576-wide input
#     has rank <= 576, so a pair spans <= 1152 of 1536 dimensions): directions holding less than 1e-12 of the
#     largest eigenvalue's energy are dropped;
#  3. grid points that cannot beat the best point so far are skipped: the sum of the top r eigenvalues of
#     G(beta) is convex in beta (a maximum of quadratics with a positive leading coefficient, Ky Fan), so
#     between two evaluated betas it lies below their chord, and the tail = trace - top-r sum lies above
#     trace minus chord, a quadratic we can evaluate exactly; so the grid's best point is the same;
#  4. the refinement around the grid's best point is Brent's method (parabolic steps, golden-section
#     fallback) to the same tolerance, instead of golden section alone: ~10 spectra instead of ~33.
DROP = 1e-12


class Spectra:
    """Eigenvalues of G(beta) = R^T R, R = Y - beta Y_prev, in the span of both, cached by beta."""

    def __init__(self, g):
        g_yy, g_sym, g_pp = g
        ev, v = torch.linalg.eigh(g_yy + g_pp)
        keep = v[:, ev > DROP * ev[-1].clamp_min(1e-300)]
        self.g = [keep.T @ m @ keep for m in g]
        self.k, self.cache = keep.shape[1], {}
        self.tr = [m.trace().item() for m in self.g]  # trace of the reduced G(beta) = tr0 - beta tr1 + beta^2 tr2

    def __call__(self, beta):
        if beta not in self.cache:
            g_yy, g_sym, g_pp = self.g
            self.cache[beta] = torch.linalg.eigvalsh(g_yy - beta * g_sym + beta * beta * g_pp)
        return self.cache[beta]

    def tail(self, beta, r):
        ev = self(beta)
        return ev[:max(self.k - r, 0)].clamp_min(0).sum().item()

    def trace(self, beta):
        return self.tr[0] - beta * self.tr[1] + beta * beta * self.tr[2]

    def top(self, beta, r):
        return self.trace(beta) - self.tail(beta, r)


def brent(f, lo, hi, tol):
    """x in [lo, hi] minimising f to within tol (Brent's method without derivatives, as in scipy's fminbound)."""
    x = w = v = lo + 0.381966011250105 * (hi - lo)
    fx = fw = fv = f(x)
    d = e = 0.0
    for _ in range(200):
        m = 0.5 * (lo + hi)
        if abs(x - m) <= 2 * tol - 0.5 * (hi - lo):
            break
        p = q = 0.0
        if abs(e) > tol:  # try a parabola through x, w, v
            r_ = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r_
            q = 2 * (q - r_)
            p, q = (-p, q) if q > 0 else (p, -q)
        if abs(e) > tol and abs(p) < abs(0.5 * q * e) and q * (lo - x) < p < q * (hi - x):
            e, d = d, p / q
            if (x + d) - lo < 2 * tol or hi - (x + d) < 2 * tol:
                d = tol if m > x else -tol
        else:  # golden section into the larger part
            e = (lo if x >= m else hi) - x
            d = 0.381966011250105 * e
        u = x + (d if abs(d) >= tol else (tol if d > 0 else -tol))
        fu = f(u)
        if fu <= fx:
            lo, hi = (lo, x) if u < x else (x, hi)
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            lo, hi = (lo, u) if u >= x else (u, hi)
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
    return x


def observe(g, ranks, tol=1e-7):
    """observation() for several ranks from g = grams(Y_prev, Y): {r: the same dict}."""
    g_yy, g_sym, g_pp = g
    yy, pp, dot = g_yy.trace().item(), g_pp.trace().item(), 0.5 * g_sym.trace().item()
    spec, out = Spectra(g), {}
    norm, norm_prev = math.sqrt(max(yy, 0.0)), math.sqrt(max(pp, 0.0))
    beta_ls = dot / pp if pp else 0.0
    ev_p = torch.linalg.eigvalsh(g_pp) if pp else None
    for r in ranks:
        direct = math.sqrt(spec.tail(0.0, r))
        beta = 0.0
        if pp:
            rho = math.sqrt(yy / pp)
            tail_p = math.sqrt(ev_p[:ev_p.numel() - r].clamp_min(0).sum().item())
            bound = min((norm + direct) / tail_p if tail_p > 0 else math.inf, 2.0 ** 20 * rho)
            outer = [2 * rho * 2.0 ** (k / 4) for k in range(1, 4 * 21) if 2 * rho * 2.0 ** ((k - 1) / 4) < bound]
            points = sorted(set(np.linspace(-2 * rho, 2 * rho, GRID).tolist()) | {0.0, beta_ls}
                            | set(outer) | {-b for b in outer})
            beta = search(spec, r, points, tol, rho)
        best = math.sqrt(spec.tail(beta, r))
        ls = math.sqrt(spec.tail(beta_ls, r))
        ratio = lambda e: e / direct if direct else float("nan")
        rel = lambda e: e / norm if norm else float("nan")
        out[r] = {"direct": rel(direct), "ls_residual": rel(ls), "ls_ratio": ratio(ls), "best_residual": rel(best),
                  "best_ratio": ratio(best), "ls_beta": beta_ls, "best_beta": beta,
                  "cosine": dot / (norm * norm_prev) if norm and norm_prev else float("nan")}
    return out


def search(spec, r, points, tol, rho):
    """best_beta's answer for the candidate points: the grid's best point (skipping points the chord bound
    rules out), then Brent's method between its neighbours; ties go to the smaller |beta|."""
    f = lambda b: spec.tail(b, r)
    done = set(points[::4]) | {points[-1], 0.0}
    slack = 1e-12 * spec.trace(0.0)
    while True:
        best = min(f(b) for b in done)
        known = sorted(done)
        todo = []
        for b in points:
            if b in done:
                continue
            i = np.searchsorted(known, b)
            a, c = known[i - 1], known[i]
            chord = spec.top(a, r) + (spec.top(c, r) - spec.top(a, r)) * (b - a) / (c - a)
            if spec.trace(b) - chord <= best + slack:  # it might beat the best: look
                todo.append(b)
        if not todo:
            break
        done |= set(todo)
    i = min(range(len(points)), key=lambda k: f(points[k]) if points[k] in done else math.inf)  # first of ties
    lo, hi = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
    brent(f, lo, hi, 0.5 * tol * max(rho, abs(lo), abs(hi)))  # best_beta's stopping width, as a half-width
    return min(spec.cache, key=lambda b: (f(b), abs(b)))


# ----------------------------------------------------------------------------- running the model
NAMES = {"qkv": ["q", "k", "v"], "o": ["o"], "down": ["down"]}  # + up: gate, up (llama) or fc (gpt2)


def output_names(cfg):
    """{projection group: the names of its n outputs}; Qwen-3-MoE's MLP is one group, its combined output D."""
    if cfg.n_expert:
        return {"qkv": NAMES["qkv"], "o": NAMES["o"], "moe": ["moe"]}
    return dict(NAMES, up=["fc"] if cfg.arch == "gpt2" else ["gate", "up"])
INPUTS = {"qkv": "attn_in", "o": "o_in", "up": "mlp_in", "down": "down_in", "moe": "mlp_in"}  # what each group reads


def split_output(proj, y, names):
    """A projection's output Y as {name: (N, width)}: Projection.pieces cuts it (the n projections of equal widths
    side by side in Y's dim 2, or q, k, v of different widths packed in its last dim)."""
    return {name: t.reshape(-1, t.shape[-1]) for name, t in zip(names, proj.pieces(y), strict=True)}


class Measure:
    """Forward hooks that measure each layer against the one below as the forward reaches it, so only two
    layers' activations are ever held: outputs of every projection (at every rank), and as controls the
    residual stream, every projection's input and, given a model of the weights' quantization noise, the
    outputs with that noise added once more (at the first rank)."""

    def __init__(self, model, ranks, controls, noise=None, bar=None):
        cfg = model.cfg
        self.names = output_names(cfg)
        self.ranks, self.controls, self.noise, self.bar = ranks, controls, noise, bar
        self.prev, self.cur, self.rows, self.hooks = {}, {}, [], []
        self.workers = max(1, torch.get_num_threads())
        for l, blk in enumerate(model.blocks):
            if controls:
                self.hooks.append(blk.register_forward_pre_hook(lambda m, inp: self.cur.update(resid=inp[0])))
            for group in self.names:
                proj = getattr(blk, group)
                self.hooks.append(proj.register_forward_hook(lambda m, inp, y, l=l, g=group: self.output(l, g, m, inp[0], y)))
            # (an MoE returns (Y, router statistics): output() takes Y)
            self.hooks.append(blk.register_forward_hook(lambda m, inp, out, l=l: self.layer(l)))

    def output(self, l, group, proj, x, y):
        y = y[0] if isinstance(y, tuple) else y
        for name, t in split_output(proj, y, self.names[group]).items():
            self.cur[name] = t
        if self.controls:
            self.cur[INPUTS[group]] = x
            if self.noise is not None:  # Y + X E: the same quantization noise once more, on this projection
                e = x @ getattr(self.noise.blocks[l], group).weight
                for name, t in split_output(proj, proj.split_input(e), self.names[group]).items():
                    self.cur[f"{name}+noise"] = self.cur[name] + t
                    self.cur[f"{name}:noise"] = t

    def layer(self, l):
        cur = {k: v.reshape(-1, v.shape[-1]).double() for k, v in self.cur.items()}
        self.cur = {}

        def one(key):  # many small LAPACK calls: one per core at a time, each on one thread, use the cores best
            torch.set_num_threads(1)
            y = cur[key]
            g_yy = y.T @ y
            row = None
            if l:
                p, g_pp = self.prev[key]
                g_yp = y.T @ p
                ranks = self.ranks if key in NAMES_ALL else self.ranks[:1]
                o = observe((g_yy, g_yp + g_yp.T, g_pp), ranks)
                row = {"layer": l + 1, "key": key, **{f"r{r}": o[r] for r in ranks}}
                if f"{key}:noise" in cur:  # the noise's energy against the tail it could fill
                    e = cur[f"{key}:noise"].norm().item()
                    row["noise_tail"] = {r: e / (o[r]["direct"] * y.norm().item()) for r in ranks}
            return key, y, g_yy, row
        keys = sorted((k for k in cur if not k.endswith(":noise")), key=lambda k: -cur[k].shape[1])  # widest first
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                done = {key: (y, g_yy, row) for key, y, g_yy, row in pool.map(one, keys)}
            for key in cur:  # rows in the model's order: q, k, v, o, gate, up, down, then the controls
                if key in done:
                    self.prev[key] = done[key][:2]
                    if done[key][2]:
                        self.rows.append(done[key][2])
        finally:
            torch.set_num_threads(self.workers)  # the forward's own threads again
        if self.bar is not None:
            self.bar.update(1)

    def remove(self):
        for h in self.hooks:
            h.remove()


NAMES_ALL = {"q", "k", "v", "o", "gate", "up", "fc", "down", "moe"}


def gguf_noise(path, seed=0):
    """A model whose weights are fresh quantization noise of the file's own blocks: uniform in [-d/2, d/2] per
    element, d the scale stored with each block of 32 (Q8_0, Q4_0, Q4_1 round to the nearest multiple of d, so
    this is the distribution of their rounding error); zero for F32/F16/BF16 tensors."""
    import gguf
    rng = np.random.default_rng(seed)

    def values(t):
        if t.tensor_type.name not in ("Q8_0", "Q4_0", "Q4_1"):
            return np.zeros(t.data.shape, np.float32)
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        raw = np.ascontiguousarray(t.data).reshape(t.data.shape[0], -1, size)
        d = raw[..., :2].copy().view(np.float16).astype(np.float32)  # each block's scale, its first 2 bytes
        return ((rng.random((*raw.shape[:2], block), dtype=np.float32) - 0.5) * d).reshape(t.data.shape[0], -1)
    return load_gguf(path, values=values)


@torch.no_grad()
def collect_outputs(model, idx):
    """{(layer, position name): (N, h_out) float32 output} for every projection, via forward hooks (for the
    reference estimator on small models)."""
    names, out, hooks = output_names(model.cfg), {}, []
    for l, blk in enumerate(model.blocks):
        for group in names:
            def hook(mod, inp, y, l=l, group=group):
                for name, t in split_output(mod, y[0] if isinstance(y, tuple) else y, names[group]).items():
                    out.setdefault((l, name), []).append(t.float())
            hooks.append(getattr(blk, group).register_forward_hook(hook))
    for i in range(0, len(idx), 8):
        model(idx[i:i + 8])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def check_rank(r, widths, n_tokens, key="rank"):
    """r (the value of key) must leave a tail: 1 <= r < every projection width and < the number of tokens."""
    limit = min(min(widths), n_tokens)
    if not 1 <= r < limit:
        raise configurator.ConfigError(
            key, r, f"must be 1 <= {key} <= {limit - 1}: below the narrowest projection width ({min(widths)}) "
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
                f"(param=full)." + (" The MoE output is the exception: Y_l - s Y_{l-1} = D_l mixes k experts of rank "
                                    "r each, so its rows are a measurement." if cfg.n_expert else ""))
    if cfg.param in ("lowrank", "cola", "cola_mlp"):
        return (f"note: param={cfg.param}: every output has rank <= {rk} by construction; at r >= {rk} the direct "
                f"error is ~0 and the ratios are meaningless; the meaningful test is a full-rank model (param=full).")
    return None


def hf_data_source(c, cfg):
    """The train.py config whose data_dir holds a pretrained model's validation tokens, when --data_dir is not
    given: the bundled corpus for GPT-2's BPE; other vocabularies need their own tokenizer's data."""
    if cfg.arch == "gpt2" and cfg.vocab_size == GPT2_VOCAB:
        return {"data_dir": GPT2_DATA, "data_recipe": ""}
    raise configurator.ConfigError(
        "data_dir", c["data_dir"], f"{c['hf']} is a {cfg.arch} model with a {cfg.vocab_size}-token vocabulary, not "
                                   f"GPT-2's BPE: pass --data_dir=DIR with val.bin prepared (prepare_data.py) with that "
                                   f"model's own tokenizer")


def load(c):
    """(model, directory of the val.bin to run, the name to print)."""
    if c["hf"]:
        if Path(c["hf"]).is_file() and not c["hf"].endswith(".gguf"):
            raise configurator.ConfigError("hf", c["hf"], "is a file, not a model: --hf takes a Hugging Face model "
                                                          "directory (config.json and weights), a hub name or a .gguf file")
        model = load_pretrained(c["hf"])
        source = None if c["data_dir"] else hf_data_source(c, model.cfg)
    else:
        model, ckpt = load_for_inference(c["out_dir"])
        source = ckpt["config"]  # the run's own data_dir, which may have been prepared again since
    # found as train.py finds it (a bundled corpus from any directory, prepared on first use)
    data_dir, meta = (Path(c["data_dir"]), load_meta(c["data_dir"])) if c["data_dir"] else ready_data(source)
    if meta["max_token_id"] >= model.cfg.vocab_size:
        raise configurator.ConfigError(
            "data_dir", str(data_dir), f"holds token ids up to {meta['max_token_id']} ({meta['tokenizer']} "
                                       f"tokenizer), beyond the model's vocabulary of {model.cfg.vocab_size}")
    if not c["hf"]:  # ids that fit the vocabulary may still be another tokenizer's
        check_same_tokenizer(ckpt["data_meta"], meta, str(data_dir), c["out_dir"])
    return model, data_dir, c["hf"] or c["out_dir"]


def main(argv):
    c, _ = configurator.load(argv, "tools/analyze.py", doc=__doc__)
    if c["plot"]:
        image_path("plot", c["plot"])
    model, data_dir, name = load(c)
    cfg = model.cfg
    if cfg.n_layer < 2:
        raise ValueError(f"{name}: one layer, so no pair of layers (l - 1, l) to compare")
    r = c["rank"] or min(cfg.n_embd, cfg.q_dim, cfg.kv_dim) // 4
    ranks = [r] + ([c["rank2"] or r // 2] if c["rank2"] >= 0 and (c["rank2"] or r // 2) not in (0, r) else [])
    val = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    T = cfg.block_size
    n = min(c["tokens"] // T, (len(val) - 1) // T)
    if n < 1:
        raise configurator.ConfigError("tokens", c["tokens"], f"is less than one block of {T}")
    for key, rk in zip(("rank", "rank2"), ranks):
        check_rank(rk, (cfg.n_embd, cfg.ff_dim, cfg.q_dim, cfg.kv_dim), n * T, key)
    ids = torch.from_numpy(val[:n * T + 1].astype(np.int64))
    noise = gguf_noise(c["hf"]) if c["controls"] and str(c["hf"]).endswith(".gguf") else None
    print(f"{name}: param={cfg.param}, {cfg.n_layer} layers, h={cfg.n_embd}, ranks r={', '.join(map(str, ranks))}, "
          f"{n * T} val tokens{f' from {data_dir}' if c['hf'] or c['data_dir'] else ''}", flush=True)
    note = structure_note(cfg)
    if note:
        print(note)
    from tqdm import tqdm
    with tqdm(total=cfg.n_layer, desc="layers", unit=" layer", file=sys.stderr) as bar, torch.no_grad():
        m = Measure(model, ranks, c["controls"], noise, bar)
        try:
            _, loss = model(ids[:-1].view(n, T), ids[1:].view(n, T))  # one forward: every pair measured inside it
        finally:
            m.remove()
    print(f"perplexity {math.exp(loss.item()):.2f} (loss {loss.item():.4f} nats) on these tokens")
    rows = [(row["layer"], row["key"], {**row[f"r{r}"], "at": {rk: row[f"r{rk}"] for rk in ranks}})
            for row in m.rows if row["key"] in NAMES_ALL]
    print_table(rows, ranks, c["below"])
    if c["controls"]:
        print_controls(m.rows, ranks)
    if c["plot"]:
        plot_errors(rows, [p for l, p, _ in rows if l == 2], c["plot"], f"{name} ({cfg.param}, r={r})")
    return rows


def print_table(rows, ranks, below):
    r = ranks[0]
    head = " | ".join(f"ratio best r={rk} (beta)" for rk in ranks)
    print(f"errors relative to ||Y_l||; ratios residual/direct as norms (square them for energies); LS = least-squares "
          f"beta, best = the beta minimising the rank-r tail\n| layer | position | cosine | direct r={r} | ratio LS r={r} | "
          f"{head} |\n|---|---|---|---|---|{'---|' * len(ranks)}")
    for l, p, o in rows:
        best = " | ".join(f"{o['at'][rk]['best_ratio']:.3f} ({o['at'][rk]['best_beta']:.3f})" for rk in ranks)
        print(f"| {l} | {p} | {o['cosine']:.3f} | {o['direct']:.4f} | {o['ls_ratio']:.3f} | {best} |")
    for rk in ranks:
        ls = np.array([o["at"][rk]["ls_ratio"] for *_, o in rows])
        best = np.array([o["at"][rk]["best_ratio"] for *_, o in rows])
        print(f"ratio residual/direct at r={rk}: LS beta median {np.median(ls):.3f}, range {ls.min():.3f}-{ls.max():.3f}; "
              f"best beta median {np.median(best):.3f}, range {best.min():.3f}-{best.max():.3f}; best-beta ratio below "
              f"{below:g} in {int((best < below).sum())} of {len(best)} (paper: 0.4-0.97)")


def print_controls(all_rows, ranks):
    """Per kind of activation, the range over layers of the best-beta ratio at the first rank, and for the
    outputs the quantization noise against the rank-r tail, and the ratio with that noise added once more."""
    r, by = ranks[0], {}
    for row in all_rows:
        by.setdefault(row["key"], []).append(row)
    print(f"controls at r={r}: best-beta ratio (min-median-max over layers; energies are the squares), least-squares "
          f"beta's ratio, cosine; noise/tail = ||X E|| / ||Y - best_r(Y)|| for E a fresh draw of the weights' "
          f"quantization noise; +noise = the ratio with that noise added once more\n"
          f"| activation | best ratio | LS ratio | cosine | noise/tail | +noise best ratio |\n|---|---|---|---|---|---|")
    span = lambda v: f"{min(v):.3f}-{np.median(v):.3f}-{max(v):.3f}"
    for key, rs in by.items():
        if key.endswith("+noise"):
            continue
        o = [x[f"r{r}"] for x in rs]
        noisy = by.get(f"{key}+noise")
        print(f"| {key} | {span([x['best_ratio'] for x in o])} | {span([x['ls_ratio'] for x in o])} | "
              f"{span([x['cosine'] for x in o])} | {span([x['noise_tail'][r] for x in rs]) if 'noise_tail' in rs[0] else '-'} | "
              f"{span([x[f'r{r}']['best_ratio'] for x in noisy]) if noisy else '-'} |")


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
