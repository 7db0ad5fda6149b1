"""
Tokenize text into train.bin / val.bin (flat uint16 token streams, one end-of-text token after
every document) plus meta.json, which train.py checks before it trains.

    python prepare_data.py                                   # bundled Shakespeare, byte tokenizer
    python prepare_data.py --tokenizer=gpt2                  # same corpus, GPT-2 BPE (r50k_base)
    python prepare_data.py --files=a.txt,b.txt --out_dir=data/mine
    python prepare_data.py --files=docs.jsonl --text_column=body --out_dir=data/mine
    python prepare_data.py --hf_dataset=roneneldan/TinyStories --max_docs=200000 --tokenizer=gpt2 --out_dir=data/tinystories
    python prepare_data.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --streaming --max_tokens=1e9 ...

Documents are the unit of the train/val split (a seeded random draw per document). Plain .txt
files are one document each, cut into pieces of about --piece_chars characters at paragraph
breaks, so that a single-file corpus still gets a random split. Output appears only when complete:
files are written to a temporary folder and moved into place, meta.json last.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
BUNDLED = ROOT / "data" / "shakespeare.txt"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "assets" / "tiktoken"))  # shipped r50k_base ranks: no network
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# ----------------------------------------------------------------------------- config
out_dir = ""
tokenizer = "byte"
files = ""
hf_dataset = ""
hf_config = ""
hf_split = "train"
streaming = False
text_column = "text"
max_docs = 0.0
max_tokens = 0.0
val_fraction = 0.1
seed = 1337
num_proc = 1
piece_chars = 20000
# -----------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256. Needs no files."""
    name, n_vocab, eot_token = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, name):
        import tiktoken
        self.name = name
        self.enc = tiktoken.get_encoding("r50k_base" if name == "gpt2" else name)
        self.n_vocab, self.eot_token = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)


def get_tokenizer(name):
    tok = ByteTokenizer() if name == "byte" else TiktokenTokenizer(name)
    if tok.n_vocab > 2 ** 16:
        raise ValueError(f"tokenizer {name!r} has {tok.n_vocab} tokens; ids above 65535 do not fit the uint16 token files")
    return tok


def split_pieces(text, piece_chars):
    """Cut text at paragraph breaks ("\\n\\n") into pieces of at least piece_chars characters."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + piece_chars)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def load_documents(files=None, hf_dataset=None, hf_config=None, hf_split="train", streaming=False,
                   text_column="text", piece_chars=20000):
    """A datasets.Dataset (or IterableDataset when streaming) with one document per row in `text_column`."""
    import datasets
    from datasets import load_dataset
    datasets.disable_progress_bars()
    if hf_dataset:  # the hub path: a thin call; everything after it is shared with (and tested on) local files
        ds = load_dataset(hf_dataset, hf_config, split=hf_split, streaming=streaming)
    else:
        files = [str(f) for f in files]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"data file not found: {f}")
        kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"files must all be one of {sorted(FORMATS)} (one format per run), got {files}")
        kind = kinds.pop()
        extra = {"sample_by": "document"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=files, split="train", streaming=streaming, **extra)
        if kind == "text":
            ds = ds.map(lambda b: {"text": [p for t in b["text"] for p in split_pieces(t, piece_chars)]},
                        batched=True, remove_columns=ds.column_names)
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} not in the data; columns are {columns} (use --text_column)")
    return ds


def tokenize(ds, tok, text_column="text", max_docs=None, max_tokens=None, num_proc=1):
    """A list of uint16 arrays, one per non-empty document, each ending with the end-of-text token."""
    encode = lambda b: {"ids": [tok.encode(t) + [tok.eot_token] if t and t.strip() else [] for t in b[text_column]]}
    if hasattr(ds, "num_rows"):  # an in-memory / on-disk Dataset: parallel map
        if max_docs is not None:
            ds = ds.select(range(min(int(max_docs), ds.num_rows)))
        ds = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names)
        rows = (r["ids"] for r in ds)
    else:  # streaming: an open-ended iterator, so it needs a cap
        if max_docs is None and max_tokens is None:
            raise ValueError("streaming needs a cap: set --max_docs or --max_tokens")
        rows = (encode({text_column: [r[text_column]]})["ids"][0] for i, r in enumerate(ds)
                if max_docs is None or i < int(max_docs))
    docs, total = [], 0
    for ids in rows:
        if max_tokens is not None and total >= int(max_tokens):
            break
        if ids:
            docs.append(np.asarray(ids, dtype=np.uint16))
            total += len(ids)
        if max_docs is not None and len(docs) >= int(max_docs):
            break
    if not docs:
        raise ValueError("the source contains no text (every document is empty)")
    return docs


def write_dataset(docs, out_dir, tok, source, val_fraction=0.1, seed=1337):
    """Split documents with a seeded draw, write train.bin / val.bin / meta.json atomically."""
    if len(docs) < 2:
        raise ValueError("need at least 2 documents (pieces) to make a train and a val split")
    is_val = np.random.default_rng(seed).random(len(docs)) < val_fraction
    if is_val.all() or not is_val.any():  # tiny sources: force one document to the other side
        is_val[-1] = not is_val[-1]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = {"format": 1, "tokenizer": tok.name, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token,
                "dtype": "uint16", "source": source, "split_seed": seed, "val_fraction": val_fraction}
        for split, mask in (("train", ~is_val), ("val", is_val)):
            chosen = [d for d, v in zip(docs, mask) if v]
            n = sum(len(d) for d in chosen)
            out = np.memmap(tmp / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(n,))  # pre-sized
            pos = 0
            for d in chosen:
                out[pos:pos + len(d)] = d
                pos += len(d)
            out.flush()
            del out
            meta[f"{split}_tokens"], meta[f"{split}_documents"] = n, len(chosen)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        (out_dir / "meta.json").unlink(missing_ok=True)  # no meta.json = incomplete, until the new one lands
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare(out_dir, tokenizer="byte", files=None, hf_dataset=None, hf_config=None, hf_split="train",
            streaming=False, text_column="text", max_docs=None, max_tokens=None, val_fraction=0.1,
            seed=1337, num_proc=1, piece_chars=20000):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    tok = get_tokenizer(tokenizer)
    files = files or ([] if hf_dataset else [BUNDLED])
    ds = load_documents(files, hf_dataset, hf_config, hf_split, streaming, text_column, piece_chars)
    docs = tokenize(ds, tok, text_column, max_docs, max_tokens, num_proc)
    source = f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f":{hf_split}" if hf_dataset else \
        ",".join(str(Path(f).resolve().relative_to(ROOT)) if Path(f).resolve().is_relative_to(ROOT) else str(f) for f in files)
    return write_dataset(docs, out_dir, tok, source, val_fraction, seed)


def load_meta(data_dir):
    """Read and check a prepared dataset; a clear error for anything missing or corrupt."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first (python prepare_data.py --out_dir={data_dir})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is corrupt: {e}") from None
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-run prepare_data.py")
        if path.stat().st_size != 2 * meta[f"{split}_tokens"]:
            raise ValueError(f"{path} has {path.stat().st_size} bytes but meta.json says {meta[f'{split}_tokens']} "
                             f"uint16 tokens: the file is truncated or corrupt; re-run prepare_data.py")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="default: data/shakespeare_<tokenizer> for the bundled corpus")
    p.add_argument("--tokenizer", default="byte", help="byte | gpt2 (= r50k_base) | another tiktoken encoding")
    p.add_argument("--files", default=None, help="comma-separated local .txt / .jsonl / .parquet files")
    p.add_argument("--hf_dataset", default=None)
    p.add_argument("--hf_config", default=None)
    p.add_argument("--hf_split", default="train")
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--text_column", default="text")
    p.add_argument("--max_docs", type=float, default=None)
    p.add_argument("--max_tokens", type=float, default=None)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_proc", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--piece_chars", type=int, default=20000)
    a = p.parse_args(argv)
    if a.files is None and a.hf_dataset is None and a.out_dir is None:
        a.out_dir = f"data/shakespeare_{a.tokenizer}"
    if a.out_dir is None:
        p.error("--out_dir is required for --files / --hf_dataset")
    files = a.files.split(",") if a.files else None
    meta = prepare(a.out_dir, a.tokenizer, files, a.hf_dataset, a.hf_config, a.hf_split, a.streaming, a.text_column,
                   a.max_docs, a.max_tokens, a.val_fraction, a.seed, a.num_proc, a.piece_chars)
    print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['train_documents']} / {meta['val_documents']} documents), tokenizer {meta['tokenizer']}")


if __name__ == "__main__":
    main()
