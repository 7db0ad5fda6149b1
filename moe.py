"""
Qwen-3-MoE's sparse MLP: routing, the experts and the load-balancing loss, for model.MoE (the projection group that
holds the router and the experts' parameters). Row vectors, as model.py: Y = X W.

    g = softmax(X W_router) over the n_expert experts (float32), the top k kept and (norm_topk) renormalised to 1
    D = sum_{e in top-k(x)} g_e(x) down_e(silu(gate_e(x)) * up_e(x))            each expert a SwiGLU

as transformers' Qwen3MoeSparseMoeBlock computes it (tests/test_moe.py compares logits and losses). The (token,
place) pairs are sorted by expert and gathered once, so each expert's rows are one contiguous piece. On a Hopper GPU
under bf16 each projection then runs as one grouped GEMM over all experts' pieces (F.grouped_mm, the factors stacked
per call as (E, h_in, w)); the pieces' ends stay on the device, so nothing waits for the GPU. Elsewhere (see
GROUPED: other GPUs, float32, the CPU), or where a width's rows are not 16-byte aligned as grouped_mm needs, the
experts run in a loop, the reference form, which needs the piece sizes on the host: one sync per layer (free on a
CPU, where the two paths' step times fall within the machine's spread: results/bench_moe_cpu.md). Both paths run
every expert every step, some on no token, so every parameter gets a gradient, as DDP expects. A production MoE goes
further: weights stored stacked (no per-call stack) and experts sharded over GPUs (expert parallelism: an all-to-all
sends each token to its experts' GPU and back), usually with a capacity per expert.

CR-Net. The question is what Eq. 6's lane is when a token's experts change from layer to layer. A lane per expert
(Y_{l,e} = s Y_{l-1,e} + X A_e B_e) would be missing wherever layer l - 1 did not route the token to e. So the lane
is on the combined output, Y^moe_l = s * Y^moe_{l-1} + D_l: it exists for every token, it is what the residual
stream receives, and its cross-layer difference is what Eq. 6 models. The experts are low-rank (X A B) without
lanes of their own; the router (h x n_expert) stays full-rank. moe_lane=False is the alternative, per-expert low-rank
factors and no lane (tools/ablate.py's crnet_nolane; results/ablate_qwen3_moe_cpu.md measures both).

Under torch.compile, mix runs eagerly (the rest of a block compiles): in the loop the tokens each expert gets, hence
its shapes, change every step. Recomputation (recompute.py) keeps each layer's D, to invert Eq. 6, and the experts
chosen, so that a replay routes every token as the forward did even where a rebuilt input would tip a near-tie in
the top k.
"""
import torch
import torch.nn.functional as F


def route(x, router, top_k, norm_topk, idx=None):
    """x (N, h) -> router probabilities (N, E) in float32, the k experts of each token (N, k), chosen by top-k unless
    given, and their weights g (N, k)."""
    probs = F.softmax(x @ router, -1, dtype=torch.float32)
    idx = probs.topk(top_k, -1).indices if idx is None else idx
    g = probs.gather(-1, idx)
    return probs, idx, g / g.sum(-1, keepdim=True) if norm_topk else g


# where the experts run as grouped GEMMs: {device type: compute dtypes}. On CUDA, grouped_mm's own kernel (no host
# sync) is bf16 on sm90/sm100; elsewhere it loops over offs read on the host, worse than our loop's one read. CUDA
# also needs sm90 (Hopper): on sm100, experts with no token get nonzero weight gradients (pytorch/pytorch#172439).
GROUPED = {"cuda": (torch.bfloat16,)}


def find_grouped_mm():
    """F.grouped_mm; in older torch the same op as torch._grouped_mm; None where torch has neither (the loop runs)."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


grouped_mm = find_grouped_mm()


def grouped(x, projections, offs, dtype):
    """x (M, h_in), rows sorted by expert and cut at offs -> (M, n w): each expert's Projection (full: X W; low-rank:
    (X A) B, no lane) on its own rows, one grouped GEMM per factor. The factors are stacked per call in the compute
    dtype (under autocast the loop's matmuls make the same bf16 copy of every weight)."""
    stack = lambda ts: torch.stack(list(ts)).to(dtype)  # two launches, not one per expert
    x = x.to(dtype)
    if projections[0].kind == "full":
        return grouped_mm(x, stack(p.weight for p in projections), offs=offs)
    z = grouped_mm(x, stack(p.A for p in projections), offs=offs)  # (M, n r)
    return torch.cat([grouped_mm(zi, stack(p.B[i] for p in projections), offs=offs)
                      for i, zi in enumerate(z.split(projections[0].rank, -1))], -1)


def grouped_kernel(device):
    """Whether grouped_mm runs on device: torch has it, and on CUDA the GPU is sm90 (see GROUPED)."""
    return grouped_mm is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] == 9)


def run_experts(xs, experts, counts):
    """xs (M, h): the gathered rows, sorted by expert; counts (E,): each expert's rows -> their outputs (M, h)."""
    up, down = [e["up"] for e in experts], [e["down"] for e in experts]
    dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
    widths = (xs.shape[-1], up[0].h_out) + (() if up[0].kind == "full" else (up[0].rank,))  # h, ff, r
    if (dtype in GROUPED.get(xs.device.type, ()) and all(w * dtype.itemsize % 16 == 0 for w in widths)
            and grouped_kernel(xs.device)):
        offs = counts.cumsum(0).to(torch.int32)  # where each expert's rows end, on the device
        gate, y_up = grouped(xs, up, offs, dtype).chunk(2, -1)
        return grouped(F.silu(gate) * y_up, down, offs, dtype)
    ys = []
    for e_up, e_down, xe in zip(up, down, xs.split(counts.tolist())):  # the host sync
        y_up = e_up(xe[None])  # (1, n_e, 2, ff)
        ys.append(e_down(F.silu(y_up[:, :, 0]) * y_up[:, :, 1])[0, :, 0])  # (n_e, h)
    return torch.cat(ys)


@torch.compiler.disable  # the loop's shapes follow the routing: a graph would re-specialize on every expert and step
def mix(x, router, experts, top_k, norm_topk, idx=None):
    """x (B, T, h) -> D (B, T, 1, h), the router's statistics (2, E) for load_balance (tokens routed to each expert,
    the probability mass it got), and the experts chosen (B, T, k). experts: {"up": gate and up (B, T, 2, ff),
    "down"} projection pairs."""
    flat = x.flatten(0, 1)
    probs, idx, g = route(flat, router, top_k, norm_topk, None if idx is None else idx.flatten(0, 1))
    chosen = idx.flatten()
    order = chosen.argsort(stable=True)  # the N k (token, place) pairs, sorted by expert
    counts = chosen.new_zeros(len(experts)).index_add_(0, chosen, torch.ones_like(chosen))  # CUDA's bincount syncs
    y = run_experts(flat[order // top_k], experts, counts)[order.argsort()].view(*idx.shape, -1)  # (N, k, h) in place
    d = torch.einsum("nk,nkh->nh", g.to(y.dtype), y)
    stats = torch.stack([counts.to(probs.dtype), probs.sum(0)])
    return d.view(*x.shape[:2], 1, -1), stats, idx.view(*x.shape[:2], -1)


def load_balance(stats, n_expert, rows):
    """Switch Transformer's load-balancing loss over all layers at once, as HF's load_balancing_loss_func:
    E * sum_e f_e P_e, f_e the share of the (layer, token) rows routed to expert e (k per row), P_e its mean
    probability. stats: each layer's (2, E) from mix; rows: layers x tokens."""
    counts, mass = torch.stack(stats).sum(0)
    return n_expert * (counts / rows * mass / rows).sum()
