"""tools/hf.py against transformers itself: small random HF models saved with save_pretrained, loaded into our
Transformer, the same logits; plus the loader's errors and the model fields it relies on."""
import json
import re
import struct

import pytest
import torch
import transformers  # a test dependency (requirements-test.txt); tools/hf.py itself does not use it
from safetensors.torch import load_file, save_file  # installed with transformers

import configurator
from tools import hf
from model import ModelConfig, Transformer

TOL = 1e-5  # max |ours - theirs| relative to max |theirs|, float32


@torch.no_grad()
def randomize(model, seed):
    """Every parameter random (HF inits norms to 1 and biases to 0, which would hide a misplaced one)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def gpt2(**kw):
    c = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=24, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    return randomize(transformers.GPT2LMHeadModel(c), 0)


def llama(**kw):
    c = transformers.LlamaConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=24, bos_token_id=0,
                                           eos_token_id=0), **kw})
    return randomize(transformers.LlamaForCausalLM(c), 1)


def qwen3(**kw):
    c = transformers.Qwen3Config(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=24, bos_token_id=0,
                                           eos_token_id=0), **kw})
    return randomize(transformers.Qwen3ForCausalLM(c), 3)


CASES = {
    "gpt2": lambda: gpt2(layer_norm_epsilon=1e-3),  # an eps far from the default: a dropped one would show
    "llama_gqa_tied_theta": lambda: llama(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                                          rms_norm_eps=1e-3),
    "llama_mha_untied": lambda: llama(num_key_value_heads=4, tie_word_embeddings=False),
    # Qwen-3: QK-norm (random weights, so a norm applied to the wrong head or skipped shows), head_dim 16 != 32 / 4
    "qwen3_gqa_head_dim_tied": lambda: qwen3(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                             rms_norm_eps=1e-3),
    "qwen3_mha_untied": lambda: qwen3(num_key_value_heads=4, head_dim=8, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(HF model, its save_pretrained directory)."""
    model = CASES[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return model, d


def assert_same_logits(theirs_model, ours_model, vocab, T, seed=2):
    idx = torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = theirs_model(idx).logits
        ours, _ = ours_model(idx)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= TOL, err


def test_logits_match_transformers(saved):
    theirs, d = saved
    assert (d / "model.safetensors").is_file()
    ours = hf.load_pretrained(d)
    c = theirs.config
    assert not ours.training and ours.cfg.param == "full" and ours.cfg.vocab_size == c.vocab_size
    assert ours.cfg.tied == c.tie_word_embeddings and (ours.lm_head.weight is ours.wte.weight) == c.tie_word_embeddings
    if c.model_type in ("llama", "qwen3"):
        assert ours.cfg.kv_heads == c.num_key_value_heads and ours.cfg.rope_theta == c.rope_parameters["rope_theta"]
        assert ours.cfg.arch == c.model_type and ours.cfg.hd == c.head_dim
    else:
        assert ours.cfg.gelu_approx == "tanh" and ours.cfg.norm_eps == c.layer_norm_epsilon
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert_same_logits(theirs, ours, c.vocab_size, ours.cfg.block_size)


def test_sharded_and_pytorch_bin_checkpoints(saved, tmp_path):
    theirs, d = saved
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    assert_same_logits(theirs, hf.load_pretrained(sharded), theirs.config.vocab_size, 8)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((d / "config.json").read_text())
    torch.save(load_file(d / "model.safetensors"), binary / "pytorch_model.bin")
    assert_same_logits(theirs, hf.load_pretrained(binary), theirs.config.vocab_size, 8)


def test_our_safetensors_reader_matches_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, dtype=torch.float64).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.randn(2, 2).half(),
               "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours = dict(hf.read_safetensors(tmp_path / "t.safetensors"))
    want = load_file(tmp_path / "t.safetensors")
    assert ours.keys() == want.keys()
    for k in want:
        assert ours[k].dtype == want[k].dtype and torch.equal(ours[k], want[k]), k
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a safetensors file"):
        list(hf.read_safetensors(tmp_path / "bad.safetensors"))
    head = lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 16
    for header, match in [(b"[1, 2]", r"its header is a JSON list, not an object"),
                          (b'{"w": {"dtype": "F32", "shape": [2]}}', r"tensor w: data_offsets=None is not \[begin, end\]"),
                          (b'{"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', "tensor w: shape='2' is not")]:
        (tmp_path / "h.safetensors").write_bytes(head(header))
        with pytest.raises(ValueError, match=match):
            list(hf.read_safetensors(tmp_path / "h.safetensors"))
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n"
    for name in ("model.safetensors", "pytorch_model.bin"):  # a clone made without git-lfs
        (tmp_path / name).write_bytes(lfs)
        with pytest.raises(ValueError, match=f"{name}: not a .*it is a Git LFS pointer, not the weights: run `git lfs pull`"):
            list(hf.read_tensors(tmp_path / name))
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage" * 30)
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a PyTorch state dict \(\w+Error: "):
        list(hf.read_tensors(tmp_path / "pytorch_model.bin"))
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: holds a list, not a state dict of tensors"):
        list(hf.read_tensors(tmp_path / "pytorch_model.bin"))


def test_longer_llama_context_is_capped_and_overridable(tmp_path):
    theirs = llama(max_position_embeddings=100_000, num_key_value_heads=1)
    theirs.save_pretrained(tmp_path)
    assert hf.load_pretrained(tmp_path).cfg.block_size == hf.MAX_BLOCK
    ours = hf.load_pretrained(tmp_path, block_size=40)
    assert ours.cfg.block_size == 40 and ours.rope_cos.shape == (40, 4)
    assert_same_logits(theirs, ours, 96, 40)
    with pytest.raises(ValueError, match=r"^block_size=200000: must be in \[1, 100000\]"):
        hf.load_pretrained(tmp_path, block_size=200_000)


def test_bfloat16_load(saved):
    theirs, d = saved
    ours = hf.load_pretrained(d, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.equal(ours.wte.weight, theirs.get_input_embeddings().weight.to(torch.bfloat16))


# ---------------------------------------------------------------- errors
def copy_model(src, dst, config=None, drop=(), add=None):
    """A copy of an HF directory, with config.json edited and tensors removed or added."""
    dst.mkdir()
    c = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**c, **(config or {})}))
    t = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file({**t, **(add or {})}, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_llama")
    llama(num_key_value_heads=2).save_pretrained(d)
    return d


def test_missing_and_non_hf_directories(small_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hf.load_pretrained(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="expected a directory"):
        hf.load_pretrained(small_llama / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json: not a Hugging Face model directory"):
        hf.load_pretrained(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((small_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights: expected one of model.safetensors.index.json"):
        hf.load_pretrained(tmp_path / "noweights")


def test_malformed_config_and_index_files_are_named(small_llama, tmp_path):
    d = copy_model(small_llama, tmp_path / "m")
    for content, why in [(b'{"model_type": "llama",', r"not valid JSON \(Expecting property name"),
                         (bytes(range(128, 256)), r"not valid JSON \('utf-8' codec can't decode"),
                         (b"[1, 2]", "a JSON list, not an object")]:
        (d / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"^{d / 'config.json'}: {why}"):
            hf.load_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(d / 'config.json'))}: no 'num_attention_heads', which a 'llama' "
                                         f"model needs$"):
        hf.load_pretrained(d)
    (d / "config.json").write_text((small_llama / "config.json").read_text())
    (d / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not valid JSON \(Expecting property name"):
        hf.load_pretrained(d)


def test_hub_names_fail_clearly_when_the_hub_is_unreachable(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"^some-org/some-model: no such directory, and the Hugging Face hub "
                                                r"could not provide it \(ConnectionError: no network\); download it"):
        hf.load_pretrained("some-org/some-model")  # FileNotFoundError: scripts print it as one error: line


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "qwen3_moe"])
def test_a_full_rank_run_exports_to_transformers_with_equal_logits(arch, tiny_data, tmp_path, capsys):
    """python tools/hf.py --out_dir=RUN --export=DIR writes config.json + model.safetensors that transformers'
    AutoModelForCausalLM loads with our logits (gpt2: tied, biases; llama: untied; qwen3: GQA, a head_dim of
    its own; qwen3_moe: 3 experts, top 2); CR-Net runs are refused."""
    import train
    from conftest import TINY
    run = tmp_path / "run"
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={run}", "--param=full", f"--arch={arch}",
                       "--max_iters=3", "--eval_interval=3"] + (["--bias"] if arch == "gpt2" else [])
               + (["--n_kv_head=1", "--head_dim=12"] if arch.startswith("qwen3") else [])
               + (["--n_expert=3", "--expert_top_k=2", "--intermediate_size=24"] if arch == "qwen3_moe" else []))
    (tmp_path / ".hf.tmp-abc").mkdir()  # what an export killed mid-way leaves: named, not touched
    hf.main([f"--out_dir={run}", f"--export={tmp_path / 'hf'}"])
    assert (tmp_path / ".hf.tmp-abc").is_dir()
    assert f"note: {tmp_path / '.hf.tmp-abc'} is an unfinished export to {tmp_path / 'hf'}" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ours = Transformer(ModelConfig(**ckpt["model_config"]))
    ours.load_state_dict(ckpt["model"])
    assert_same_logits(theirs, ours.eval(), ours.cfg.vocab_size, ours.cfg.block_size)
    eot = ckpt["data_meta"]["eot_token"]  # 256 of the byte tokenizer: generate() stops there
    assert (theirs.config.bos_token_id, theirs.config.eos_token_id, theirs.generation_config.eos_token_id) == (eot,) * 3
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "made").mkdir()  # the export's permissions are a plain directory's, not its temporary one's 0700
    assert (tmp_path / "hf").stat().st_mode & 0o777 == (tmp_path / "made").stat().st_mode & 0o777
    with pytest.raises(FileExistsError, match="export=.*hf: exists"):
        hf.main([f"--out_dir={run}", f"--export={tmp_path / 'hf'}"])
    with pytest.raises(ValueError, match=r"^export='.*hf/config.json/sub': .*hf/config.json is a file, not a directory"):
        hf.main([f"--out_dir={run}", f"--export={tmp_path / 'hf' / 'config.json' / 'sub'}"])
    train.main(TINY + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'cr'}", "--max_iters=1", "--eval_interval=1"])
    with pytest.raises(ValueError, match="param='crnet' model: no standard Hugging Face architecture has the lanes"):
        hf.main([f"--out_dir={tmp_path / 'cr'}", f"--export={tmp_path / 'cr_hf'}"])
    assert not (tmp_path / "cr_hf").exists() and not list(tmp_path.glob(".cr_hf.tmp-*"))


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert"}, r"model_type='bert' .* is not supported: tools/hf.py loads 'gpt2', the LLaMA family .*, "
                             r"'qwen3' and 'qwen3_moe'"),
    ({"model_type": "gpt_neo", "intermediate_size": None}, r"model_type='gpt_neo' .* is not supported"),  # its null is its own
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"/config.json: rope_scaling=.*llama3.* only plain RoPE"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"/config.json: rope_parameters=.* only plain RoPE"),
    ({"attention_bias": True}, "/config.json: attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "/config.json: hidden_act='gelu' is not supported"),
    ({"num_key_value_heads": 3}, "/config.json: num_key_value_heads=3: must divide num_attention_heads=4"),
    ({"num_attention_heads": 0}, "/config.json: num_attention_heads=0: must be an integer >= 1$"),
    ({"max_position_embeddings": None}, "/config.json: max_position_embeddings=None: must be an integer >= 1$"),
    ({"head_dim": "8"}, "/config.json: head_dim='8': must be an integer >= 1 or null"),
    ({"rope_parameters": "x"}, "/config.json: rope_parameters='x': must be an object or null"),
    ({"rope_parameters": {"rope_theta": -1}}, "/config.json: rope_theta=-1: must be a number > 0"),
    ({"rms_norm_eps": "1e-6"}, "/config.json: rms_norm_eps='1e-6': must be a number > 0"),
    ({"vocab_size": 97}, r"^model.safetensors: model.embed_tokens.weight has shape \(96, 32\), but wte.weight needs "
                         r"\(97, 32\): config.json does not match the weights|^model.safetensors: lm_head.weight has"),
])
def test_unsupported_configs_are_named(small_llama, tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(copy_model(small_llama, tmp_path / "m", config))


def test_every_tensor_is_consumed_and_every_parameter_filled(small_llama, tmp_path):
    with pytest.raises(ValueError, match=r"^missing tensors: layers.1.mlp.up_proj.weight"):
        hf.load_pretrained(copy_model(small_llama, tmp_path / "a", drop={"model.layers.1.mlp.up_proj.weight"}))
    with pytest.raises(ValueError, match=r"^unexpected tensors, with no place in our llama model: model.layers.0.extra"):
        hf.load_pretrained(copy_model(small_llama, tmp_path / "b", add={"model.layers.0.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match="missing tensors: lm_head.weight"):  # untied, but no head stored
        hf.load_pretrained(copy_model(small_llama, tmp_path / "c", {"tie_word_embeddings": False}, drop={"lm_head.weight"}))
    wrong_head = {"lm_head.weight": torch.randn(96, 32)}
    with pytest.raises(ValueError, match="lm_head.weight differs from the token embedding, but tie_word_embeddings"):
        hf.load_pretrained(copy_model(small_llama, tmp_path / "d", {"tie_word_embeddings": True}, add=wrong_head))


def test_unsupported_gpt2_configs(tmp_path):
    d = tmp_path / "g"
    gpt2().save_pretrained(d)
    for key, value, match in (("activation_function", "relu", "expected one of gelu_new"),
                              ("n_inner", 64, r"our GPT-2 MLP is 4 \* n_embd = 128 wide"),
                              ("scale_attn_by_inverse_layer_idx", True, "only False is")):
        with pytest.raises(ValueError, match=f"/config.json: {key}={value!r} is not supported: {match}"):
            hf.load_pretrained(copy_model(d, tmp_path / key, {key: value}))
    gelu = hf.load_pretrained(copy_model(d, tmp_path / "erf", {"activation_function": "gelu"}))
    assert gelu.cfg.gelu_approx == "none"


# ---------------------------------------------------------------- the model fields tools/hf.py relies on
def test_new_fields_keep_defaults_and_stay_out_of_training_configs():
    c = ModelConfig()
    assert (c.rope_theta, c.norm_eps_value, c.kv_heads, c.gelu_approx, c.tied) == (10000.0, 1e-6, 8, "none", False)
    g = ModelConfig(arch="gpt2")
    assert (g.norm_eps_value, g.tied) == (1e-5, True)
    q = ModelConfig(arch="qwen3")
    assert (q.rope_theta, q.norm_eps_value, q.tied, q.hd, q.q_dim) == (1e6, 1e-6, False, 64, 512)
    train_keys = configurator.defaults("train.py")
    assert set(ModelConfig.field_names()) <= set(train_keys)
    extra = set(ModelConfig.field_names(pretrained=True)) - set(ModelConfig.field_names())
    assert extra == {"rope_theta", "norm_eps", "gelu_approx", "norm_topk"} and not extra & set(train_keys)


@pytest.mark.parametrize("kw, match", [
    (dict(n_kv_head=3), "^n_kv_head=3: must divide n_head=4"),
    (dict(n_kv_head=-1), "^n_kv_head=-1: must be a non-negative integer"),
    (dict(head_dim=-8), r"^head_dim=-8: must be a non-negative integer \(0 = the default\)"),
    (dict(head_dim=7), "^head_dim=7: RoPE needs an even head dim, got 7"),
    (dict(n_kv_head=1, param="crnet"), r"^rank=8: layer 2 rank 8 must be .* < min\(n_embd, ff_dim, q, k/v widths\) = 8"),
    (dict(arch="qwen3", bias=True), "^bias=True: the qwen3 architecture has no biases"),
    (dict(gelu_approx="erf"), r"^gelu_approx='erf': must be one of \('none', 'tanh'\)"),
    (dict(tie_embeddings=1), "^tie_embeddings=1: must be None"),
    (dict(rope_theta=0.0), "^rope_theta=0.0: must be a positive number"),
    (dict(norm_eps=-1e-5), r"^norm_eps=-1e-05: must be None \(the arch's default\) or a number in \[0, 1\)"),
])
def test_new_fields_are_validated_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**dict(n_head=4, n_embd=32, intermediate_size=48, rank=8, param="full"), **kw})


def test_grouped_query_attention_counts_and_trains():
    h, ff, L, V, kv = 32, 48, 2, 50, 8  # 4 heads of 8, 1 kv head
    m = Transformer(ModelConfig(n_layer=L, n_head=4, n_kv_head=1, n_embd=h, intermediate_size=ff, vocab_size=V,
                                block_size=16, param="full"))
    c = m.num_params()
    assert c["full_rank"] == L * (h * (h + 2 * kv) + h * h + 2 * h * ff + ff * h)
    assert c["total"] == c["full_rank"] + 2 * V * h + (2 * L + 1) * h
    assert m.blocks[0].qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the init table's std
    idx = torch.randint(0, V, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ---------------------------------------------------------------- tools/analyze.py --hf
@pytest.fixture(scope="module")
def gpt2_tokens(tmp_path_factory):
    """A slice of the bundled corpus as GPT-2 BPE, as prepare_data.py writes it."""
    from conftest import ROOT
    from prepare_data import prepare
    d = tmp_path_factory.mktemp("gpt2_tokens")
    (d / "small.txt").write_text((ROOT / "data" / "shakespeare.txt").read_text()[:60_000])
    prepare(d / "gpt2", tokenizer="gpt2", files=[d / "small.txt"], piece_chars=2000)
    return d / "gpt2"


def test_analyze_a_pretrained_gpt2(gpt2_tokens, tmp_path, monkeypatch, capsys):
    from tools import analyze
    d = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64)).save_pretrained(d)
    monkeypatch.setattr(analyze, "GPT2_DATA", gpt2_tokens)  # what --data_dir="" uses for GPT-2's BPE
    capsys.readouterr()
    rows = analyze.main([f"--hf={d}", "--tokens=256", "--rank=4"])
    out = capsys.readouterr().out
    assert f"{d}: param=full, 3 layers, h=32, ranks r=4, 2, 256 val tokens from {gpt2_tokens}" in out
    assert len(rows) == 2 * 6 and "| 2 | q |" in out and "| 3 | fc |" in out and "by construction" not in out
    assert all(o["best_ratio"] <= 1.0 for *_, o in rows)
    assert analyze.main([f"--hf={d}", "--tokens=256", "--rank=4", f"--data_dir={gpt2_tokens}"]) == rows


def test_analyze_a_pretrained_llama_needs_its_tokens(small_llama, tiny_data, tmp_path, capsys):
    from tools import analyze
    with pytest.raises(configurator.ConfigError, match=r"^data_dir='': .* a llama model with a 96-token vocabulary, "
                                                       r"not GPT-2's BPE: pass --data_dir=DIR"):
        analyze.main([f"--hf={small_llama}"])
    with pytest.raises(configurator.ConfigError, match=r"^data_dir=.*: holds token ids up to 256 \(byte tokenizer\), "
                                                       r"beyond the model's vocabulary of 96"):
        analyze.main([f"--hf={small_llama}", f"--data_dir={tiny_data}"])
    d = tmp_path / "llama"  # grouped-query attention: k and v are 16 wide
    llama(vocab_size=257, num_key_value_heads=2, max_position_embeddings=32).save_pretrained(d)
    capsys.readouterr()
    rows = analyze.main([f"--hf={d}", f"--data_dir={tiny_data}", "--tokens=256"])
    out = capsys.readouterr().out
    assert "ranks r=4, 2," in out and len(rows) == 7 and "| 2 | k |" in out and "| 2 | gate |" in out
    with pytest.raises(configurator.ConfigError, match=r"^rank=16: must be 1 <= rank <= 15: below the narrowest "
                                                       r"projection width \(16\)"):
        analyze.main([f"--hf={d}", f"--data_dir={tiny_data}", "--tokens=256", "--rank=16"])


# ---------------------------------------------------------------- defaults, sliding window, export variants
GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=24, vocab_size=96)


def test_gpt2_config_defaults_are_transformers_defaults():
    """openai-community/gpt2's config.json has neither key: transformers' GPT2Config defaults apply (tied, 1e-5)."""
    cfg, want = hf.model_config(dict(GPT2)), transformers.GPT2Config()
    assert cfg.tied is want.tie_word_embeddings is True
    assert cfg.norm_eps == want.layer_norm_epsilon


def test_mistral_sliding_window_caps_block_size():
    c = dict(model_type="mistral", hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
             vocab_size=96, max_position_embeddings=64, sliding_window=16)
    assert hf.model_config(c).block_size == 16
    with pytest.raises(ValueError, match=r"block_size=20: must be in \[1, 16\]"):
        hf.model_config(c, block_size=20)


@torch.no_grad()
def export_and_compare(cfg, tmp_path):
    """Our random model -> hf_config + hf_tensors -> transformers: same logits (the export's oracle)."""
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    for p in ours.parameters():
        p.add_(torch.randn_like(p) * 0.3)
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config(cfg, 0)))
    hf.write_safetensors(tmp_path / "model.safetensors", hf.hf_tensors(ours))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits(theirs, ours, cfg.vocab_size, cfg.block_size)


def test_export_keeps_rope_theta(tmp_path):
    cfg = ModelConfig(arch="llama", param="full", n_layer=2, n_head=4, n_embd=32, intermediate_size=48,
                      vocab_size=96, block_size=32, rope_theta=50.0)
    export_and_compare(cfg, tmp_path)


def test_export_gpt2_exact_gelu(tmp_path):
    cfg = ModelConfig(arch="gpt2", param="full", n_layer=2, n_head=4, n_embd=32, intermediate_size=128,
                      vocab_size=96, block_size=16, bias=True, gelu_approx="none")
    export_and_compare(cfg, tmp_path)


def test_export_bias_free_gpt2_writes_zero_biases(tmp_path):
    cfg = ModelConfig(arch="gpt2", param="full", n_layer=2, n_head=4, n_embd=32, intermediate_size=128,
                      vocab_size=96, block_size=16, bias=False)
    ours = Transformer(cfg)
    params = dict(ours.named_parameters())
    made = [(n, t) for n, t in hf.hf_tensors(ours) if n.endswith(".bias")
            and hf.tensor_map(cfg)[hf.strip_prefix(n, "gpt2")][0] not in params]
    assert made and all(torch.count_nonzero(t) == 0 for _, t in made)
    export_and_compare(cfg, tmp_path)


@pytest.mark.parametrize("tie", [False, True])
def test_export_tie_word_embeddings(tie):
    cfg = ModelConfig(arch="llama", param="full", n_layer=2, n_head=4, n_embd=32, intermediate_size=48,
                      vocab_size=96, block_size=32, tie_embeddings=tie)
    assert hf.hf_config(cfg, 0)["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in dict(hf.hf_tensors(Transformer(cfg)))) is not tie
