"""prepare_data.py: round trips, end-of-text placement, metadata, and errors that lose nothing."""
import json

import numpy as np
import pytest

import prepare_data
from prepare_data import get_tokenizer, load_meta, prepare, split_pieces

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


def test_split_is_seeded(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    a = prepare(tmp_path / "a", files=[src], seed=1)
    b = prepare(tmp_path / "b", files=[src], seed=1)
    c = prepare(tmp_path / "c", files=[src], seed=2, val_fraction=0.3)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert a["val_tokens"] == b["val_tokens"]


def test_text_files_are_cut_into_pieces_at_paragraphs(tmp_path):
    text = "".join(f"Para {i} line one.\nline two.\n\n" for i in range(200))
    pieces = split_pieces(text, 300)
    assert "".join(pieces) == text and all(p.endswith("\n\n") for p in pieces)
    assert all(len(p) >= 300 for p in pieces[:-1]) and len(pieces) > 10
    (tmp_path / "a.txt").write_text(text)
    meta = prepare(tmp_path / "out", files=[tmp_path / "a.txt"], piece_chars=300)
    assert meta["train_documents"] + meta["val_documents"] == len(pieces)
    assert "".join(sorted(decode_docs(tmp_path / "out", get_tokenizer("byte")))) == "".join(sorted(pieces))


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


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        prepare(tmp_path / "o", files=[tmp_path / "missing.txt"])
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="no text"):
        prepare(tmp_path / "o", files=[tmp_path / "empty.jsonl"])
    with pytest.raises(ValueError, match="text column 'content' not in the data; columns are \\['text'\\]"):
        prepare(tmp_path / "o", files=[tmp_path / "empty.jsonl"], text_column="content")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="files must all be one of"):
        prepare(tmp_path / "o", files=[tmp_path / "x.csv"])
    assert not (tmp_path / "o").exists()


def test_tokenizer_that_overflows_uint16_is_rejected(monkeypatch):
    class Big:
        def __init__(self, name):
            self.name, self.n_vocab, self.eot_token = name, 100277, 100257
    monkeypatch.setattr(prepare_data, "TiktokenTokenizer", Big)
    with pytest.raises(ValueError, match="cl100k_base.*do not fit the uint16"):
        get_tokenizer("cl100k_base")


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    prepare(tmp_path / "out", files=[src])
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real_memmap = np.memmap
    calls = []

    def failing_memmap(*a, **k):  # the disk fills up while writing the second split
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_memmap(*a, **k)
    monkeypatch.setattr(prepare_data.np, "memmap", failing_memmap)
    with pytest.raises(OSError):
        prepare(tmp_path / "out", files=[src], seed=99)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


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
    (tmp_path / "out" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_meta(tmp_path / "out")
