"""prepare_data.py: round trips, end-of-text placement, metadata, the token-fraction split, flat memory, and
errors that name the file and lose nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import configurator
import prepare_data
from conftest import ROOT
from prepare_data import Splits, get_tokenizer, load_meta, prepare, split_pieces

DOCS = [f"Document {i}: " + "to be or not to be, " * (i % 7 + 1) + ("héllo ✓" if i % 5 == 0 else "") for i in range(40)]


def decode_docs(d, tok):
    """Every document must end with exactly one EOT; return the decoded documents of both splits."""
    meta = load_meta(d)
    out = []
    for split in ("train", "val"):
        ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
        assert ids.dtype == np.uint16 and len(ids) == meta[f"{split}_tokens"]
        assert ids[-1] == tok.eot_token
        parts = np.split(ids, np.flatnonzero(ids == tok.eot_token) + 1)[:-1]
        assert len(parts) == meta[f"{split}_documents"]
        out += [tok.decode(p[:-1].tolist()) for p in parts]
    return out


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_round_trip(tmp_path, tokenizer, fmt):
    import pandas as pd
    src = tmp_path / f"docs.{fmt}"
    df = pd.DataFrame({"body": DOCS, "id": range(len(DOCS))})
    df.to_json(src, orient="records", lines=True) if fmt == "jsonl" else df.to_parquet(src)
    meta = prepare(tmp_path / "out", tokenizer=tokenizer, files=[src], text_column="body", val_fraction=0.25, seed=3)
    tok = get_tokenizer(tokenizer)
    assert sorted(decode_docs(tmp_path / "out", tok)) == sorted(DOCS)
    assert meta["tokenizer"] == tokenizer and meta["vocab_size"] == tok.n_vocab and meta["split_seed"] == 3
    assert meta["train_documents"] + meta["val_documents"] == len(DOCS) and meta["val_documents"] > 0
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tok.encode(t)) + 1 for t in DOCS)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_local_files_are_read_without_network(tmp_path, monkeypatch):
    """datasets pings the hub for a download count on every load_dataset call: 3 s per file where offline."""
    import socket
    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise socket.gaierror("offline")
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    prepare(tmp_path / "o", files=[write_jsonl(tmp_path / "d.jsonl", DOCS)])
    assert calls == []


def test_split_is_seeded(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    a = prepare(tmp_path / "a", files=[src], seed=1)
    b = prepare(tmp_path / "b", files=[src], seed=1)
    c = prepare(tmp_path / "c", files=[src], seed=2, val_fraction=0.3)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert a["val_tokens"] == b["val_tokens"]
    rng = np.random.default_rng(0)  # the seed alone (same val_fraction) picks other documents
    src.write_text("".join(json.dumps({"text": f"doc {i} " + "x" * int(rng.integers(20, 400))}) + "\n" for i in range(200)))
    vals = {prepare(tmp_path / f"s{s}", files=[src], seed=s) and (tmp_path / f"s{s}" / "val.bin").read_bytes() for s in range(4)}
    assert len(vals) == 4


def test_two_documents_at_a_tiny_val_fraction_still_give_each_split_one(tmp_path):
    """The coin may send every document one way; the fix-up moves one whole document (bytes, not tokens) across."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "first document"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    for seed in range(5):
        m = prepare(tmp_path / f"o{seed}", files=[src], val_fraction=0.01, seed=seed)
        assert load_meta(tmp_path / f"o{seed}") and m["train_documents"] == m["val_documents"] == 1
        assert m["train_tokens"] + m["val_tokens"] == len("first document") + len("second") + 2  # + an end-of-text each


def test_token_ids_equal_to_the_vocabulary_are_refused_and_one_below_pass(tmp_path):
    from prepare_data import check_token_ids
    import torch
    c, meta = {"block_size": 4, "eval_tokens": 8, "vocab_size": 10}, {"vocab_size": 10, "max_token_id": 9}
    ok = np.full(20, 9, np.uint16)
    bad = ok.copy()
    bad[2] = 10
    first = [(torch.tensor([9]), torch.tensor([9]))]
    check_token_ids(c, tmp_path, meta, (ok, ok), first, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds token id 10"):
        check_token_ids(c, tmp_path, meta, (ok, bad), first, torch.device("cpu"))


def test_text_files_are_cut_into_pieces_at_paragraphs(tmp_path):
    text = "".join(f"Para {i} line one.\nline two.\n\n" for i in range(200))
    pieces = split_pieces(text, 300)
    assert "".join(pieces) == text and all(p.endswith("\n\n") for p in pieces)
    assert all(len(p) >= 300 for p in pieces[:-1]) and len(pieces) > 10
    (tmp_path / "a.txt").write_text(text)
    meta = prepare(tmp_path / "out", files=[tmp_path / "a.txt"], piece_chars=300)
    assert meta["train_documents"] + meta["val_documents"] == len(pieces)
    assert "".join(sorted(decode_docs(tmp_path / "out", get_tokenizer("byte")))) == "".join(sorted(pieces))
    lines = "".join(f"line {i} has no paragraph break after it.\n" for i in range(300))  # a file of single lines
    pieces = split_pieces(lines, 300)
    assert "".join(pieces) == lines and all(p.endswith("\n") and len(p) < 4 * 300 for p in pieces) and len(pieces) > 10
    flat = "x" * 5000  # no line break at all: cut anywhere, at 4 * piece_chars
    assert split_pieces(flat, 300) == [flat[i:i + 1200] for i in range(0, 5000, 1200)]


def test_caps_on_documents_and_tokens(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    m = prepare(tmp_path / "a", files=[src], max_docs=10)
    assert m["train_documents"] + m["val_documents"] == 10
    m = prepare(tmp_path / "b", files=[src], max_tokens=500)
    assert 500 <= m["train_tokens"] + m["val_tokens"] < 500 + max(len(t.encode()) + 1 for t in DOCS)
    m = prepare(tmp_path / "c", files=[src], max_docs=12, streaming=True)  # the streaming path, on a local file
    assert m["train_documents"] + m["val_documents"] == 12
    with pytest.raises(ValueError, match="streaming needs a cap"):
        prepare(tmp_path / "d", files=[src], streaming=True)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        prepare(tmp_path / "o", files=[tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="no file matches '.*nothing/\\*.jsonl'"):
        prepare(tmp_path / "o", files=f"{tmp_path}/nothing/*.jsonl")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="no text"):
        prepare(tmp_path / "o", files=[tmp_path / "empty.jsonl"])
    with pytest.raises(ValueError, match="text column 'content' not in the data; columns are \\['text'\\]"):
        prepare(tmp_path / "o", files=[tmp_path / "empty.jsonl"], text_column="content")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="files must all be one of"):
        prepare(tmp_path / "o", files=[tmp_path / "x.csv"])
    (tmp_path / "a.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="files mix formats .*a.txt is text.*one format per run"):
        prepare(tmp_path / "o", files=[tmp_path / "a.txt", tmp_path / "empty.jsonl"])
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3': choose byte, a tiktoken encoding \\(.*r50k_base"):
        prepare(tmp_path / "o", files=[tmp_path / "a.txt"], tokenizer="gpt3")
    for f in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction=.* must be in \\(0, 1\\)"):
            prepare(tmp_path / "o", files=[tmp_path / "a.txt"], val_fraction=f)
    with pytest.raises(ValueError, match="need at least 2 documents"):
        prepare(tmp_path / "o", files=[tmp_path / "a.txt"])
    assert not (tmp_path / "o").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_broken_files_are_named_with_line_and_cause(tmp_path):
    good = [json.dumps({"text": t}) for t in DOCS[:8]]
    cases = {
        "bad.jsonl": ("\n".join(good[:6] + ["{not json"] + good[6:]) + "\n", r"bad.jsonl: line 7: not valid JSON"),
        "list.jsonl": ("\n".join(good[:3] + ["[1, 2]"]) + "\n", r"list.jsonl: line 4: a JSON list, not an object"),
        "number.jsonl": ("\n".join(good[:3] + [json.dumps({"text": 5})]) + "\n", r"number.jsonl: column 'text' holds a int"),
        "binary.jsonl": (bytes(range(256)) * 64, r"binary.jsonl: line 1: binary data"),
        "latin1.jsonl": ("\n".join(good[:2] + ['{"text": "caf\xe9"}']).encode("latin-1"), r"latin1.jsonl: line 3: not UTF-8"),
        "binary.txt": (b"fine text\n\nmore\n" + bytes(range(128, 256)), r"binary.txt:4: not UTF-8 text .*binary file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        with pytest.raises(ValueError, match=message):
            prepare(tmp_path / "o", files=[path])
    assert not (tmp_path / "o").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_files_take_globs_folders_and_lists(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    write_jsonl(d / "a.jsonl", DOCS[:10])
    write_jsonl(d / "sub" / "b.jsonl", DOCS[10:25])
    write_jsonl(d / ".hidden" / "c.jsonl", ["never read"] * 5)
    (d / "notes.md").write_text("not a data file")
    tok = get_tokenizer("byte")
    for spec, docs in [(str(d), DOCS[:25]), (f"{d}/*.jsonl", DOCS[:10]), (f"{d}/**/*.jsonl", DOCS[:25]),
                       (f"{d}/sub/b.jsonl,{d}/a.jsonl", DOCS[:25]), (f"{d}/a.jsonl, {d}/*.jsonl", DOCS[:10])]:
        prepare(tmp_path / "out", files=spec)
        assert sorted(decode_docs(tmp_path / "out", tok)) == sorted(docs), spec
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="folder .*none holds no"):
        prepare(tmp_path / "o", files=str(tmp_path / "none"))


def test_val_gets_its_token_fraction_within_one_document(tmp_path):
    """The tolerance: |val tokens - val_fraction * all tokens| <= the longest document. A coin per document gave
    val 20% of 25 documents when 10% was asked."""
    rng = np.random.default_rng(0)
    docs = [f"doc {i:03d} " + "x" * int(rng.integers(20, 400)) for i in range(400)]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    longest = max(len(t) + 1 for t in docs)
    for seed in range(3):
        for f in (0.02, 0.1, 0.5):
            m = prepare(tmp_path / "o", files=[src], val_fraction=f, seed=seed)
            total = m["train_tokens"] + m["val_tokens"]
            assert abs(m["val_tokens"] - f * total) <= longest
            val = [int(t[4:7]) for t in decode_docs(tmp_path / "o", get_tokenizer("byte"))[m["train_documents"]:]]
            assert min(val) < 100 and max(val) >= 300  # spread through the corpus, not its tail
    same = write_jsonl(tmp_path / "s.jsonl", [f"document {i:02d} " + "y" * 100 for i in range(25)])
    for seed in range(20):
        m = prepare(tmp_path / "o", files=[same], val_fraction=0.1, seed=seed)
        assert m["val_documents"] in (2, 3)  # 2.5 documents asked


def test_split_stays_within_one_document_at_every_prefix(tmp_path):
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 5000, size=3000)
    for f in (0.01, 0.1, 0.7):
        s = Splits(tmp_path, f, seed=5)
        for i, n in enumerate(lens):
            s.add(np.zeros(n, np.uint16), lens[i:i + 1])
            total = s.tokens["train"] + s.tokens["val"]
            assert abs(s.tokens["val"] - f * total) <= lens[:i + 1].max()
        s.close()


def test_max_token_id_is_the_largest_id_written(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    for tokenizer in ("byte", "gpt2"):
        m = prepare(tmp_path / tokenizer, files=[src], tokenizer=tokenizer)
        ids = np.concatenate([np.fromfile(tmp_path / tokenizer / f"{s}.bin", np.uint16) for s in ("train", "val")])
        assert m["max_token_id"] == ids.max() == get_tokenizer(tokenizer).eot_token
    s = Splits(tmp_path, 0.5, 0)  # ids from a later batch below an earlier one's (a GGUF's eot need not be the top)
    for flat in ([5, 0], [1, 0]):
        s.add(np.array(flat, np.uint16), np.array([1, 1]))
    s.close()
    assert s.max_id == 5


def test_hub_path_is_one_load_dataset_call(tmp_path, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetGenerationError
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    m = prepare(tmp_path / "o", hf_dataset="org/corpus", hf_config="en", hf_split="train", text_column="body",
                streaming=True, max_docs=30)
    assert calls == [("org/corpus", "en", "train", True)] and m["source"] == "hf:org/corpus/en:train"
    assert len(decode_docs(tmp_path / "o", get_tokenizer("byte"))) == 30

    def failing_load_dataset(*a, **k):
        try:
            raise ValueError("Trailing data at line 3")
        except ValueError as e:
            raise DatasetGenerationError("An error occurred while generating the dataset") from e
    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(ValueError, match="hf:org/corpus: ValueError: Trailing data at line 3"):
        prepare(tmp_path / "p", hf_dataset="org/corpus")
    assert not (tmp_path / "p").exists()


def test_an_unreachable_hub_and_a_prepared_out_dir_are_one_line_errors(tmp_path, monkeypatch, capsys):
    import datasets
    import prepare_data

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"^hf:org/corpus: the Hugging Face hub could not provide it "
                                                r"\(ConnectionError: Couldn't reach .*\); run where the hub is reachable"):
        prepare(tmp_path / "p", hf_dataset="org/corpus")
    assert not (tmp_path / "p").exists()
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS))
    prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'd'}", "--piece_chars=50"])
    before = {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()}
    with pytest.raises(ValueError, match=r"out_dir=.*: already holds prepared data \(meta.json\); pass --overwrite"):
        prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'd'}", "--tokenizer=gpt2", "--piece_chars=50"])
    assert {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()} == before
    prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'd'}", "--tokenizer=gpt2", "--overwrite", "--piece_chars=50"])
    assert (tmp_path / "d" / "meta.json").read_bytes() != before["meta.json"]  # replaced, with --overwrite
    (tmp_path / ".n.tmp-abc").mkdir()  # what a prepare killed (SIGKILL) while tokenizing leaves
    (tmp_path / "n").mkdir()  # token files from another tool (nanoGPT writes train.bin, val.bin, meta.pkl)
    (tmp_path / "n" / "train.bin").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"out_dir=.*n': holds train.bin without meta.json .*; pass --overwrite"):
        prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'n'}", "--piece_chars=50"])
    assert (tmp_path / "n" / "train.bin").read_bytes() == b"keep"
    capsys.readouterr()
    prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'n'}", "--piece_chars=50", "--overwrite"])
    assert f"note: {tmp_path / '.n.tmp-abc'} is an unfinished prepare_data.py into" in capsys.readouterr().out


def test_train_notes_what_a_killed_preparation_of_the_bundled_data_left(tmp_path, monkeypatch):
    """train.py prepares a bundled data dir on first use; one killed mid-way leaves .<dir>.tmp-* beside it, which only
    a person can tell from one still running: named in a note before the next preparation starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_data, "ROOT", tmp_path)
    (tmp_path / "data" / ".shakespeare_byte.tmp-abc").mkdir(parents=True)
    said = []

    def prepared(d, tokenizer):
        said.append(f"prepare {tokenizer}")
        raise KeyboardInterrupt  # (the test ends here)
    monkeypatch.setattr(prepare_data, "prepare", prepared)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.ready_data({"data_dir": "data/shakespeare_byte", "data_recipe": ""}, say=said.append)
    assert said == [f"note: {tmp_path / 'data' / '.shakespeare_byte.tmp-abc'} is an unfinished preparation of "
                    f"{tmp_path / 'data' / 'shakespeare_byte'}: one killed (delete it to free its space) or one still running",
                    f"preparing {tmp_path / 'data' / 'shakespeare_byte'} from the bundled corpus", "prepare byte"]


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """A corpus held whole would add 120 MB of text and 240 MB of tokens; read a batch at a time, it adds little
    (what it adds is batches in flight in the tokenizer threads: 7-45 MB measured on 2 cores, hence the margin).
    The peak is VmHWM: ru_maxrss of a child counts its parent's memory at fork."""
    block = "".join(json.dumps({"text": t}) + "\n" for t in DOCS * 100)
    code = "import sys, prepare_data; prepare_data.main(sys.argv[1:]); " \
           "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    peaks = []
    for mb in (20, 140):
        src = tmp_path / f"c{mb}.jsonl"
        with open(src, "w") as f:
            for _ in range(mb * 2 ** 20 // len(block)):
                f.write(block)
        p = subprocess.run([sys.executable, "-c", code, f"--files={src}", f"--out_dir={tmp_path / 'o'}", "--overwrite"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        peaks.append(int(p.stdout.split()[-1]) / 1024)  # MB
    assert peaks[1] - peaks[0] < 90, peaks


def test_tokenizer_that_overflows_uint16_is_rejected(monkeypatch):
    class Big:
        def __init__(self, name):
            self.name, self.n_vocab, self.eot_token = name, 100277, 100257
    monkeypatch.setattr(prepare_data, "TiktokenTokenizer", Big)  # a size known only once loaded
    with pytest.raises(ValueError, match="p50k_base.*do not fit the uint16"):
        get_tokenizer("p50k_base")
    monkeypatch.setattr(prepare_data, "TiktokenTokenizer", lambda name: SimpleNamespace(n_vocab=2 ** 16))
    assert get_tokenizer("p50k_base").n_vocab == 65536  # ids 0..65535: every one fits
    monkeypatch.setattr(prepare_data, "TiktokenTokenizer", None)  # the known big ones: refused before any download
    for name, n in [("cl100k_base", 100277), ("o200k_base", 200019)]:
        with pytest.raises(ValueError, match=f"^tokenizer '{name}' has {n} tokens; ids above 65535 do not fit the uint16"):
            get_tokenizer(name)


def test_a_tiktoken_encoding_that_cannot_be_downloaded_is_one_clear_error(tmp_path, monkeypatch):
    import socket

    def offline(*a, **k):
        raise socket.gaierror("offline")
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: tiktoken must download
    with pytest.raises(FileNotFoundError, match=r"^tokenizer 'p50k_base': tiktoken could not fetch its BPE file "
                                                r"\(ConnectionError\); tiktoken downloads it from the internet once "
                                                r"into TIKTOKEN_CACHE_DIR \(now .*\): run once where the network"):
        get_tokenizer("p50k_base")


def test_an_out_dir_that_is_or_is_under_a_file_is_refused_before_tokenizing(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    (tmp_path / "f").write_text("mine")
    monkeypatch.setattr(prepare_data, "write_tokens", None)  # tokenizing would fail here
    for out, why in [("f", "is a file, not a directory"), ("f/sub", ".*f is a file, not a directory")]:
        with pytest.raises(ValueError, match=f"^out_dir='.*{out}': {why}"):
            prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / out}"])
    assert (tmp_path / "f").read_text() == "mine" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    prepare(tmp_path / "out", files=[src])
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    after = lambda: {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "e.jsonl").write_text(src.read_text() + "{broken\n")  # tokens already written when it breaks
    with pytest.raises(ValueError, match="e.jsonl: line 41"):
        prepare(tmp_path / "out", files=[src, tmp_path / "e.jsonl"], seed=99)
    assert after() == before
    real_write, calls = Splits.write, []

    def failing_write(self, *a):  # the disk fills up while writing
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_write(self, *a)
    monkeypatch.setattr(Splits, "write", failing_write)
    with pytest.raises(OSError):
        prepare(tmp_path / "out", files=[src], seed=99)
    assert after() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a synced descriptor's file through /proc")
def test_every_file_is_synced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    """A rename publishes the data; without an fsync first, a power loss soon after could leave a meta.json that
    vouches for token files still empty on disk. Then out_dir itself is synced, so that the renames last."""
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(prepare_data.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                              real_fsync(fd)))
    monkeypatch.setattr(prepare_data.os, "replace", lambda a, b: (events.append(("replace", str(Path(a).resolve()))),
                                                                  real_replace(a, b)))
    prepare(tmp_path / "out", files=[src])
    monkeypatch.undo()
    published = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert sorted(Path(events[i][1]).name for i in published) == ["meta.json", "train.bin", "val.bin"], events
    assert all(("fsync", events[i][1]) in events[:i] for i in published), events
    assert ("fsync", str((tmp_path / "out").resolve())) in events[published[-1]:], events


def test_killed_run_leaves_the_old_dataset_or_an_incomplete_one(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    prepare(tmp_path / "out", files=[src])
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    kill = "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
    for target, patch in [("Splits.add", f"prepare_data.Splits.add = {kill}"),  # while tokens are being written
                          ("os.replace", f"r = os.replace; os.replace = lambda *a: (r(*a), ({kill})())")]:  # after 1 rename
        code = f"import os, signal, sys, prepare_data; {patch}; prepare_data.main(sys.argv[1:])"
        p = subprocess.run([sys.executable, "-c", code, f"--files={src}", f"--out_dir={tmp_path / 'out'}", "--seed=7",
                            "--overwrite"], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == -9, (target, p.stderr[-2000:])
        if target == "Splits.add":
            assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
            # the work folder is beside out_dir (the same disk: the renames that publish the files are atomic)
            assert [p.name for p in tmp_path.glob(".out.tmp-*/train.bin")] and not any((tmp_path / "out").glob(".*"))
        else:
            with pytest.raises(FileNotFoundError, match="meta.json not found"):
                load_meta(tmp_path / "out")


def test_command_line(tmp_path):
    p = subprocess.run([sys.executable, "prepare_data.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "--val_fraction=0.1" in p.stdout and "--files=''" in p.stdout
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    configurator.spec.cache_clear()
    prepare_data.main([f"--files={src}", f"--out_dir={tmp_path / 'o'}", "--tokenizer=gpt2", "--max_tokens=1e3"])
    assert load_meta(tmp_path / "o")["tokenizer"] == "gpt2"
    for argv, message in [([f"--files={src}"], "out_dir=''.*needed with --files"),
                          ([f"--files={src}", "--out_dir=x", "--val_fraction=1.5"], r"val_fraction=1.5: must be in \(0,1\)"),
                          ([f"--files={src}", "--out_dir=x", "--streaming"], "streaming needs a cap"),
                          ([f"--files={src}", "--out_dir=x", "--hf_dataset=a/b"], "files or hf_dataset, not both")]:
        with pytest.raises(ValueError, match=message):
            prepare_data.main(argv)


def test_load_meta_detects_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the data first"):
        load_meta(tmp_path)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    prepare(tmp_path / "out", files=[src])
    with open(tmp_path / "out" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_meta(tmp_path / "out")
    prepare(tmp_path / "longer", files=[src])
    with open(tmp_path / "longer" / "val.bin", "ab") as f:
        f.write(b"\0\0")  # one token more than meta.json says: as corrupt as one less
    with pytest.raises(ValueError, match="val.bin has .* bytes but meta.json says .* truncated or corrupt"):
        load_meta(tmp_path / "longer")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    del meta["max_token_id"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json has no 'max_token_id'"):
        load_meta(tmp_path / "out")
    (tmp_path / "out" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_meta(tmp_path / "out")
    (tmp_path / "out" / "meta.json").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"^.*out/meta.json is corrupt: not UTF-8 text .*; re-run prepare_data.py"):
        load_meta(tmp_path / "out")


def test_load_meta_checks_each_value(tmp_path):
    """Values of the wrong type or out of range would fail later, far from the file (a TypeError, or uint32 data
    read as uint16)."""
    prepare(tmp_path / "out", files=[write_jsonl(tmp_path / "d.jsonl", DOCS)])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    for key, value, why in [("vocab_size", "257", r'"257" must be an integer in \[1, 65536\]'),
                            ("vocab_size", None, r"null must be an integer"), ("vocab_size", 0, "0 must be"),
                            ("vocab_size", 70000, "70000 must be"), ("vocab_size", True, "true must be"),
                            ("train_tokens", None, "null must be an integer >= 0"), ("val_tokens", -1, "-1 must be"),
                            ("max_token_id", 257, "257 must be an integer >= 0 and below vocab_size=257"),
                            ("eot_token", 2.5, "2.5 must be"), ("eot_token", -1, "-1 must be an integer >= 0"), ("tokenizer", "", '"" must be a tokenizer name'),
                            ("dtype", "uint32", '"uint32" must be "uint16"')]:
        (tmp_path / "out" / "meta.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=f"^.*out/meta.json: {key}={why}.*; re-run prepare_data.py$"):
            load_meta(tmp_path / "out")
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    assert load_meta(tmp_path / "out") == meta


@pytest.mark.parametrize("size", [2, 2 ** 20 - 2, 2 ** 20 + 2, 3 * 2 ** 20 + 6])
def test_tokens_sha1_is_each_splits_first_and_last_mib(tmp_path, size):
    """prepare_data.tokens_sha1 against hashlib over the bytes it means: each split's first MiB and the rest of its
    last MiB (a split under 2 MiB whole, once). Past 2 MiB a change in the middle is not seen, one at the end is."""
    import hashlib
    n, rng = 2 ** 20, np.random.default_rng(size)
    data = {s: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for s in ("train", "val")}
    for s, b in data.items():
        (tmp_path / f"{s}.bin").write_bytes(b)
    want = hashlib.sha1(b"".join(b[:n] + b[max(n, len(b) - n):] for b in data.values())).hexdigest()
    assert prepare_data.tokens_sha1(tmp_path) == want
    for at, seen in ((size // 2, size <= 2 * n), (size - 1, True)):
        b = bytearray(data["val"])
        b[at] ^= 1
        (tmp_path / "val.bin").write_bytes(b)
        assert (prepare_data.tokens_sha1(tmp_path) != want) == seen, (at, seen)
        (tmp_path / "val.bin").write_bytes(data["val"])


def test_data_prepared_again_from_the_same_text_has_the_same_fingerprint(tiny_data, tmp_path):
    """What lets a resumed run go on after its data_dir was prepared again from the same source (conftest's)."""
    prepare(tmp_path / "again", tokenizer="byte", files=[tiny_data.parent / "small.txt"], piece_chars=5000)
    assert prepare_data.tokens_sha1(tmp_path / "again") == prepare_data.tokens_sha1(tiny_data)
