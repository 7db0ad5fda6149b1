"""
Activation recomputation, applied from outside the model (as torchtitan applies activation checkpointing):
apply(model, mode, every) changes each block's training step; evaluation and no_grad calls pay nothing.

  "none":  autograd keeps every intermediate.
  "block": torch.utils.checkpoint around every block: keeps each block's input and input lanes (the baseline).
  "crnet": the paper's Algorithm 1 (arXiv 2509.18993), in CRNetBlock:
             forward, block l:   run the block; keep x_l, every Z_l = X A, and the lanes Y_l where the plan stores
                                 them (every k-th layer counted down from the last, plus the round-off guard's)
             backward, block l:  Y_l is stored, or was handed down by block l + 1
                                 Y_{l-1} = (Y_l - Z_l B_l - b_l) / s_l      Eq. 6 inverted; handed to block l - 1
                                 replay block l from x_l, Y_{l-1}, Z_l and backpropagate through the replay
           The replay redoes no projection matmul (attention's and MoE experts' it does): X A is the kept Z, Z B the
           product the inversion formed (both enter through Known, whose backward is the matmul's). Each parameter is
           touched only in its own block's forward and backward: DDP's hooks fire, FSDP2 gathers a block around both.
  "reversible": beyond the paper. A block only adds its own lanes to the residual stream, x_{l+1} = x_l +
           drop(Y^o_l) + drop(Y^down_l), so backward subtracts them from x_{l+1} (no division: no amplified
           round-off) and keeps x_l only at the stored layers. keep_z=False also drops Z: x_l and Y_l give every
           projection input of block l, so backward forms X A again first (recompute_z).

Lanes of layers 2..L are float32 under "crnet" and "reversible" (apply sets Projection.lane_dtype): inverting Eq. 6
divides by s, amplifying a lane's rounding by 1/|s| per layer. Before each training forward plan.LanePlanner (the
round-off guard) stores a lane wherever that bound would pass rtol, without waiting on the GPU.

Compiled (apply(..., compile=True)): CRNetBlock stays a thin eager autograd.Function (one that hands lanes between
blocks through a Python stash cannot be traced) and its bodies are torch.compile'd: pure functions of a block and
tensors, with static shapes, so one graph serves every layer of a kind (layer 1, layer 2, layers 3..L). The forward
body runs under no_grad and saves nothing; the replay saves only what its own backward, run at once, needs. With
dropout (a compiled graph draws its own random numbers, which a replay would not redraw) or experts (shapes follow the
routing) the bodies stay eager.

Qwen-3-MoE: the MoE is one projection group whose output Y^moe carries the lane; forward keeps its D (to invert Eq. 6)
and the experts each token was routed to, and the replay runs them again on exactly those tokens. A block also returns
its router statistics (a Function output), so the load-balancing loss's gradient reaches the router through the replay.

What it uses of model.py: a block's projections(), forward(x, lanes, rope, project), layer_idx, cfg.dropout, o;
a Projection's kind, lane_in, bias, weight/A/B, widths, packed and the methods that form its products; MoE.mix.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from configurator import ConfigError
from plan import BETA_DRIFT, LANE_RTOL, STREAM, LanePlanner

MODES = ("none", "block", "crnet", "reversible")


class LaneStash:
    """Lanes (and, reversible, block inputs as group STREAM) of one forward, keyed by (layer, group): stored in
    forward where the plan says (store), rebuilt in backward. A rebuilt one is dropped once the block below has
    used it; stored ones live as long as the autograd graph (a retain_graph backward can run again)."""

    def __init__(self, store, stream=False, keep_z=True, eps=0.0):
        self.store, self.stream, self.keep_z, self.eps = store, stream, keep_z, eps  # eps: the plan's precision
        self.lanes, self.layouts = {}, {}  # layouts: (dtype, strides) of every lane (and input) forward made


class Known(torch.autograd.Function):
    """a @ b where the product ab is already known: returns it without the matmul; the backward is the matmul's
    (da = g b^T, db = a^T g), in the product's dtype, as autocast ran it in forward. a (..., k) @ b (k, m), or
    Z (B, T, n, r) @ B (n, r, h_out) per projection (n = 1 and packed pieces: the 2-D path, which keeps DDP's strides)."""

    @staticmethod
    def forward(ctx, a, b, ab):
        ctx.save_for_backward(a, b)
        return ab.view_as(ab)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a_, b_ = a.to(g.dtype), b.to(g.dtype)
        if b.dim() == 3 and b.shape[0] > 1:
            ga = torch.einsum("btnh,nrh->btnr", g, b_) if ctx.needs_input_grad[0] else None
            gb = torch.einsum("btnr,btnh->nrh", a_, g)
        else:
            w, g2 = b_.reshape(b.shape[-2:]), g.reshape(-1, g.shape[-1])
            ga = (g2 @ w.t()).view(a.shape) if ctx.needs_input_grad[0] else None
            gb = (a_.reshape(-1, a.shape[-1]).t() @ g2).view(b.shape)
        return None if ga is None else ga.to(a.dtype), gb.to(b.dtype), None


# ----------------------------------------------------------------------------- the bodies (compiled under compile)
def forward_body(block, x, lanes, rope, keep_z, drop_rng=None):
    """Block l's plain forward, also returning each Z = X A it formed (keep_z). drop_rng (reversible with
    dropout): a dict that gets the RNG state just before each residual dropout."""
    zs = []

    def project(proj, inp, lane):
        if drop_rng is not None and proj in (block.o, block.projections()[-1]):
            drop_rng[proj] = rng_state(inp)  # nothing random runs between here and that dropout
        if proj.kind == "moe":  # keep the experts chosen (for the replay) and, to invert Eq. 6, D (any keep_z)
            d, router, idx = proj.mix(inp)
            zs.extend((idx, d) if proj.lane_in else (idx,))
            return proj.lane_add(d, lane) if proj.lane_in else d, router
        if proj.kind == "full" or not keep_z:
            return proj(inp, lane)
        zs.append(proj.input_product(inp))
        return proj(inp, lane, zs[-1])

    return *type(block).forward(block, x, lanes, rope, project), zs


def recompute_z(block, x, own, rope, kept):
    """keep_z=False: block l's Z = X A formed again from x_l and its own lanes Y_l, which give every projection's
    input without layer l - 1 (the layer's outputs are its lanes); an MoE's entries come from `kept`."""
    zs, outputs, kept = [], iter(own), iter(kept)

    def project(proj, inp, lane):
        if proj.kind == "moe":
            zs.extend(next(kept) for _ in range(1 + proj.lane_in))
            return next(outputs), None
        if proj.kind != "full":
            zs.append(proj.input_product(inp))
        return next(outputs)

    type(block).forward(block, x, None, rope, project)
    return zs


def lay_out(t, how):  # (dtype, strides); compiled, the inversion's own kernel writes them (eager: a copy)
    return t.to(how[0]) if t.stride() == how[1] else t.new_empty_strided(t.shape, how[1], dtype=how[0]).copy_(t)


def invert_lanes(block, zs, own, layouts):
    """Eq. 6 inverted, per projection of block l: the product P the forward formed (Z B, or for layer 1, which has
    no lane in, Y - b itself: X W or Z B) and the lane below, Y_{l-1} = (Y_l - P - b) / s, in layouts[g]: the (dtype,
    strides) forward made it with (None: not rebuilt; stored, or layer 1). So a rebuilt lane is interchangeable with
    a stored one and one replay graph takes either (layer 1's X W is laid out unlike the n-major Z B lanes above)."""
    products, below, zs = [], [], iter(zs)
    for proj, y, how in zip(block.projections(), own, layouts):
        moe, z = proj.kind == "moe", next(zs) if proj.kind != "full" else None  # MoE: the experts chosen (replay's)
        if not proj.lane_in:  # layer 1: its output is the product (an MoE's D, the replay forms it again)
            products.append(None if moe else y if proj.bias is None else y - proj.bias.to(y.dtype))
            below.append(None)
            continue
        p = None if moe else proj.output_product(z)
        d = next(zs) if moe else p if proj.bias is None else p + proj.bias.to(p.dtype)  # MoE: D, as forward kept it
        products.append(p)
        below.append(None if how is None else lay_out(torch.sub(y, d).div_(proj.lane_scale()), how))
    return products, below


def replay(block, x, lanes, rope, zs, products):
    """Block l's forward from x_l and its input lanes, with every matmul product given (Known): the kept Z = X A
    and the products P of invert_lanes. Its autograd graph gives block l's gradients."""
    zs, products = iter(zs), iter(products)

    def project(proj, inp, lane):
        if proj.kind == "moe":  # the experts run again, on the tokens the forward routed to them
            idx, _ = next(zs), next(products)
            d, router, _ = proj.mix(inp, idx)
            if proj.lane_in:
                next(zs)
            return proj.lane_add(d, lane) if proj.lane_in else d, router
        w = proj.weight if proj.kind == "full" else proj.A
        xa = proj.split_input(Known.apply(inp, w, (next(products) if proj.kind == "full" else next(zs)).flatten(-2)))
        if proj.kind == "full":
            d = xa
        elif proj.packed:  # a known product per projection, each of its own width: (Z_i, B_i, Z_i B_i)
            known = zip(xa.unbind(2), proj.B.split(proj.widths, -1), proj.pieces(next(products)))
            d = torch.cat([Known.apply(*t) for t in known], -1)[:, :, None]
        else:
            d = Known.apply(xa, proj.B, next(products))
        if proj.bias is not None:
            d = d + proj.bias.to(d.dtype)
        elif not proj.lane_in and torch.compiler.is_compiling():  # layer 1's output, a view of an input (the known
            d = d.clone()  # product): a compiled graph rebuilds such an output outside the graph, losing its gradient
        return proj.lane_add(d, lane) if proj.lane_in else d

    return type(block).forward(block, x, lanes, rope, project)


def plain_forward(block, x, lanes, rope):  # evaluation under compile: graphs of its own, not forward_body's
    return type(block).forward(block, x, lanes, rope)


BODIES = {f.__name__: f for f in (forward_body, recompute_z, invert_lanes, replay, plain_forward)}


# ----------------------------------------------------------------------------- Algorithm 1
def autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def rng_state(x):
    return torch.get_rng_state(), torch.cuda.get_rng_state() if x.is_cuda else None


@contextlib.contextmanager
def replaying(x, state, autocast):
    """Run with the RNG at `state`, as the forward was (None: the RNG untouched), and the forward's autocast."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=state is not None), \
            torch.autocast(x.device.type, enabled=autocast[0], dtype=autocast[1]):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1])
        yield


class CRNetBlock(torch.autograd.Function):
    """Algorithm 1 for one block ("crnet" or "reversible", as the stash says). Tensor inputs: x, the input lanes
    (none for layer 1) and the block's parameters; outputs: x_out, the output lanes (and an MoE's statistics). Backward returns the
    gradients of all inputs (autograd on the replay), so torch.autograd.grad, gradcheck and DDP's hooks see them."""

    @staticmethod
    def forward(ctx, x, stash, run, block, rope, n_lanes, *lanes_and_params):
        l = block.layer_idx
        lanes, ctx.params = lanes_and_params[:n_lanes], lanes_and_params[n_lanes:]
        ctx.run, ctx.stash, ctx.block, ctx.rope = run, stash, block, rope
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_state(x) if block.cfg.dropout else None
        ctx.drop_rng = {} if ctx.rng is not None and stash.stream else None  # RNG before drop(Y^o), drop(Y^down)
        ctx.set_materialize_grads(False)
        x_out, lanes_out, router, zs = run.body("forward_body")(block, x, lanes or None, rope, stash.keep_z, ctx.drop_rng)
        # keep: Z, x_l ("crnet"; "reversible" rebuilds it), and the lanes (inputs) the plan stores
        for g, y in [*enumerate(lanes_out), *([(STREAM, x)] if stash.stream else [])]:
            stash.layouts[(l, g)] = y.dtype, y.stride()
            if g == STREAM and torch.finfo(x_out.dtype).eps > stash.eps:  # the stream is coarser than the plan
                stash.store.add((l, STREAM))
            if (l, g) in stash.store:
                stash.lanes[(l, g)] = y.detach()
        ctx.save_for_backward(*zs) if stash.stream else ctx.save_for_backward(x, *zs)
        return (x_out, *lanes_out) + (() if router is None else (router,))  # an MoE's statistics: load_balance's

    @staticmethod
    def backward(ctx, g_x, *g_outputs):
        stash, block, run, l = ctx.stash, ctx.block, ctx.run, ctx.block.layer_idx
        # Y_l (and x_l): stored (kept while the graph lives, so a retain_graph backward can run again), or rebuilt
        # by block l + 1 (dropped now: a second backward rebuilds it again)
        take = lambda key: stash.lanes[key] if key in stash.store else stash.lanes.pop(key, None)
        groups = range(len(block.projections()))
        own = [take((l, g)) for g in groups]
        if stash.stream:
            zs, above = ctx.saved_tensors, take((l + 1, STREAM))  # x_{l+1}, dropped now if rebuilt (even if unused)
            x_in = take((l, STREAM)) if (l, STREAM) in stash.store else invert_stream(ctx, above, own)
            if l:
                stash.lanes[(l, STREAM)] = x_in  # for block l - 1
        else:
            x_in, *zs = ctx.saved_tensors
        with torch.no_grad(), replaying(x_in, ctx.rng, ctx.autocast):
            if not stash.keep_z:
                zs = run.body("recompute_z")(block, x_in, own, ctx.rope, zs)
            # layer 1 has no lanes below (and eager: a compiled call forming no graph would stop dynamo for every
            # layer). Compiled, all lanes below are rebuilt or none, not a graph per pattern the guard stored (a
            # stored lane's rebuilt twin is dropped); a rebuilt lane gets the (dtype, strides) forward made it with
            keys = [(l - 1, g) for g in groups] if l else []
            whole = run.compile and any(k not in stash.store for k in keys)
            layouts = [stash.layouts[k] if whole or k not in stash.store else None for k in keys]
            invert = run.body("invert_lanes") if l else invert_lanes
            products, below = invert(block, zs, own, layouts or [None] * len(groups))
        leaves = []
        for key, y in zip(keys, below):  # Y_{l-1}: stored where the plan kept it, else rebuilt, handed down
            stash.lanes.setdefault(key, y)
            leaves.append(stash.lanes[key].detach().requires_grad_())
        below = y = None  # no rebuilt twin of a stored lane outlives this loop
        x = x_in.detach().requires_grad_()
        with torch.enable_grad(), replaying(x, ctx.rng, ctx.autocast):
            x_out, lanes_out, router = run.body("replay")(block, x, leaves or None, ctx.rope, zs, products)
        pairs = [(y, g) for y, g in zip((x_out, *lanes_out, router), (g_x, *g_outputs)) if g is not None]
        inputs = [x, *leaves, *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]  # not frozen parameters (beta_learnable=False)
        found = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        return (grads[0], None, None, None, None, None, *grads[1:])


def invert_stream(ctx, x_above, own):
    """Block l's input from its output: x_l = (x_{l+1} - drop(Y^down_l)) - drop(Y^o_l), undoing the forward's
    two adds in reverse order with the forward's dropout masks."""
    block, y_o, y_down, rngs = ctx.block, own[1], own[-1], ctx.drop_rng or {}  # Y^down or Y^moe
    drop = lambda y: F.dropout(y[:, :, 0], block.cfg.dropout, block.training)
    with replaying(x_above, rngs.get(block.projections()[-1]), (False, None)):
        x_mid = x_above - drop(y_down)
    with replaying(x_above, rngs.get(block.o), (False, None)):
        x = x_mid - drop(y_o)
    return x.to(ctx.stash.layouts[(block.layer_idx, STREAM)][0])


class Recompute:
    """What apply() installs: the settings, the compiled bodies, and the lane stash of the forward in flight."""

    def __init__(self, model, mode, every, keep_z=True, rtol=LANE_RTOL, beta_drift=BETA_DRIFT, compile=False):
        self.blocks, self.mode, self.every, self.keep_z, self.rtol = model.blocks, mode, every, keep_z, rtol
        self.compile, self.compiled, self.stash = compile and not (model.cfg.dropout or model.cfg.n_expert), {}, None
        self.planner = LanePlanner(model.blocks, every, mode == "reversible", rtol, beta_drift)  # which lanes to store

    def body(self, name):
        """A body of Algorithm 1: compiled (once per process; dynamo keeps one graph per block kind), or eager."""
        if not self.compile:
            return BODIES[name]
        if name not in self.compiled:
            self.compiled[name] = torch.compile(BODIES[name], dynamic=False)
        return self.compiled[name]

    def __getstate__(self):  # copy.deepcopy, pickle: compiled functions stay behind
        return {**self.__dict__, "compiled": {}}

    def new_stash(self, x):
        # Round-off enters where Y_l = s * Y_{l-1} + Z B is formed, in the lanes' dtype: float32 (apply sets
        # lane_dtype), float64 for float64 models
        beta = self.blocks[-1].qkv.beta if len(self.blocks) > 1 else x
        dtype = torch.promote_types(beta.dtype, torch.float32)
        # Z is formed in autocast's dtype, else in the parameters' (as x_0, the embedding, is): if that is coarser,
        # a Z recomputed from a rebuilt input would not be the forward's, so keep it
        on, ac_dtype = autocast_state(x.device.type)
        keep_z = self.keep_z or torch.finfo(ac_dtype if on else x.dtype).eps > torch.finfo(dtype).eps
        return LaneStash(self.planner(dtype, keep_z), self.mode == "reversible", keep_z, torch.finfo(dtype).eps)

    def block_forward(self, block, layer, x, lanes, rope=None):
        """Replaces block.forward (inside block.__call__, so FSDP2's hooks gather the block around it)."""
        if not (block.training and torch.is_grad_enabled()):  # evaluation, generation, no_grad: the plain forward
            return self.body("plain_forward")(block, x, lanes, rope) if self.compile else layer(x, lanes, rope)
        if self.mode == "block":
            return checkpoint(layer, x, lanes, rope, use_reentrant=False)
        l = block.layer_idx
        if l == 0:
            self.stash = self.new_stash(x)
        if self.stash is None:
            raise RuntimeError(f"{self.mode} recompute: a training forward must run the blocks in order from the first")
        stash = self.stash
        if l == len(self.blocks) - 1:
            self.stash = None  # the autograd graph holds it now, and frees it with the graph
        lanes = lanes or ()
        x, *out = CRNetBlock.apply(x, stash, self, block, rope, len(lanes), *lanes, *block.parameters())
        n = len(block.projections())
        return x, out[:n], (out[n] if len(out) > n else None)


# The model-level torch.compile cannot trace CRNetBlock (it hands lanes through a Python stash), so it steps around
# the block here; the bodies inside are compiled on their own (Recompute.body), and so are embeddings and head.
eager_block_forward = torch.compiler.disable(Recompute.block_forward)


def check(mode, param, every=8, keep_z=True, rtol=LANE_RTOL, moe_lane=True):
    """The recompute settings against each other and the model's param: for apply() and for train.py's config
    (whose recompute="auto" is resolved before apply)."""
    if mode not in MODES and mode != "auto":
        raise ConfigError("recompute", mode, f"must be one of {MODES} (or 'auto', in train.py)")
    if mode in ("crnet", "reversible") and param != "crnet":
        raise ConfigError("recompute", mode, f"inverts Eq. 6 and needs param='crnet' (got param={param!r}); use "
                                             f"recompute='block'")
    if mode in ("crnet", "reversible") and not moe_lane:
        raise ConfigError("recompute", mode, "inverts Eq. 6 on every lane, and moe_lane=False leaves the MoE output "
                                             "without one; use recompute='block'")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError("recompute_every", every, "must be a positive integer")
    if not isinstance(keep_z, bool) or (not keep_z and mode not in ("reversible", "auto")):
        raise ConfigError("keep_z", keep_z, f"applies to recompute='reversible' only, and must be True or False "
                                            f"(got recompute={mode!r})")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ConfigError("recompute_rtol", rtol, "must be a positive number")


def apply(model, mode, every=8, keep_z=True, rtol=LANE_RTOL, beta_drift=BETA_DRIFT, compile=False):
    """Make model's training steps run with recomputation `mode` ("none" | "block" | "crnet" | "reversible"),
    keeping the lanes of every `every`-th layer (crnet, reversible) and, reversible with keep_z=False, no Z.
    rtol: the round-off guard's budget (plan.stored_lanes); beta_drift: how far an optimizer step may move a beta
    (plan.adamw_drift), the margin of the CUDA plan, made from the previous step's betas so as not to wait on the GPU.
    compile=True compiles Algorithm 1's bodies (module docstring); the caller still compiles the model.
    Changes model in place and returns it: call it before compiling or sharding. Applying again replaces the mode."""
    if mode == "auto":
        raise ValueError("recompute='auto' is train.py's: resolve it with plan.auto_recompute first")
    check(mode, model.cfg.param, every, keep_z, rtol, model.cfg.moe_lane)
    inverts = mode in ("crnet", "reversible")
    rc = Recompute(model, mode, every, keep_z, rtol, beta_drift, compile and inverts)  # (its planner checks beta_drift)
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # back to the class's plain forward
        for proj in block.projections():
            proj.lane_dtype = torch.float32 if inverts else None  # Projection.lane_add: what the inversion needs
    model.recompute = (mode, every, keep_z, rtol, beta_drift)  # apply(model, *model.recompute) applies it again
    if mode != "none":
        for block in model.blocks:
            # module-level functions in a partial: copy.deepcopy copies rc and block with the model
            block.forward = functools.partial(eager_block_forward if inverts else Recompute.block_forward,
                                              rc, block, block.forward)
    return model
