"""
Memory planner: bytes per GPU for a training config under DDP and under FSDP2 on N GPUs, for each recompute
mode, and whether that fits a GPU.

    python plan.py configs/crnet_llama_7b.py                  # 8 GPUs of 80 GiB, the config's micro-batch
    python plan.py configs/crnet_llama_7b.py --gpus=64 --gpu_gib=141 --batch_size=16
    python plan.py --paper                                    # every paper config at a glance (results/plan.md)

P parameters, N GPUs, A = bytes per activation number (4 float32, 2 bfloat16, the config's dtype; 'auto' is
bfloat16, the GPU default):
  params       DDP: 4P fp32, plus under bf16 autocast the bf16 weight copies autograd keeps for backward (every
               matmul's without recompute, the head's with it). FSDP: 4P/N, plus the gathered copies (bf16 with mixed precision) of
               the root (embeddings, head; FSDP2 keeps the root gathered) and two blocks (current, prefetched).
  grads        DDP: 4P (DDP's buckets). FSDP: 4P/N, plus the unsharded gradients of the root and one block.
  optimizer    AdamW's two moments: 8P, or 8P/N under FSDP.
  activations  what autograd holds when the forward of one micro-batch ends (activation_numbers: counted
               tensor by tensor from the ops in model.py and recompute.py; tests/test_plan.py checks it against
               bytes counted on a real forward). crnet, reversible: with what the round-off guard stores at the
               initial betas; betas that shrink in training make it store more.
  backward     the largest transient of the backward: the logits' gradients, plus one recomputed layer under
               any recompute.
Not counted: the CUDA context and allocator fragmentation (1-3 GiB in practice), so "fits" keeps 10% headroom.
Dropout masks are not counted (the paper's configs use none).

stored_lanes: which lanes (and block inputs) a "crnet" / "reversible" forward stores: the checkpoint set and the
round-off guard, which recompute.py runs before every training forward.
"""
import json
import math
import numbers
import os
import warnings
import weakref
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import configurator
from model import Transformer, model_config

# ----------------------------------------------------------------------------- config
# plan.py also takes every train.py key (config files, --batch_size=..., --recompute_every=...)
gpus = 8                    # GPUs the FSDP column shards over [>=1]
gpu_gib = 80.0              # memory per GPU; "fits" means total <= 90% of it [>0]
paper = False               # print one row per paper config instead
# -----------------------------------------------------------------------------

GiB = 2 ** 30
PAPER = [str(Path(__file__).resolve().parent / f"configs/{p}_llama_{s}.py") for s in ("60m", "130m", "350m", "1b", "7b") for p in ("full", "crnet")]


# ----------------------------------------------------------------------------- the lanes a forward stores
# Round-off guard (recompute.py's "crnet" and "reversible"). A rebuilt lane carries the forward's rounding amplified
# by 1/|s| at every inversion: relative error ~ eps * sum_{i=j+1..c} prod_{t=j+1..i} 1/|s_t| for layer j rebuilt
# from a stored layer c (lane norms of similar size, as the init makes them). Before each forward stored_lanes walks
# the layers top-down and stores a lane wherever that bound would pass the budget rtol / eps (84 in float32 at
# rtol = LANE_RTOL: betas near 0.7 and k = 8 stay at 35; a |s| below ~0.012 stores the lane below it outright; in
# bf16 the budget is below 1, so every lane would be stored, hence float32 lanes). "reversible" adds the stream as a
# fifth group with s = 1 (x_l inherits x_{l+1}'s error, one rounding and those of the two lanes it subtracts); a
# recomputed Z adds its input's error. Worst case, yet not loose by much: at h=1024, L=16, k=8, reversible with
# keep_z=False storing the checkpoint set alone has 6-17x the gradient error of the guarded plan (tools/bench.py).
LANE_RTOL = 1e-5   # the largest relative round-off we accept in a rebuilt lane (or block input)
BETA_DRIFT = 0.02  # CUDA: how far |s| may move in the optimizer step between the betas the plan read and the
                   # forward it plans (LanePlanner checks a step late). train.py gives adamw_drift of its lr and
                   # betas instead; 0.02 covers AdamW up to lr 0.017 at betas (0.9, 0.95), 0.0027 at (0.9, 0.999)
STREAM = 4         # the group of the block input x_l ("reversible"), after the lane groups (4, or 3 with experts)


def checkpoint_layers(n_layer, every):
    """0-based layers whose lanes are stored: the last, then every `every`-th below it, never the first (n_layer > 1)."""
    return {n_layer - 1} | set(range(n_layer - 1, 0, -every))


def min_betas(blocks):
    """min |beta| per (layer 2..L, group) as one device tensor (L - 1, groups), float64. Works on FSDP2-sharded betas:
    each process takes the minimum over its own shard and one all-reduce finds the global one, so no block is gathered."""
    betas = [p.beta for blk in blocks[1:] for p in blk.projections()]
    if not betas:
        return torch.zeros(0, len(blocks[0].projections()), dtype=torch.float64)
    local = [b.to_local() if hasattr(b, "to_local") else b for b in betas]  # DTensor shard, or the tensor
    # an empty shard (FSDP2 on more processes than a beta has entries) gives inf, made on the device: new_tensor
    # would copy from the host and wait
    mins = torch.stack([p.detach().abs().min().double() if p.numel() else p.new_full((), math.inf, dtype=torch.float64)
                        for p in local])
    if hasattr(betas[0], "device_mesh"):
        torch.distributed.all_reduce(mins, op=torch.distributed.ReduceOp.MIN, group=betas[0].device_mesh.get_group())
    return mins.view(len(blocks) - 1, -1)


def scales(min_beta, blocks, drift=0.0):
    """The smallest |s| = |beta| + eps a forward may divide by, per (layer 2..L, group), from min_betas' numbers (on
    the device or the host) with each |beta| lowered by drift, how far it may have moved since it was read. Under
    FSDP2 a forward with bf16 parameters reads each beta rounded to bf16, up or down, so the smaller of the two counts
    (rounding is monotone: rounding the lowered minimum gives no more than any beta can be read as; FSDP2 in float32
    reads the betas as they are, and is planned at most half a bf16 ulp low)."""
    low = (min_beta - drift).clamp_min(0.0)
    if len(blocks) == 1:  # no layer 2: nothing to scale
        return low
    if hasattr(blocks[1].qkv.beta, "device_mesh"):
        low = torch.minimum(low, low.float().bfloat16().double())
    return low + blocks[1].qkv.beta_eps


def min_scales(blocks):
    """min |s| per (layer 2..L, group) as one device tensor (L - 1, groups): the guard's divisors now."""
    return scales(min_betas(blocks), blocks)


def stored_lanes(blocks, every, dtype, stream=False, keep_z=True, rtol=LANE_RTOL, inv_s=None, store=()):
    """The checkpoint set plus the round-off guard (the comment above), per (layer, group); dtype is the one the
    lanes are formed in. stream=True (reversible) plans the block inputs too, as group STREAM; keep_z=False
    counts the error a recomputed Z inherits from its input. inv_s: 1/|s| per (layer 2..L, group) as host
    numbers (default: read from blocks now, one host sync); store: (layer, group)s already kept, so that
    stored_lanes(..., store=P) == P says plan P is safe for these betas."""
    budget = rtol / torch.finfo(dtype).eps
    inv_s = (1.0 / min_scales(blocks)).tolist() if inv_s is None else inv_s
    ckpt = checkpoint_layers(len(blocks), every)
    n = len(blocks[0].projections())  # lane groups: 4, or 3 (qkv, o, moe) for qwen3_moe
    groups = [*range(n), *([STREAM] if stream else [])]
    store, b = set(store), [0.0] * 5  # b: round-off bounds (in eps) of layer l's lanes and input if rebuilt
    for l in range(len(blocks) - 1, -1, -1):
        if l in ckpt:
            store |= {(l, g) for g in groups}
            b = [0.0] * 5
            continue
        # layer l's lanes are rebuilt by inverting layer l + 1 (row l of inv_s) with its Z: kept, or recomputed
        # from layer l + 1's inputs (x; attention of Y^qkv; x + drop(Y^o); act of Y^up), inheriting their error
        inputs = [0.0] * 4 if keep_z else [b[STREAM], b[0], b[STREAM] + b[1], b[2]]
        inputs = inputs if n == 4 else inputs[:2] + [0.0]  # an MoE's D is kept at any keep_z
        b[:n] = [(1.0 + e + bound) * s for e, bound, s in zip(inputs, b, inv_s[l])]
        b[STREAM] += 1.0  # x_l = x_{l+1} - drop(Y^down_l) - drop(Y^o_l): one rounding, plus those lanes' errors
        for g in groups:
            b[STREAM] += b[g] if g in (1, n - 1) and (l, g) not in store and b[g] <= budget else 0.0
            if b[g] > budget or (l, g) in store:
                store.add((l, g))
                b[g] = 0.0
    return store


def adamw_drift(lr, betas):
    """How far one AdamW step at learning rate lr can move a parameter of |p| < 2 towards 0, without weight decay
    (betas have none): lr times the largest |m_hat| / sqrt(v_hat) (eps only shrinks a step). Cauchy-Schwarz on
    m = (1 - b1) sum_k b1^k g_{t-k} and v = (1 - b2) sum_k b2^k g_{t-k}^2, with q = b1^2 / b2, bounds step t's by
        (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) (1 - q^t) / ((1 - b2) (1 - q))),
    reached where g_{t-k} ~ (b1 / b2)^k. It never exceeds its limit at t -> inf (x = b2^t, y = q^t, so b1^(2t) = xy:
    (1 - x)(1 - y) <= (1 - sqrt(xy))^2), so the limit bounds every step: 1.165 lr at (0.9, 0.95), 7.27 lr at (0.9,
    0.999); inf where q >= 1 (to rounding), which bounds nothing. Padded for float32, as tested against torch's three
    AdamW implementations: a few ulps of the update's arithmetic, float32's betas moving q (about an ulp / (1 - q) of
    the limit), and half an ulp of a p below 2 in rounding p - update."""
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"AdamW's betas must be in [0, 1), got {betas}")
    if not lr:
        return 0.0
    if b1 and b1 * b1 >= b2 * (1 - 1e-9):  # (q rounded to just below 1 would give a huge finite margin, not inf)
        return math.inf
    q = b1 * b1 / b2 if b1 else 0.0
    return lr * (1 - b1) / ((1 - b2) * (1 - q)) ** 0.5 * (1 + 2 ** -18 + 2 ** -22 / (1 - q)) + 2 ** -24


def from_stale(min_beta, blocks, drift=BETA_DRIFT):
    """LanePlanner's CUDA plan from the previous forward's min |beta| (host numbers): (1/|s| with each |beta| lowered by
    drift, a beta's largest move in one step, to plan from; 1/|s| exactly, to check that plan against)."""
    return (1.0 / scales(min_beta, blocks, drift)).tolist(), (1.0 / scales(min_beta, blocks)).tolist()


class LanePlanner:
    """stored_lanes before each training forward (recompute.py), without waiting on the GPU. On CUDA it plans from
    the betas of the previous forward, copied to pinned host memory since, each |beta| lowered by drift (how far one
    optimizer step may move a beta; scales); one step later it checks that plan against those betas exactly, and warns if
    a beta moved further. drift=inf (no bound known) plans from the betas of this step: a host sync per forward."""

    def __init__(self, blocks, every, stream, rtol, drift=BETA_DRIFT):
        if isinstance(drift, bool) or not isinstance(drift, numbers.Real) or not drift >= 0:
            raise ValueError(f"beta_drift must be a number >= 0 (inf: no bound known), got {drift!r}")
        self.blocks, self.every, self.stream, self.rtol, self.drift = blocks, every, stream, rtol, drift
        self.pending, self.last_plan = None, None

    def inv_scales(self):
        """(1/|s| per (layer 2..L, group) for the plan, 1/|s| of the previous forward exactly or None), as host
        numbers."""
        min_b = min_betas(self.blocks)
        if min_b.device.type != "cuda" or self.drift == math.inf:
            if min_b.device.type == "cuda" and self.last_plan is None:
                warnings.warn("beta_drift=inf (no bound on a beta's step, as adamw_drift gives where beta1^2 >= beta2): "
                              "the lane plan reads the betas before every training forward, one host sync each")
            return (1.0 / scales(min_b, self.blocks)).tolist(), None
        with torch.cuda.device(min_b.device):  # the copy and its event on the betas' device's stream
            host = torch.empty(min_b.shape, dtype=min_b.dtype, pin_memory=True).copy_(min_b, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        previous, self.pending = self.pending, (host, done)
        if previous is None:  # the first forward: wait once, and use the betas exactly
            done.synchronize()
            return (1.0 / scales(host, self.blocks)).tolist(), None
        previous[1].synchronize()  # recorded a whole step ago: long done
        return from_stale(previous[0], self.blocks, self.drift)

    def __call__(self, dtype, keep_z):
        inv_s, exact_before = self.inv_scales()
        plan = lambda inv, kept=(): stored_lanes(self.blocks, self.every, dtype, self.stream, keep_z, self.rtol, inv, kept)
        if exact_before is not None and self.last_plan is not None and plan(exact_before, self.last_plan) != self.last_plan:
            warnings.warn(f"{'reversible' if self.stream else 'crnet'} recompute: a beta moved by more than the "
                          f"planner's beta_drift={self.drift:g} in one optimizer step, so the previous step's gradients "
                          f"may carry more round-off than recompute_rtol={self.rtol:g}")
        self.last_plan = plan(inv_s)
        return self.last_plan

    def __getstate__(self):  # copy.deepcopy, pickle: CUDA events stay behind
        return {**self.__dict__, "pending": None, "last_plan": None}


# ----------------------------------------------------------------------------- counted numbers
def stored_numbers_per_token(cfg, mode, every=8, store=None, keep_z=True):
    """What a training step keeps inside the layer loop per token, in numbers (multiply by bytes per
    number), counting inputs of blocks 2..L (block 1's input is the embedding output, made before the loop):
        block:      (L-1) * (h + 5h + 2 ff)                 block inputs + their input lanes
        crnet:      (L-1) * h + 7 (L-1) r + |C| (5h + 2 ff) block inputs + Z + stored lanes (C: checkpoint set)
        reversible: 7 (L-1) r + |C| (h + 5h + 2 ff)         Z + the inputs and lanes of C only (keep_z=True)
                    |C| (6h + 2 ff)                         keep_z=False: no Z either
    for LLaMA, where a layer's lanes are 3h (q, k, v) + h (o) + 2 ff (gate, up) + h (down) = 5h + 2 ff and its
    Z 3r + r + 2r + r = 7r. GPT-2's lanes are 3h + h + 4h + h = 9h and its Z 3r + r + r + r = 6r, so reversible
    keeps 6 (L-1) r + |C| (h + 9h) = 6 (L-1) r + 10 h |C|, or 10 h |C| with keep_z=False (C never holds layer 1,
    so every stored input is counted). `store` replaces the checkpoint set by an actual (layer, group) plan,
    e.g. one the round-off guard extended (group 4 = STREAM: a block input)."""
    L, h = cfg.n_layer, cfg.n_embd
    if mode == "block":
        return (L - 1) * (sum(lane_numbers(cfg)) + h)
    if mode not in ("crnet", "reversible"):
        raise ValueError(f"no formula for recompute={mode!r}: 'none' keeps every intermediate")
    x0 = h * (store is not None and (0, STREAM) in store)  # a stored layer-1 input is the embedding output
    return (kept_numbers(cfg, mode, every, store) - x0 + z_numbers(cfg, keep_z) + route_numbers(cfg)
            + (L - 1) * h * (mode == "crnet"))


def kept_numbers(cfg, mode, every=8, store=None):
    """Numbers per token of the lanes (and, reversible, block inputs as group STREAM) a crnet or reversible forward
    stores: those of `store`, (layer, group)s as stored_lanes plans them, or of the checkpoint set."""
    groups = dict(enumerate(lane_numbers(cfg))) | ({STREAM: cfg.n_embd} if mode == "reversible" else {})
    store = store or {(l, g) for l in checkpoint_layers(cfg.n_layer, every) for g in groups}
    return sum(groups[g] for _, g in store)


def lane_numbers(cfg):
    """Lane numbers per token of one layer, per group (qkv, o, up, down; qwen3_moe: qkv, o, moe)."""
    h = cfg.n_embd
    return [cfg.q_dim + 2 * cfg.kv_dim, h] + ([h] if cfg.n_expert else [(1 if cfg.arch == "gpt2" else 2) * cfg.ff_dim, h])


def z_numbers(cfg, keep_z=True):
    """Numbers per token that crnet recompute keeps of every Z = X A (layers 2..L, and 1 if it is low-rank; none with
    keep_z=False) and of every MoE D (layers with a lane in; any keep_z). The experts chosen are route_numbers'."""
    n_z = 3 + 1 + (0 if cfg.n_expert else 2 if cfg.arch == "gpt2" else 3)  # qkv, o, up (gate and up), down
    d = sum(cfg.n_embd for l in range(1, cfg.n_layer) if cfg.n_expert and cfg.layer_kind(l) == "crnet" and cfg.moe_lane)
    return d + keep_z * sum(n_z * cfg.layer_rank(l) for l in range(cfg.n_layer) if cfg.layer_kind(l) != "full")


def route_numbers(cfg):
    """Float32 numbers per token of the experts chosen that crnet recompute keeps: k int64 per layer (2 numbers each)."""
    return 2 * cfg.expert_top_k * cfg.n_layer if cfg.n_expert else 0


def held_activation_bytes(model, idx, targets, whole=False, autocast=None):
    """Bytes of the tensors created inside the layer loop of a training forward (whole=True: anywhere in the
    forward) that are still alive when it returns, kept by autograd, by checkpoint's closures or by the
    LaneStash; less the loop's output (whole: less the logits, which train.py drops). autocast: a dtype to run
    the forward under, counted after leaving it (as train.py's backward does). Counted by storage, so
    views and the stash's references are not double counted; parameters and buffers (e.g. a view of the RoPE
    table) are not activations and are left out, nor is anything off idx's device (on CUDA, LanePlanner's pinned
    host copy of the betas, which it keeps until the next step). Under FSDP2 the gathered parameters that stay
    alive (the root's, kept for the backward) are counted too; a block's are freed after its forward."""
    created = []
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # FSDP2's shards
    existing = {local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            created.extend(weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out

    outputs, tracking = [], Track()

    inside = []

    def enter(*_):
        tracking.__enter__()
        inside.append(True)

    def leave(mod, inp, out):
        tracking.__exit__(None, None, None)
        inside.pop()
        outputs.append(out[0])

    model.train()
    hooks = [] if whole else [model.blocks[0].register_forward_pre_hook(enter), model.blocks[-1].register_forward_hook(leave)]
    try:
        with torch.autocast(idx.device.type, dtype=autocast, enabled=autocast is not None):
            if whole:
                with tracking:
                    logits, loss = model(idx, targets)
                outputs.append(logits)
            else:
                _, loss = model(idx, targets)
    finally:
        for h in hooks:
            h.remove()
        if inside:  # the forward raised between the first and the last block
            tracking.__exit__(None, None, None)
    out_ptr = outputs[0].untyped_storage().data_ptr()
    alive = {}
    for ref in created:
        t = ref()
        ptr = None if t is None else t.untyped_storage().data_ptr()
        if t is not None and t.device == idx.device and ptr != out_ptr and ptr not in existing:
            alive[ptr] = t.untyped_storage().nbytes()
    return sum(alive.values()), loss


# ----------------------------------------------------------------------------- the plan
def layer_numbers(cfg, l, bf16, lanes_f32=False):
    """(float32 numbers, compute-dtype numbers) per token that autograd keeps for layer l with no recompute.
    lanes_f32: Eq. 6's outputs are float32 (recompute crnet/reversible set Projection.lane_dtype; their replay of a
    layer is what this counts then); else every projection output is in the compute dtype."""
    h, ff, nh, L = cfg.n_embd, cfg.ff_dim, cfg.n_head, cfg.n_layer
    llama, n_up, kind = cfg.arch != "gpt2", (1 if cfg.arch == "gpt2" else 2), cfg.layer_kind(l)
    q, qkv = cfg.q_dim, cfg.q_dim + 2 * cfg.kv_dim
    lanes_f32 = lanes_f32 and kind == "crnet"
    cast = bf16 and lanes_f32    # SDPA and the next matmul then keep bf16 copies of their inputs
    # the layer above keeps our lanes for dL/dbeta (not for a fixed beta: autograd saves only what it will use)
    kept_above = l + 1 < L and cfg.layer_kind(l + 1) == "crnet" and cfg.beta_learnable
    f32 = 2 * ((1 + h) if llama else 2) + 2 * h  # 2 norms' statistics (+ RMSNorm's normalized x); residual x twice
    act = 2 * h                                  # the 2 norms' outputs, as the next matmul keeps them
    # QK-norm, float32 inside: statistics, output and a bf16 input's float32 copy as counted on the CPU, where rms_norm
    # is composite (CUDA's fused kernel keeps the statistics only: the plan errs high there)
    if cfg.qwen3:
        f32 += cfg.n_head + cfg.kv_heads + (qkv - cfg.kv_dim) * (1 + (bf16 and not cast))
    if kind != "full":
        silu = {"cola": 3 + 1 + n_up + 1, "cola_mlp": n_up + 1}.get(kind, 0)  # projections that also keep silu(Z)
        act += (3 + 1 + (0 if cfg.n_expert else n_up + 1) + silu) * cfg.layer_rank(l)  # Z
    y = lambda n: (n, 0) if lanes_f32 else (0, n)  # numbers of a projection output, by its dtype
    parts = [(nh, 0), (0, q)]                      # SDPA: logsumexp; its output (o's input is a view of it)
    if cast:
        parts += [(0, qkv)] + [y(qkv)] * kept_above            # bf16 q, k, v; the fp32 lane if kept above
    else:
        parts += [y(qkv)] + [y(qkv - cfg.kv_dim)] * llama      # q, k, v (views of Y^qkv); rotated q, k
    parts += [y(h)] * kept_above + [y(h)] * (kept_above and cfg.moe_lane)  # Y^o, Y^down (Y^moe): lanes kept above
    if not cfg.n_expert:
        parts += [y(n_up * ff), (0, ff)] + [y(ff)] * llama     # Y^up (act's input); down's input; silu(gate)
    else:  # k routed copies of an expert's: input, Y^up, silu(gate), down's input, output (in y), Z
        k, r = cfg.expert_top_k, (0 if kind == "full" else cfg.layer_rank(l))
        parts += [(0, k * (2 * h + 4 * ff + 3 * r))]
        # the router's softmax and top-k weights (renormalised: and their sum); the weights the mix multiplies by;
        # int64 (2 numbers each): the chosen idx, the sorted pairs' tokens (the gather's) and their inverse order
        parts += [(cfg.n_expert + (k + 1) * cfg.norm_topk + k * (not bf16) + 6 * k, k * bf16)]
    return f32 + sum(p[0] for p in parts), act + sum(p[1] for p in parts)


def activation_numbers(cfg, mode, bf16, every=8, keep_z=True, store=None):
    """(float32, compute-dtype) numbers per token held at the end of a training forward (logits dropped). store:
    the (layer, group)s a crnet or reversible forward stores (stored_lanes; default: the checkpoint set). The
    residual stream is float32 under autocast with DDP's float32 weights and FSDP's bf16 ones alike (model.embed)."""
    h, L, llama = cfg.n_embd, cfg.n_layer, cfg.arch != "gpt2"
    f32 = h + h + cfg.vocab_size + ((1 + h) if llama else 2)  # x_0, x_L, log-softmax, final norm statistics
    act = h                                                   # final norm output, kept by the head
    if mode == "none":
        for l in range(L):
            f, a = layer_numbers(cfg, l, bf16)
            f32, act = f32 + f, act + a
        return f32 - h, act  # x_L was counted by the last layer too
    lanes = lane_numbers(cfg) if cfg.param == "crnet" else []
    if mode == "reversible":
        # the stored inputs and lanes only (x_0 is not kept unless stored), and Z unless keep_z=False; in bf16
        # recompute.py keeps Z anyway (a Z recomputed in bf16 from a rebuilt input would not be the forward's)
        return f32 - h + kept_numbers(cfg, mode, every, store) + route_numbers(cfg), act + z_numbers(cfg, keep_z or bf16)
    f32 += (L - 1) * h  # the inputs of blocks 2..L
    if mode == "block":  # and their input lanes, in the compute dtype
        return f32, act + (L - 1) * sum(lanes)
    if cfg.param != "crnet":
        raise ValueError(f"recompute={mode!r} needs param='crnet'")
    return f32 + kept_numbers(cfg, mode, every, store) + route_numbers(cfg), act + z_numbers(cfg)


def plan(c, parallel, mode, gpus):
    """Bytes per GPU: dict of params, grads, optimizer, activations, backward, total."""
    bf16 = c["dtype"] in ("bfloat16", "auto")
    cfg = model_config(c)
    with torch.device("meta"):
        m = Transformer(cfg)
    counts = m.num_params()
    P = counts["total"]
    # the bf16 weight copies autocast makes and autograd keeps: every matmul's without recompute; only the head's
    # with it (the blocks' copies are made again when they are recomputed)
    copies = (counts["full_rank"] + counts["low_rank"] if mode == "none" else 0) + m.lm_head.weight.numel()
    block = max(sum(p.numel() for p in b.parameters()) for b in m.blocks)
    root = P - sum(p.numel() for p in m.blocks.parameters())
    A, tokens = (2 if bf16 else 4), c["batch_size"] * c["block_size"]
    keep_z, store = c.get("keep_z", True), None
    if mode in ("crnet", "reversible"):  # what the round-off guard stores at the initial betas (lanes in float32)
        inv_s = [[1 / (abs(cfg.beta_init) + cfg.beta_eps)] * len(m.blocks[0].projections())] * (cfg.n_layer - 1)
        store = stored_lanes(m.blocks, c["recompute_every"], torch.float32, mode == "reversible", keep_z or bf16,
                             c.get("recompute_rtol", LANE_RTOL), inv_s)
    f32, act = activation_numbers(cfg, mode, bf16, c["recompute_every"], keep_z, store)
    f, a = layer_numbers(cfg, cfg.n_layer // 2, bf16, mode in ("crnet", "reversible"))
    backward = tokens * (cfg.vocab_size * (4 + A) + (0 if mode == "none" else 4 * f + A * a))
    if parallel == "ddp":
        r = {"params": 4 * P + (2 * copies if bf16 else 0), "grads": 4 * P, "optimizer": 8 * P}
    else:
        g = A if bf16 else 4  # gathered parameters are bf16 under FSDP's mixed precision
        r = {"params": 4 * P / gpus + g * (root + 2 * block), "grads": 4 * P / gpus + g * (root + block),
             "optimizer": 8 * P / gpus}
    r["activations"] = tokens * (4 * f32 + A * act)
    r["backward"] = backward
    r["total"] = sum(r.values())
    return r, P


def auto_recompute(c, world, gpu_bytes):
    """recompute='auto': the fastest mode whose plan fits 90% of gpu_bytes, in the order none, crnet, reversible
    (CR-Net; each stores less and replays more than the one before) or none, block (other models). Returns the
    mode and a line that says why, with the plan's numbers; none fitting is an error naming each mode's need."""
    order = ("none", "crnet", "reversible") if c["param"] == "crnet" and c.get("moe_lane", True) else ("none", "block")

    need = []
    for mode in order:
        total = plan({**c, "recompute": mode}, c["data_parallel"], mode, world)[0]["total"]
        need.append(f"{mode} {total / GiB:.1f}")
        if total <= 0.9 * gpu_bytes:
            return mode, (f"recompute auto -> {mode}: planned {total / GiB:.1f} GiB per GPU, fits 90% of "
                          f"{gpu_bytes / GiB:.1f} GiB ({c['data_parallel']}, {world} process(es); GiB needed: {', '.join(need)})")
    raise ValueError(f"recompute='auto': no mode fits 90% of {gpu_bytes / GiB:.1f} GiB per GPU (GiB needed: "
                     f"{', '.join(need)}): lower batch_size or use data_parallel='fsdp'")


def report(c, argv):
    gib, n = c["gpu_gib"], c["gpus"]
    model_config(c)  # the model's own checks (ranks, heads, ...), before the table's first line
    print(f"{' '.join(argv) or 'defaults'}: micro-batch {c['batch_size']} x {c['block_size']} tokens, dtype "
          f"{'bfloat16' if c['dtype'] == 'auto' else c['dtype']}; GiB per GPU; fits = total <= 90% of {gib:g} GiB")
    print("| parallel | recompute | params | grads | AdamW | activations | backward | total | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    modes = [("none", True), ("block", True)]
    modes += [("crnet", True), ("reversible", True), ("reversible", False)] if c["param"] == "crnet" else []
    for parallel, label in (("ddp", "DDP"), ("fsdp", f"FSDP x{n}")):
        for mode, keep_z in modes:
            r, P = plan({**c, "keep_z": keep_z}, parallel, mode, n)
            cells = " | ".join(f"{r[k] / GiB:.2f}" for k in ("params", "grads", "optimizer", "activations", "backward", "total"))
            name = mode + ("" if keep_z else ", keep_z=False")
            print(f"| {label} | {name} | {cells} | {'yes' if r['total'] <= 0.9 * gib * GiB else 'no'} |")
    for parallel, label in (("ddp", "DDP"), ("fsdp", f"FSDP x{n}")):
        try:
            print(f"{label}: " + auto_recompute({**c, "data_parallel": parallel}, n if parallel == "fsdp" else 1, gib * GiB)[1])
        except ValueError as e:
            print(f"{label}: {e}")
    print(f"{P / 1e6:.1f}M parameters")


def paper_table(c):
    """One row per paper config: parameters, and the total per GPU with its recompute mode, DDP vs FSDP."""
    print(f"GiB per GPU at each config's micro-batch and recompute setting, bf16; FSDP on {c['gpus']} GPUs")
    print(f"| config | parameters | micro-batch | recompute (DDP / FSDP) | DDP total | FSDP total | fits {c['gpu_gib']:g} GiB (DDP / FSDP) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for path in PAPER:
        cc = {**configurator.load([path], "train.py")[0], **{k: c[k] for k in ("gpus", "gpu_gib", "paper")}}
        modes = {}
        for parallel, n in (("ddp", 1), ("fsdp", c["gpus"])):  # 'auto': what it picks (its last choice if none fits)
            try:
                modes[parallel] = cc["recompute"] if cc["recompute"] != "auto" else \
                    auto_recompute({**cc, "data_parallel": parallel}, n, c["gpu_gib"] * GiB)[0]
            except ValueError:
                modes[parallel] = "reversible" if cc["param"] == "crnet" else "block"
        d, P = plan(cc, "ddp", modes["ddp"], c["gpus"])
        f, _ = plan(cc, "fsdp", modes["fsdp"], c["gpus"])
        fits = lambda r: "yes" if r["total"] <= 0.9 * c["gpu_gib"] * GiB else "no"
        mode = cc["recompute"] if cc["recompute"] != "auto" else f"auto: {modes['ddp']} / {modes['fsdp']}"
        print(f"| {Path(path).stem} | {P / 1e6:.1f}M | {cc['batch_size']} x {cc['block_size']} | {mode} | "
              f"{d['total'] / GiB:.1f} | {f['total'] / GiB:.1f} | {fits(d)} / {fits(f)} |")
        rows.append((path, P, d, f))
    return rows


def device_memory(device, available=False):
    """Bytes of memory on `device` (the one place that reads it): the GPU's, else the machine's, or with available=True
    what the machine has free now (MemAvailable: tools/bench.py sizes, on a machine other work shares)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if available:
        with open("/proc/meminfo") as f:
            return int(next(l for l in f if l.startswith("MemAvailable")).split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def grad_accum(c, world):
    """Micro-batches per optimizer step at `world` processes, after the checks that span the batch keys (train.py's,
    and tools/ablate.py's for every run before the first one trains)."""
    bsz, T = c["batch_size"], c["block_size"]
    per_micro = bsz * T * world
    if c["total_batch_tokens"] % per_micro and not c["eval_only"]:  # evaluation takes no optimizer step
        raise configurator.ConfigError("total_batch_tokens", c["total_batch_tokens"], f"must be a multiple of batch_size "
                                       f"* block_size * world_size = {bsz} * {T} * {world} = {per_micro}")
    if c["stop_iter"] > c["max_iters"]:
        raise configurator.ConfigError("stop_iter", c["stop_iter"], f"is beyond max_iters={c['max_iters']}")
    return max(1, c["total_batch_tokens"] // per_micro)


def preflight(c, world, grad_accum, ckpt=None):
    """train.py --preflight: every check a launch at `world` processes makes before it costs GPU time, on any
    machine. train.py has checked the config and batch arithmetic; here the data (where it is present; against
    ckpt's tokenizer when fine-tuning) and the memory plan, against this GPU's memory if there is one."""
    # imported here, so that recompute.py's import of this module (the guard above) does not pull them in
    from checkpoint import check_tokenizer
    from prepare_data import check_data, find_data, schedule_reads, tokens_sha1
    try:
        data_dir, meta = find_data(c)
    except FileNotFoundError as e:
        data_dir, meta = None, None
        print(f"note: {e}\n  (not needed for the preflight; needed on the machines that train)")
    if meta is not None:
        if ckpt is not None:
            check_tokenizer(c, ckpt, {**meta, "tokens_sha1": tokens_sha1(data_dir)})
        check_data(c, data_dir, meta)
    cp, gib = {**c, "vocab_size": c["vocab_size"] or (meta or {}).get("vocab_size")}, 2 ** 30
    on_host = c["device"] in ("cpu", "mps")  # a run there: dtype auto is float32, memory is RAM, as train.py has it
    limit = device_memory(torch.device("cuda", 0)) if torch.cuda.is_available() and not on_host else None  # this GPU's
    if c["dtype"] == "auto" and on_host:
        cp["dtype"] = "float32"
    if c["recompute"] == "auto":  # sized as train.py sizes it: device_gib, else the device's memory
        host = device_memory(torch.device("cpu")) if on_host else None
        cp["recompute"], why = auto_recompute(cp, world, c["device_gib"] * gib or limit or host or 80 * gib)
        print(why + ("" if limit or host or c["device_gib"] else " (no GPU here: planned for 80 GiB; set --device_gib)"))
    r, P = plan(cp, c["data_parallel"], cp["recompute"], world)
    if limit and r["total"] > 0.9 * limit:
        raise ValueError(f"the memory plan needs {r['total'] / gib:.1f} GiB per GPU ({c['data_parallel']}, recompute="
                         f"{cp['recompute']}, micro-batch {c['batch_size']}), over 90% of this GPU's {limit / gib:.1f} "
                         f"GiB: lower batch_size, use recompute or data_parallel='fsdp'")
    fits = f", fits 90% of this GPU's {limit / gib:.1f} GiB" if limit else ""
    if cp["dtype"] == "auto" and c["device"] == "auto" and not limit:  # planned for CUDA; a run here is float32
        here = plan({**cp, "dtype": "float32"}, c["data_parallel"], cp["recompute"], world)[0]["total"]
        fits += f"; {here / gib:.1f} GiB in float32 (a run here, without CUDA)"
    print(f"preflight ok for {world} process(es): {P / 1e6:.1f}M parameters, {c['total_batch_tokens']:,} tokens/step = "
          f"{c['batch_size']} seq x {c['block_size']} tok x {world} proc x {grad_accum} accum; planned "
          f"{r['total'] / gib:.1f} GiB per {'process' if on_host else 'GPU'} ({c['data_parallel']}, recompute={cp['recompute']}, "
          f"{'bf16' if cp['dtype'] in ('auto', 'bfloat16') else 'float32'}){fits}; "
          f"data {f'in {data_dir}, {schedule_reads(c, meta)}' if meta else 'not here'}"
          f"{'' if cp['vocab_size'] else ' (vocab 50257 assumed: set --vocab_size for a closer plan)'}")


def main(argv):
    c, _ = configurator.load(argv, "plan.py", extends=("train.py",), doc=__doc__)
    if c["init_from"] != "scratch":  # a resumed or fine-tuned run's config is in its checkpoint, which plan.py never reads
        raise configurator.ConfigError("init_from", c["init_from"], "plan.py plans the config it is given and reads no "
                                       "checkpoint; for a resumed or fine-tuned run: python train.py --preflight with "
                                       "the same arguments")
    meta = Path(c["data_dir"]) / "meta.json"
    if c["vocab_size"] is None and meta.is_file():  # the data's vocabulary, as train.py would use (else GPT-2's)
        c["vocab_size"] = json.loads(meta.read_text())["vocab_size"]
    if c["paper"]:
        return paper_table(c)
    report(c, argv)


if __name__ == "__main__":
    configurator.main_guard(main)
