"""
Hugging Face GPT-2, LLaMA-family, Qwen-3 and Qwen-3-MoE checkpoints loaded into our full-rank Transformer (param="full"), exactly:
the same logits as transformers' own model, to float round-off (tests/test_hf.py compares them).

    from tools.hf import load_pretrained
    model = load_pretrained("path/to/dir")            # config.json + model.safetensors (or shards, or pytorch_model.bin)
    model = load_pretrained("openai-community/gpt2")  # a hub name, where the network allows (needs huggingface_hub)
    python tools/hf.py --out_dir=out --export=out_hf          # a full-rank train.py run as a Hugging Face directory

Supported: model_type "gpt2", the LLaMA family ("llama", "mistral"), "qwen3" (LLaMA with QK-norm) and "qwen3_moe"
(experts in every layer, as the released models): grouped-query attention, any head_dim, tied or untied
embeddings, any rope_theta, plain RoPE only (rope_scaling must be None).
transformers is not needed: config.json is plain JSON and safetensors files are read by the short reader below
(8-byte little-endian header length, a JSON header of name -> dtype, shape, byte offsets, then the raw tensors).

Layouts. HF GPT-2's Conv1D weights are (in, out), our Y = X W convention: c_attn -> qkv (columns q | k | v), attn
c_proj -> o, c_fc -> up, mlp c_proj -> down, as they are. HF LLaMA's nn.Linear weights are (out, in), so they
are transposed: q/k/v -> the columns of qkv, gate/up -> the columns of up (gate first, as SwiGLU reads them),
o, down; Qwen-3's q_norm, k_norm (one head_dim-wide weight each) as they are; Qwen-3-MoE's router mlp.gate
(E, h) transposed into MoE.weight, each expert's gate/up/down as LLaMA's MLP (transformers >= 5's fused
gate_up_proj / down_proj are cut into those first: unfuse). HF LLaMA's RoPE rotates the two halves of each
head, the layout model.apply_rope uses.

block_size: GPT-2's n_positions (its wpe table). LLaMA: max_position_embeddings capped at MAX_BLOCK (LLaMA 3.1
says 131072; the RoPE tables and the longest forward are what block_size sizes), or the block_size argument.
Mistral's sliding window (Qwen-3's, where use_sliding_window) is exact while block_size <= sliding_window, so
block_size is capped there as well.
"""
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python tools/x.py: the core modules are one folder up

import torch

import checkpoint
import configurator
from model import ModelConfig, Transformer
from prepare_data import gguf_value, note_unfinished, open_gguf

# ----------------------------------------------------------------------------- config
# python tools/hf.py exports a run (the rest of this file is the library above)
out_dir = "out"             # the train.py run whose latest checkpoint is exported
export = ""                 # write it here as a Hugging Face directory (config.json + model.safetensors); must not exist
# -----------------------------------------------------------------------------

MAX_BLOCK = 4096  # default cap on a LLaMA model's block_size (see the docstring)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")  # in order of preference
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$|^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # buffers


# ----------------------------------------------------------------------------- reading weights
def lfs_pointer(path):
    """A Git LFS pointer file where the weights should be (a clone made without git-lfs): the advice, else ""."""
    with open(path, "rb") as f:
        head = f.read(64)
    return "; it is a Git LFS pointer, not the weights: run `git lfs pull` there" if head.startswith(b"version https://git-lfs") else ""


def header_entry(info):
    """Why a safetensors header entry is not {dtype: str, shape: [int >= 0], data_offsets: [begin, end]}, or ""."""
    if not isinstance(info, dict):
        return "not an object"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    nat = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not (isinstance(shape, list) and all(map(nat, shape))):
        return f"shape={shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(nat, offsets)) and offsets[0] <= offsets[1]):
        return f"data_offsets={offsets!r} is not [begin, end]"
    return "" if isinstance(info.get("dtype"), str) else f"dtype={info.get('dtype')!r} is not a name"


def read_safetensors(path):
    """Yield (name, tensor) for every tensor of a .safetensors file, one at a time, in file order."""
    if sys.byteorder != "little":
        raise NotImplementedError("the safetensors reader assumes a little-endian machine")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length){lfs_pointer(path)}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        for name, info in header.items():
            if why := header_entry(info):
                raise ValueError(f"{path}: tensor {name}: {why}: the header is corrupt")
        start = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
            begin, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            if end - begin != numel * dtype.itemsize or start + end > size:
                raise ValueError(f"{path}: tensor {name}: byte range {begin}-{end} does not fit its shape "
                                 f"{info['shape']} or the file: truncated or corrupt")
            if numel == 0:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            buf = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buf)
            yield name, torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def read_tensors(path):
    if path.suffix == ".safetensors":
        yield from read_safetensors(path)
    else:  # pytorch_model.bin: a pickled state dict; weights_only refuses anything but tensors
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the zip reader, pickle, weights_only's refusal: all mean not a state dict of tensors
            raise ValueError(f"{path}: not a PyTorch state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:100] if str(e) else 'empty'}){lfs_pointer(path)}") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
        yield from state.items()


def read_json(path):
    """The JSON object in path; an error that names the file where it is not one."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, not an object")
    return value


def weight_files(d):
    """The weight files of a model directory: one file, or the shards its index names."""
    for name in WEIGHT_FILES:
        p = d / name
        if not p.is_file():
            continue
        if not name.endswith(".index.json"):
            return [p]
        index = read_json(p).get("weight_map")
        if not isinstance(index, dict):
            raise ValueError(f"{p}: no weight_map object (tensor name -> shard file)")
        shards = sorted(set(index.values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{p} names shards that are not in {d}: {', '.join(missing)}")
        return [d / s for s in shards]
    raise FileNotFoundError(f"{d}: no weights: expected one of {', '.join(WEIGHT_FILES)}")


# ----------------------------------------------------------------------------- config.json -> ModelConfig
class KeyProblem(ValueError):
    """A config.json value this loader cannot map; model_config prefixes the file it came from."""


def unsupported(key, value, why):
    return KeyProblem(f"{key}={value!r} is not supported: {why}")


# the config.json values each model type's mapper reads, and what each must be (only those: a key another
# architecture gives another meaning is not ours to judge). count: num_experts 0 is transformers' dense MLPs,
# which the Qwen-3-MoE check refuses, saying why
RULES = {"size": "an integer >= 1", "size?": "an integer >= 1 or null", "count": "an integer >= 0",
         "positive": "a number > 0", "object": "an object or null"}
GPT2_KEYS = dict(n_embd="size", n_layer="size", n_head="size", n_positions="size", vocab_size="size", n_inner="size?",
                 layer_norm_epsilon="positive")
LLAMA_KEYS = dict(hidden_size="size", num_attention_heads="size", num_hidden_layers="size", intermediate_size="size",
                  vocab_size="size", max_position_embeddings="size", num_key_value_heads="size?", head_dim="size?",
                  rms_norm_eps="positive", rope_theta="positive", rope_parameters="object", rope_scaling="object")
MOE_KEYS = dict(moe_intermediate_size="size", num_experts="count", num_local_experts="count", num_experts_per_tok="size")


def obeys(value, rule):
    integer = isinstance(value, int) and not isinstance(value, bool)
    return {"size": integer and value >= 1, "size?": value is None or integer and value >= 1, "count": integer and value >= 0,
            "positive": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            "object": value is None or isinstance(value, dict)}[rule]


def check_values(hf, keys):
    """hf's values of `keys` ({config.json key: rule}), named as config.json names them, before any is used."""
    for key, rule in keys.items():
        if key in hf and not obeys(hf[key], rule):
            value = repr(hf[key]) if len(repr(hf[key])) <= 40 else repr(hf[key])[:37] + "..."
            raise KeyProblem(f"{key}={value}: must be {RULES[rule]}")
        if rule == "object" and hf.get(key):
            check_values(hf[key], {"rope_theta": "positive"})


def gpt2_config(hf):
    h = hf["n_embd"]
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    act = hf.get("activation_function", "gelu_new")
    if act not in gelu:
        raise unsupported("activation_function", act, f"expected one of {', '.join(gelu)}")
    if hf.get("n_inner") not in (None, 4 * h):
        raise unsupported("n_inner", hf["n_inner"], f"our GPT-2 MLP is 4 * n_embd = {4 * h} wide")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise unsupported(key, hf[key], f"only {want} is")
    return ModelConfig(arch="gpt2", param="full", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=h,
                       intermediate_size=4 * h, vocab_size=hf["vocab_size"], block_size=hf["n_positions"], bias=True,
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), gelu_approx=gelu[act],
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def llama_config(hf, block_size=None):
    """LLaMA, Mistral, Qwen-3 (arch "qwen3": QK-norm, whose head_dim is often not hidden_size / heads) and Qwen-3-MoE
    (a key it lacks takes transformers' Qwen3MoeConfig default, as transformers would)."""
    model_type = hf.get("model_type")
    qwen3, moe = model_type in ("qwen3", "qwen3_moe"), model_type == "qwen3_moe"
    use_window = hf.get("use_sliding_window", not qwen3)  # Qwen-3: off unless asked
    check_values(hf, {**LLAMA_KEYS, **({"sliding_window": "size?"} if use_window else {}), **(MOE_KEYS if moe else {})})
    h, nh = hf["hidden_size"], hf["num_attention_heads"]
    n_expert = hf.get("num_experts", hf.get("num_local_experts", 128))  # transformers >= 5 writes the second
    for key, ok in (("mlp_only_layers", not hf.get("mlp_only_layers")), ("num_experts", n_expert),
                    ("decoder_sparse_step", hf.get("decoder_sparse_step", 1) == 1)):
        if moe and not ok:
            raise unsupported(key, hf.get(key, n_expert), "Qwen-3-MoE here has experts in every layer, as the released "
                                                          "models")
    if not hf.get("head_dim") and h % nh:
        raise unsupported("head_dim", hf.get("head_dim"), f"is needed: hidden_size / num_attention_heads = {h}/{nh}")
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", hf["hidden_act"], "LLaMA's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise unsupported(key, hf[key], "the LLaMA architecture here has no biases")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5; before: rope_theta and rope_scaling at the top
    for key, value in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", rope)):
        kind = (value or {}).get("rope_type", (value or {}).get("type", "default"))
        if kind != "default":
            raise unsupported(key, value, "only plain RoPE (rope_scaling None / rope_type 'default') is")
    limit = hf.get("max_position_embeddings", MAX_BLOCK)
    window = hf.get("sliding_window") if use_window else None
    if window is not None:
        limit = min(limit, window)  # within the window, sliding-window attention is causal attention
    if block_size is not None and not 1 <= block_size <= limit:
        raise ValueError(f"block_size={block_size}: must be in [1, {limit}] (max_position_embeddings"
                         f"{' / sliding_window' if window is not None else ''})")
    experts = dict(n_expert=n_expert, expert_top_k=hf.get("num_experts_per_tok", 8), router_aux_coef=hf.get(
        "router_aux_loss_coef", 0.001), norm_topk=hf.get("norm_topk_prob", False)) if moe else {}
    kw = dict(arch=model_type if qwen3 else "llama", param="full", n_layer=hf["num_hidden_layers"], n_head=nh,
              n_embd=h, head_dim=hf.get("head_dim") or 0, **experts,
              intermediate_size=hf.get("moe_intermediate_size", 768) if moe else hf["intermediate_size"],
              vocab_size=hf["vocab_size"], block_size=block_size or min(limit, MAX_BLOCK),
              n_kv_head=hf.get("num_key_value_heads") or nh,
              rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
              norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False))
    try:
        return ModelConfig(**kw)
    except ValueError as e:  # ModelConfig's check, named as config.json names what it checked
        raise KeyProblem(re.sub(rf"\b({'|'.join(HF_NAMES)})=", lambda m: HF_NAMES[m[1]] + "=", str(e))) from None


HF_NAMES = {"n_kv_head": "num_key_value_heads", "n_head": "num_attention_heads", "n_embd": "hidden_size",
            "n_layer": "num_hidden_layers", "n_expert": "num_experts", "expert_top_k": "num_experts_per_tok"}


def model_config(hf, block_size=None, source="config.json"):
    """Our ModelConfig for an HF config.json dict; source: the file it came from, which errors about its keys name."""
    kind = hf.get("model_type")
    try:
        if kind == "gpt2":
            check_values(hf, GPT2_KEYS)
            if block_size not in (None, hf["n_positions"]):
                raise ValueError(f"block_size={block_size}: a GPT-2 model's is its n_positions={hf['n_positions']}")
            return gpt2_config(hf)
        if kind in ("llama", "mistral", "qwen3", "qwen3_moe"):
            return llama_config(hf, block_size)
        raise KeyProblem(f"model_type={kind!r} (architectures {hf.get('architectures')}) is not supported: tools/hf.py "
                         f"loads 'gpt2', the LLaMA family ('llama', 'mistral'), 'qwen3' and 'qwen3_moe'")
    except KeyError as e:  # a key that every config.json of its model_type has (the configs index nothing else)
        raise ValueError(f"{source}: no {e.args[0]!r}, which a {kind!r} model needs") from None
    except KeyProblem as e:
        raise ValueError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- HF names -> our parameters
def tensor_map(cfg):
    """{HF name (without its transformer. / model. prefix): (our parameter, where in it, transpose?)}. 'where' is
    None (the whole tensor), a column range (a, b) of a weight, or "flat" for a projection bias (n, h_out) that HF
    stores as one n * h_out vector."""
    m = {}
    ff, q, kv = cfg.ff_dim, cfg.q_dim, cfg.kv_dim
    if cfg.arch == "gpt2":
        m.update({"wte.weight": ("wte.weight", None, False), "wpe.weight": ("wpe.weight", None, False),
                  "ln_f.weight": ("norm_f.weight", None, False), "ln_f.bias": ("norm_f.bias", None, False)})
        for l in range(cfg.n_layer):
            for theirs, ours in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp"), ("attn.c_attn", "qkv"),
                                 ("attn.c_proj", "o"), ("mlp.c_fc", "up"), ("mlp.c_proj", "down")):
                norm = ours.startswith("norm")
                m[f"h.{l}.{theirs}.weight"] = (f"blocks.{l}.{ours}.weight", None, False)
                m[f"h.{l}.{theirs}.bias"] = (f"blocks.{l}.{ours}.bias", None if norm else "flat", False)
    else:
        m.update({"embed_tokens.weight": ("wte.weight", None, False), "norm.weight": ("norm_f.weight", None, False)})
        for l in range(cfg.n_layer):
            b, a = f"blocks.{l}", f"layers.{l}.self_attn"
            m.update({
                f"layers.{l}.input_layernorm.weight": (f"{b}.norm_attn.weight", None, False),
                f"layers.{l}.post_attention_layernorm.weight": (f"{b}.norm_mlp.weight", None, False),
                f"{a}.q_proj.weight": (f"{b}.qkv.weight", (0, q), True),
                f"{a}.k_proj.weight": (f"{b}.qkv.weight", (q, q + kv), True),
                f"{a}.v_proj.weight": (f"{b}.qkv.weight", (q + kv, q + 2 * kv), True),
                f"{a}.o_proj.weight": (f"{b}.o.weight", None, True),
            })
            mlps = [(f"layers.{l}.mlp", b)] if not cfg.n_expert else \
                [(f"layers.{l}.mlp.experts.{e}", f"{b}.moe.experts.{e}") for e in range(cfg.n_expert)]
            for theirs, ours in mlps:  # Qwen-3-MoE: the hub's names, one SwiGLU per expert (fused ones: unfuse)
                m.update({f"{theirs}.gate_proj.weight": (f"{ours}.up.weight", (0, ff), True),
                          f"{theirs}.up_proj.weight": (f"{ours}.up.weight", (ff, 2 * ff), True),
                          f"{theirs}.down_proj.weight": (f"{ours}.down.weight", None, True)})
            if cfg.n_expert:
                m[f"layers.{l}.mlp.gate.weight"] = (f"{b}.moe.weight", None, True)  # the router, (E, h) in HF
            if cfg.qwen3:
                m.update({f"{a}.{n}.weight": (f"{b}.{n}.weight", None, False) for n in ("q_norm", "k_norm")})
    if not cfg.tied:
        m["lm_head.weight"] = ("lm_head.weight", None, False)  # nn.Linear's (vocab, h), as ours
    return m


def strip_prefix(name, arch):
    prefix = "transformer." if arch == "gpt2" else "model."
    return name[len(prefix):] if name.startswith(prefix) else name


def short_list(names, n=8):
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


FUSED = re.compile(r"^(.*layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def unfuse(tensors):
    """transformers >= 5 saves a Qwen-3-MoE layer's experts fused, gate_up_proj (E, 2 ff, h) and down_proj
    (E, h, ff): as the hub's per-expert tensors (nn.Linear's (out, in)), which tensor_map names."""
    for source, name, t in tensors:
        fused = FUSED.match(name)
        if not fused:
            yield source, name, t
            continue
        for e, w in enumerate(t):
            if fused[2] == "down_proj":
                yield source, f"{fused[1]}.{e}.down_proj.weight", w
            else:
                gate, up = w.chunk(2)
                yield from ((source, f"{fused[1]}.{e}.gate_proj.weight", gate), (source, f"{fused[1]}.{e}.up_proj.weight", up))


@torch.no_grad()
def fill(model, tensors, config="config.json"):
    """Copy every (source, HF name, tensor) into its place; every HF tensor must have one, every parameter
    element must be written exactly once."""
    cfg = model.cfg
    where = tensor_map(cfg)
    params = dict(model.named_parameters())  # a tied tensor once
    written = dict.fromkeys(params, 0)
    seen, unexpected, tied_head = set(), [], None
    for source, name, t in unfuse(tensors):
        key = strip_prefix(name, cfg.arch)
        if IGNORED.match(key):
            continue
        if key == "lm_head.weight" and cfg.tied:
            tied_head = (name, t)  # some checkpoints store the tied head too: it must be the embedding
            continue
        if key not in where or key in seen:
            unexpected.append(name if key not in seen else f"{name} (twice)")
            continue
        target, span, transpose = where[key]
        p = params[target]
        dest = p.view(-1) if span == "flat" else p[:, span[0]:span[1]] if span else p
        src = t.T if transpose else t
        if src.shape != dest.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, but {target}"
                             f"{'' if span in (None, 'flat') else f'[:, {span[0]}:{span[1]}]'} needs "
                             f"{tuple(dest.T.shape if transpose else dest.shape)}: {config} does not match the weights")
        dest.copy_(src)
        written[target] += dest.numel()
        seen.add(key)
    if unexpected:
        raise ValueError(f"unexpected tensors, with no place in our {cfg.arch} model: {short_list(unexpected)}")
    missing = set(where) - seen
    if missing:
        raise ValueError(f"missing tensors: {short_list(missing)} (the checkpoint's names lack their "
                         f"{'transformer.' if cfg.arch == 'gpt2' else 'model.'} prefix here)")
    unfilled = [n for n, p in params.items() if written[n] != p.numel()]
    assert not unfilled, f"parameters not filled exactly once: {unfilled}"  # a tensor_map bug, not the checkpoint's
    if tied_head is not None and not torch.equal(tied_head[1].to(model.wte.weight.dtype), model.wte.weight):
        raise ValueError(f"{tied_head[0]} differs from the token embedding, but tie_word_embeddings is true")


# ----------------------------------------------------------------------------- GGUF files (llama.cpp's format)
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # what gguf dequantizes here (to float32)
GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}


def gguf_config(reader, path, block_size=None):
    """The HF config.json dict a LLaMA-architecture GGUF file's metadata describes (then llama_config checks it)."""
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported: tools/hf.py reads LLaMA-architecture "
                         f"GGUF files ('llama')")
    get = lambda key, default=None: gguf_value(reader, f"llama.{key}", default)
    h, nh = get("embedding_length"), get("attention.head_count")
    if None in (h, nh, get("block_count"), get("feed_forward_length")):
        raise ValueError(f"{path}: metadata lacks llama.embedding_length, block_count, feed_forward_length or "
                         f"attention.head_count: not a complete LLaMA GGUF file")
    for key, want in (("rope.dimension_count", h // nh), ("attention.key_length", h // nh),
                      ("attention.value_length", h // nh)):
        if get(key, want) != want:
            raise ValueError(f"{path}: llama.{key}={get(key)} is not supported: must be embedding_length / "
                             f"head_count = {want}")
    if get("expert_count", 0):
        raise ValueError(f"{path}: llama.expert_count={get('expert_count')}: mixture-of-experts models are not supported")
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type={get('rope.scaling.type')!r} is not supported: only plain RoPE is")
    vocab = get("vocab_size") or len(gguf_value(reader, "tokenizer.ggml.tokens", []))
    return {"model_type": "llama", "hidden_size": h, "num_attention_heads": nh, "num_hidden_layers": get("block_count"),
            "intermediate_size": get("feed_forward_length"), "num_key_value_heads": get("attention.head_count_kv", nh),
            "rope_theta": float(get("rope.freq_base", 10000.0)), "max_position_embeddings": get("context_length", MAX_BLOCK),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)), "vocab_size": vocab,
            "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}


def gguf_dequantize(t):
    """A GGUF tensor as float32: a matrix as (rows, columns), nn.Linear's (out, in) layout."""
    import gguf
    return gguf.quants.dequantize(t.data, t.tensor_type).astype("float32", copy=False)


def gguf_tensors(reader, path, hf, values=gguf_dequantize):
    """(source, HF name, float32 tensor) for every tensor of a GGUF file; values(t) gives a tensor's float32
    numbers (rows, columns). llama.cpp's converter permutes the rows of q and k within each head (RoPE on
    interleaved pairs, where HF rotates the two halves of a head): undone here."""
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which is not supported: "
                             f"{', '.join(GGUF_TYPES)} are")
        parts = t.name.split(".")
        if t.name in GGUF_TOP:
            name = GGUF_TOP[t.name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_NAMES:
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            name = t.name  # fill() names it as unexpected
        w = torch.from_numpy(values(t).copy())  # (the file is memory-mapped read-only)
        heads = {"attn_q": hf["num_attention_heads"], "attn_k": hf["num_key_value_heads"]}.get(parts[2] if len(parts) == 4 else "")
        if heads:  # llama.cpp: reshape(heads, 2, d/2, in).swapaxes(1, 2); the inverse:
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        yield path.name, name, w


def load_gguf(path, dtype=torch.float32, block_size=None, values=gguf_dequantize):
    """Our full-rank Transformer with the weights of a LLaMA-architecture .gguf file, dequantized to float32."""
    path = Path(path)
    reader = open_gguf(path)
    hf = gguf_config(reader, path)
    cfg = model_config(hf, block_size, path)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.reset_buffers()
    fill(model, gguf_tensors(reader, path, hf, values), config=f"{path.name}'s metadata")
    return model.eval()


# ----------------------------------------------------------------------------- entry point
def resolve(name_or_dir):
    """A local model directory, or one downloaded from the hub."""
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p}: expected a directory holding config.json and model.safetensors")
    name = str(name_or_dir)
    if not REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name}: no such directory; to fetch it from the Hugging Face hub install "
                                f"huggingface_hub, or pass a directory holding config.json and model.safetensors") from None
    try:
        d = Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
        if not any(d.glob("*.safetensors")):
            d = Path(snapshot_download(name, allow_patterns=["config.json", "pytorch_model*.bin*"]))
    except Exception as e:  # offline, unknown name, gated model, ...: say which, and what to do instead (one line)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else "no message"
        raise FileNotFoundError(f"{name}: no such directory, and the Hugging Face hub could not provide it "
                      f"({type(e).__name__}: {why}); download it where the hub is reachable and pass the directory "
                      f"holding config.json and model.safetensors") from e
    return d


def load_pretrained(name_or_dir, dtype=torch.float32, block_size=None):
    """Our full-rank Transformer, in eval mode on the CPU, with the weights of an HF GPT-2, LLaMA-family or Qwen-3 model.
    name_or_dir: a local directory (config.json + weights) or a hub name. dtype: of the parameters (the RoPE
    tables stay float32). block_size: LLaMA family only; default min(max_position_embeddings, MAX_BLOCK).
    A .gguf file (llama.cpp's format, LLaMA architecture) is read by load_gguf."""
    if str(name_or_dir).endswith(".gguf"):
        return load_gguf(name_or_dir, dtype, block_size)
    d = resolve(name_or_dir)
    config = d / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{d}: no config.json: not a Hugging Face model directory")
    cfg = model_config(read_json(config), block_size, config)
    files = weight_files(d)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device="cpu")  # no random init: every parameter is written below
    model.tie_weights()
    model.reset_buffers()
    fill(model, ((p.name, name, t) for p in files for name, t in read_tensors(p)))
    return model.eval()


# ----------------------------------------------------------------------------- our checkpoint -> HF directory
def hf_config(cfg, eot):
    """config.json for transformers' GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM or Qwen3MoeForCausalLM with
    our ModelConfig's shape. eot: the data's end-of-text id, which prepare_data.py puts after every document, so it
    is both the token that ends one (eos: where generate() stops) and the one a new one follows (bos). Left out,
    generate() would not stop at a document's end (transformers leaves them unset)."""
    ids = {"bos_token_id": eot, "eos_token_id": eot}
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", **ids, "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.norm_eps_value, "n_inner": None,
                "activation_function": "gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
                "tie_word_embeddings": cfg.tied, "torch_dtype": "float32"}
    experts = {"num_experts": cfg.n_expert, "num_experts_per_tok": cfg.expert_top_k, "norm_topk_prob": cfg.norm_topk,
               "moe_intermediate_size": cfg.ff_dim, "router_aux_loss_coef": cfg.router_aux_coef, "decoder_sparse_step": 1,
               "mlp_only_layers": []} if cfg.n_expert else {}
    return {"model_type": cfg.arch, **ids, **experts, "architectures": [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                                                  "qwen3_moe": "Qwen3MoeForCausalLM"}[cfg.arch]],
            "hidden_size": cfg.n_embd, "use_sliding_window": False,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.hd, "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps_value, "vocab_size": cfg.vocab_size, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tied, "torch_dtype": "float32"}


def hf_tensors(model):
    """(HF name, tensor) for every tensor transformers expects: tensor_map read backwards. A GPT-2 model trained
    without biases gets zero biases, which HF GPT-2 always has."""
    cfg, params = model.cfg, dict(model.named_parameters())
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    for name, (target, span, transpose) in tensor_map(cfg).items():
        if target in params:
            p = params[target].detach()
            t = p.reshape(-1) if span == "flat" else p[:, span[0]:span[1]] if span else p
        else:  # a bias of a bias-free GPT-2: its shape from the weight beside it
            w = params[target.rsplit(".", 1)[0] + ".weight"]
            t = torch.zeros(w.shape[-1] if w.dim() == 2 else w.shape[0])
        yield ("" if name == "lm_head.weight" else prefix) + name, (t.T if transpose else t).float().contiguous()


def write_safetensors(path, tensors):
    """The format read_safetensors reads: 8-byte little-endian header length, a JSON header, the raw tensors."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors:
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the header is padded to 8 bytes, as the safetensors writer pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for data in blobs:
            f.write(data)


def export(run_dir, dest):
    """Write a full-rank run's latest checkpoint to dest as a Hugging Face directory, built beside it and renamed
    into place. CR-Net and the other low-rank parameterizations are refused: no standard architecture has them."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"export={dest}: exists; choose a new directory")
    configurator.check_folder("export", str(dest))  # (a path under a file: before the checkpoint is read)
    ckpt = checkpoint.load_train_state(run_dir)
    cfg = ModelConfig(**ckpt["model_config"])
    if cfg.param != "full":
        raise ValueError(f"{ckpt['path']} holds a param={cfg.param!r} model: no standard Hugging Face architecture "
                         f"has {'the lanes of Eq. 6' if cfg.param == 'crnet' else 'low-rank factors'}, so only "
                         f"param='full' runs export")
    if cfg.arch == "gpt2" and (cfg.kv_heads != cfg.n_head or cfg.hd * cfg.n_head != cfg.n_embd):
        raise ValueError(f"{ckpt['path']} holds a GPT-2 with n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim}: Hugging "
                         f"Face GPT-2 has neither grouped-query attention nor a head_dim of its own, so it cannot export")
    model = Transformer(cfg)
    checkpoint.load_weights(ckpt, model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    note_unfinished(dest, f"export to {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become dest's: a directory others could not load
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, ckpt["data_meta"]["eot_token"]), indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", hf_tensors(model))
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def main(argv):
    c, _ = configurator.load(argv, "tools/hf.py", doc=__doc__)
    if not c["export"]:
        raise configurator.ConfigError("export", "", "name the directory to write (python tools/hf.py --out_dir=RUN --export=DIR)")
    ckpt = export(c["out_dir"], c["export"])
    print(f"wrote {c['export']}: {ckpt['path']} (iteration {ckpt['iter']}) as a Hugging Face {ckpt['model_config']['arch']} "
          f"model; load it with transformers' AutoModelForCausalLM.from_pretrained({c['export']!r})")


if __name__ == "__main__":
    configurator.main_guard(main)
