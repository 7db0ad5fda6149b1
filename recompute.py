"""
Activation recomputation for training steps (ModelConfig.recompute):

  "block": torch.utils.checkpoint (non-reentrant) around every block; keeps each block's input and its
           input lanes. What a user would reach for, and the paper's baseline.
  "crnet": the paper's Algorithm 1 (method note, section 4). Forward keeps only
             1. every block's input x_l                                   (h numbers per token)
             2. every low-rank intermediate Z_l^P = X_l^P A_l^P           (r per position, layers 2..L; 1 too if low-rank)
             3. the lanes Y_l of the checkpoint set (every k-th layer counted down from the last, never
                the first), plus any lane the round-off guard below decides to keep.
           Backward of block l rebuilds its own *input* lanes by inverting Eq. 6,
                Y_{l-1} = (Y_l - Z_l B_l) / s_l,
           and hands them to block l-1 through a LaneStash made per forward pass; the norms, RoPE,
           attention, residual adds and SwiGLU/GELU are replayed from x_l and the lanes. No X A or X W
           product is recomputed: the replay reuses the saved Z (KnownMatmul) and the known Y; the only
           forward matmul redone is Z B, which the inversion needs anyway. Every parameter is touched only
           inside its own block's forward and backward, so DDP hooks fire as usual and FSDP2 can gather a
           block's parameters around its own backward.

Round-off guard. A rebuilt lane carries the forward's rounding amplified by 1/|s| at every inversion:
relative error ~ eps * sum_{i=j+1..c} prod_{t=j+1..i} 1/|s_t| for layer j rebuilt from a stored layer c
(assuming lane norms of similar size, which the init makes them). Before each forward we walk the layers
top-down with the current betas and store a lane whenever that bound would exceed LANE_RTOL. For float32
lanes the budget is LANE_RTOL / eps = 84: betas near 0.7 and k = 8 stay under it (35); a |s| below
~0.012 stores the lane below it outright. For bfloat16/float16 lanes the budget is below 1, so every
lane is stored: recompute never silently degrades gradients.
"""
import torch
from torch.utils.checkpoint import checkpoint

LANE_RTOL = 1e-5   # the largest relative round-off we accept in a rebuilt lane


class LaneStash:
    """Lanes of one forward pass, keyed by (layer, group): kept in forward (checkpoint set and guard),
    rebuilt in backward, each dropped as soon as the block that needs it has run its backward."""

    def __init__(self, store):
        self.store = store        # set of (layer, group) whose lanes forward keeps
        self.lanes = {}
        self.dtypes = {}


def checkpoint_layers(n_layer, every):
    """0-based layers whose lanes are stored: the last, then every `every`-th below it, never the first."""
    return {n_layer - 1} | set(range(n_layer - 1, 0, -every))


def plan_stored_lanes(blocks, every, dtype):
    """The checkpoint set plus the round-off guard (module docstring), per (layer, group); dtype is the one
    the lanes are formed in. Works on FSDP2-sharded betas: each process takes min |s| over its own shard
    and one all-reduce finds the global minimum, so no block has to be gathered."""
    budget = LANE_RTOL / torch.finfo(dtype).eps
    ckpt = checkpoint_layers(len(blocks), every)
    # min |s| per (layer, group): the bound below only needs the largest 1/|s| of each group
    betas = [p.beta for blk in blocks[1:] for p in blk.projections()]
    local = [b.to_local() if hasattr(b, "to_local") else b for b in betas]  # DTensor shard, or the tensor
    min_abs = [(p.detach().abs().min() if p.numel() else p.new_tensor(float("inf"))).double() for p in local]
    min_s = torch.stack(min_abs) + blocks[1].qkv.beta_eps if betas else torch.zeros(0)  # |s| = |beta| + eps
    if betas and hasattr(betas[0], "device_mesh"):
        torch.distributed.all_reduce(min_s, op=torch.distributed.ReduceOp.MIN, group=betas[0].device_mesh.get_group())
    inv_s = (1.0 / min_s).view(-1, 4).tolist()  # one host copy of all betas per step: one GPU sync
    store = set()
    for g in range(4):
        bound = 0.0  # the round-off bound of layer l's lane if rebuilt, as we walk down
        for l in range(len(blocks) - 1, -1, -1):
            if l in ckpt:
                store.add((l, g))
                bound = 0.0
                continue
            bound = (1.0 + bound) * inv_s[l][g]  # rebuilt by inverting layer l + 1 (row l of inv_s)
            if bound > budget:
                store.add((l, g))
                bound = 0.0
    return store


class KnownMatmul(torch.autograd.Function):
    """Z = X @ W where Z is already known (saved in forward): returns Z without the matmul; the backward
    is the matmul's (dX = dZ W^T, dW = X^T dZ), computed in Z's dtype as autocast did in forward."""

    @staticmethod
    def forward(ctx, x, w, z):
        ctx.save_for_backward(x, w)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, gz):
        x, w = ctx.saved_tensors
        dt = gz.dtype
        gx = (gz @ w.to(dt).t()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = (x.reshape(-1, x.shape[-1]).to(dt).t() @ gz.reshape(-1, gz.shape[-1])).to(w.dtype)
        return gx, gw, None


def autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class CRNetBlock(torch.autograd.Function):
    """One block under CR-Net recomputation. Tensor inputs: x, the 4 input lanes (none for layer 1) and the
    block's parameters; outputs: x_out and the 4 output lanes. Backward returns the gradients of all inputs
    (computed by autograd on the replay), so torch.autograd.grad, gradcheck and DDP's hooks see them."""

    @staticmethod
    def forward(ctx, x, stash, l, block, rope, n_lanes, *lanes_and_params):
        lanes, params = lanes_and_params[:n_lanes], lanes_and_params[n_lanes:]
        ctx.stash, ctx.l, ctx.block, ctx.rope, ctx.params = stash, l, block, rope, params
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None) if block.cfg.dropout else None
        ctx.set_materialize_grads(False)
        zs = []

        def project(proj, inp, lane):  # Eq. 6, keeping Z = X A
            if proj.kind == "full":
                return proj(inp)
            z = proj.lowrank_z(inp)
            zs.append(z)
            d = proj.delta(inp, z)
            return torch.addcmul(d, proj.scale().view(proj.n, 1), lane) if proj.lane_in else d  # as Projection.forward

        with torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            x_out, lanes_out = block.forward(x, lanes or None, rope, project)  # .forward: hooks ran outside
        for g, y in enumerate(lanes_out):
            stash.dtypes[(l, g)] = y.dtype
            if (l, g) in stash.store:
                stash.lanes[(l, g)] = y.detach()
        ctx.save_for_backward(x, *zs)
        return (x_out, *lanes_out)

    @staticmethod
    def backward(ctx, g_x, *g_lanes):
        stash, l, block = ctx.stash, ctx.l, ctx.block
        x_in, *zs = ctx.saved_tensors
        # Y_l: stored (kept while the graph lives, so a retain_graph backward can run again), or rebuilt by
        # block l + 1 (dropped now: a second backward rebuilds it again)
        own = [stash.lanes[(l, g)] if (l, g) in stash.store else stash.lanes.pop((l, g)) for g in range(4)]
        leaves = []
        zs_iter = iter(zs)
        projs = block.projections()

        def project(proj, inp, lane_unused):  # replay: known Y, exact gradient, no X A / X W product
            g = projs.index(proj)
            y_known = own[g]
            if proj.kind == "full":  # CR-Net's layer 1: Y = X W (+ b)
                xw = y_known if proj.bias is None else y_known - proj.bias.detach()
                y = KnownMatmul.apply(inp, proj.weight, xw.flatten(-2)).unflatten(-1, (proj.n, proj.h_out))
                y = y if proj.bias is None else y + proj.bias
            else:
                z = KnownMatmul.apply(inp, proj.A, next(zs_iter).flatten(-2)).unflatten(-1, (proj.n, proj.rank))
                d = proj.delta(inp, z)  # Z B (+ b): the one forward matmul redone
                if not proj.lane_in:    # a low-rank layer 1 (first_layer="lowrank"): Y = Z B, no lane below
                    return d
                s = proj.scale().view(proj.n, 1)
                prev = stash.lanes.get((l - 1, g))
                if prev is None:  # invert Eq. 6 and hand the lane to the block below
                    prev = torch.sub(y_known, d.detach()).div_(s.detach()).to(stash.dtypes[(l - 1, g)])
                    stash.lanes[(l - 1, g)] = prev
                prev = prev.detach().requires_grad_()
                leaves.append(prev)
                y = torch.addcmul(d, s, prev)  # = y_known up to round-off; its graph gives the gradients
            return y

        x = x_in.detach().requires_grad_()
        state = torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=ctx.rng is not None)
        with torch.enable_grad(), state, torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1])
            x_out, lanes_out = block.forward(x, [None] * 4 if l else None, ctx.rope, project)
        pairs = [(y, g) for y, g in zip((x_out, *lanes_out), (g_x, *g_lanes)) if g is not None]
        inputs = [x, *leaves, *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]  # not frozen parameters (beta_learnable=False)
        found = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        return (grads[0], None, None, None, None, None, *grads[1:])


def run_blocks(model, x):
    """The layer loop of a training step with recompute "block" or "crnet"."""
    cfg, rope = model.cfg, model.rope()
    if cfg.recompute == "block":
        lanes = None
        for block in model.blocks:
            x, lanes = checkpoint(block, x, lanes, rope, use_reentrant=False)
        return x
    # Round-off enters where Y_l = s Y_{l-1} + Z B is formed, in the dtype of s: at least float32
    # (Projection.scale), so bf16 parameters or autocast do not force every lane to be stored.
    # (A low-precision lane rebuilt in float32 rounds back to its exact stored value.)
    beta = model.blocks[-1].qkv.beta if cfg.n_layer > 1 else x
    stash = LaneStash(plan_stored_lanes(model.blocks, cfg.recompute_every, torch.promote_types(beta.dtype, torch.float32)))

    def crnet_block(block, x, lanes, rope):  # runs inside block.__call__, after FSDP2 (if any) gathered it
        lanes = lanes or ()
        x, *lanes = CRNetBlock.apply(x, stash, block.layer_idx, block, rope, len(lanes), *lanes, *block.parameters())
        return x, lanes

    lanes = None
    for block in model.blocks:
        x, lanes = block(x, lanes, rope, via=crnet_block)
    return x


def stored_numbers_per_token(cfg, mode, store=None):
    """What a training step keeps inside the layer loop per token, in numbers (multiply by bytes per
    number), counting inputs of blocks 2..L (block 1's input is the embedding output, kept by every mode):
        block: (L-1) * (h + 5h + 2 ff)                 block inputs + their input lanes
        crnet: (L-1) * h + 7 (L-1) r + |C| (5h + 2 ff) block inputs + Z + stored lanes (C: checkpoint set)
    for LLaMA; GPT-2's lanes are 3h + h + 4h + h = 9h per layer and its Z 6r. `store` replaces the
    checkpoint set by an actual (layer, group) plan, e.g. one the round-off guard extended."""
    L, h = cfg.n_layer, cfg.n_embd
    group = lane_numbers(cfg)
    if mode == "block":
        return (L - 1) * (h + sum(group))
    if mode != "crnet":
        raise ValueError(f"no formula for recompute={mode!r}: 'none' keeps every intermediate")
    if store is None:
        store = {(l, g) for l in checkpoint_layers(L, cfg.recompute_every) for g in range(4)}
    return (L - 1) * h + z_numbers(cfg) + sum(group[g] for (l, g) in store)


def lane_numbers(cfg):
    """Lane numbers per token of one layer, per group (qkv, o, up, down)."""
    h = cfg.n_embd
    return [3 * h, h, (2 if cfg.arch == "llama" else 1) * cfg.ff_dim, h]


def z_numbers(cfg):
    """Numbers per token of every Z = X A that crnet recompute keeps (layers 2..L, and 1 if it is low-rank)."""
    n_up = 2 if cfg.arch == "llama" else 1
    return sum((3 + 1 + n_up + 1) * cfg.layer_rank(l) for l in range(cfg.n_layer) if cfg.layer_kind(l) != "full")


def held_activation_bytes(model, idx, targets, whole=False, autocast=None):
    """Bytes of the tensors created inside the layer loop of a training forward (whole=True: anywhere in the
    forward) that are still alive when it returns, kept by autograd, by checkpoint's closures or by the
    LaneStash; less the loop's output (whole: less the logits, which train.py drops). autocast: a dtype to run
    the forward under, counted after leaving it (as train.py's backward does). Counted by storage, so
    views and the stash's references are not double counted; parameters and buffers (e.g. a view of the RoPE
    table) are not activations and are left out."""
    import weakref
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    created = []
    existing = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            created.extend(weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out

    outputs = []
    inner = model.run_blocks

    def tracked(x):
        with Track():
            y = inner(x)
        outputs.append(y)
        return y

    model.train()
    with torch.autocast(idx.device.type, dtype=autocast, enabled=autocast is not None):
        if whole:
            with Track():
                logits, loss = model(idx, targets)
            outputs.append(logits)
        else:
            model.run_blocks = tracked
            try:
                _, loss = model(idx, targets)
            finally:
                del model.run_blocks  # back to the class method
    out_ptr = outputs[0].untyped_storage().data_ptr()
    alive = {}
    for ref in created:
        t = ref()
        ptr = None if t is None else t.untyped_storage().data_ptr()
        if t is not None and ptr != out_ptr and ptr not in existing:
            alive[ptr] = t.untyped_storage().nbytes()
    return sum(alive.values()), loss
