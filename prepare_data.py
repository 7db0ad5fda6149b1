"""
Tokenize text into train.bin / val.bin (flat uint16 token streams, one end-of-text token after
every document) plus meta.json, which train.py checks before it trains.

    python prepare_data.py                                   # bundled Shakespeare, byte tokenizer
    python prepare_data.py --tokenizer=gpt2                  # same corpus, GPT-2 BPE (r50k_base)
    python prepare_data.py --tokenizer=path/to/model.gguf    # a GGUF model's own BPE (needs gguf and tokenizers)
    python prepare_data.py --files=a.txt,b.txt --out_dir=data/mine
    python prepare_data.py --files='corpus/*.jsonl' --text_column=body --out_dir=data/mine
    python prepare_data.py --files=corpus/ --tokenizer=gpt2 --out_dir=data/mine      # every supported file inside
    python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --max_tokens=1.34e9 --tokenizer=gpt2 ...

Memory stays flat however large the corpus: documents are read, tokenized and appended to the output a batch
at a time. Plain .txt files are cut into documents of about --piece_chars characters at paragraph breaks, so
that a single-file corpus still gets a random split. val gets a share of the tokens within one document of
--val_fraction (each document goes whole to one side: see Splits below). Output appears only when complete: files are written to a temporary folder
next to out_dir and moved into place, meta.json last. A run that fails leaves out_dir as it was; one killed
leaves it as it was, or (killed among the final renames) without meta.json, which load_meta refuses, and a
.<out_dir>.tmp-* folder beside it that may be deleted.
"""
import codecs
import glob
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import configurator

ROOT = Path(__file__).resolve().parent
BUNDLED = ROOT / "data" / "shakespeare.txt"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "assets" / "tiktoken"))  # shipped r50k_base ranks: no network
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BATCH = 1024  # documents per tokenizer call: enough to keep its threads busy, few enough to keep memory flat
# tiktoken encodings whose ids do not fit uint16, with their vocabulary sizes: tiktoken knows a size only once it has
# the encoding's file, which it downloads, so these are refused by name (get_tokenizer checks any other after loading)
TIKTOKEN_TOO_BIG = {"cl100k_base": 100277, "o200k_base": 200019, "o200k_harmony": 201088}
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # (JSON true would pass as 1)
# meta.json's keys that readers rely on, each with its check (of the value and the keys above it) and why it fails
REQUIRED = {
    "tokenizer": (lambda v, m: isinstance(v, str) and v != "", "must be a tokenizer name (a non-empty string)"),
    "vocab_size": (lambda v, m: is_int(v) and 1 <= v <= 2 ** 16, "must be an integer in [1, 65536] (uint16 ids)"),
    "eot_token": (lambda v, m: is_int(v) and v >= 0, "must be an integer >= 0"),
    "max_token_id": (lambda v, m: is_int(v) and 0 <= v < m["vocab_size"],
                     "must be an integer >= 0 and below vocab_size={vocab_size}"),
    "dtype": (lambda v, m: v == "uint16", "must be \"uint16\": the token files are read as uint16"),
    "train_tokens": (lambda v, m: is_int(v) and v >= 0, "must be an integer >= 0"),
    "val_tokens": (lambda v, m: is_int(v) and v >= 0, "must be an integer >= 0"),
}

# ----------------------------------------------------------------------------- config
out_dir = ""            # output folder; "" = data/shakespeare_<tokenizer> for the bundled corpus
tokenizer = "byte"      # byte, gpt2 (= r50k_base, shipped), another tiktoken encoding whose ids fit uint16, or a .gguf model file (its own BPE)
files = ""              # comma-separated .txt / .jsonl / .json / .parquet files, globs and folders; "" = bundled
hf_dataset = ""         # a Hugging Face hub dataset instead of files, e.g. allenai/c4
hf_config = ""          # the hub dataset's config, e.g. en
hf_split = "train"      # the hub dataset's split
streaming = False       # read the hub dataset as it downloads instead of downloading it whole; needs a cap
text_column = "text"    # the field of .jsonl / .parquet / hub rows that holds the document
max_docs = 0            # stop after this many non-empty documents; 0 = no cap [>=0]
max_tokens = 0          # stop once this many tokens are written; 0 = no cap [>=0]
val_fraction = 0.1      # share of the tokens that goes to val.bin (0,1)
seed = 1337             # the split's random draw [>=0]
num_proc = 0            # tiktoken's threads (a GGUF's BPE sets its own); 0 = one per CPU core, at most 8 [>=0]
piece_chars = 20000     # .txt files are cut at the first paragraph break after this many characters [>=1]
overwrite = False       # replace out_dir when it already holds prepared data (a meta.json)
# -----------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256. Needs no files."""
    name, n_vocab, eot_token = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_docs(self, texts, threads=1):
        """(uint16 tokens of every text, each followed by end-of-text; tokens per document), vectorized."""
        raw = [t.encode("utf-8") for t in texts]
        lens = np.fromiter(map(len, raw), np.int64, len(raw))
        return np.insert(np.frombuffer(b"".join(raw), np.uint8).astype(np.uint16), np.cumsum(lens), 256), lens + 1


class TiktokenTokenizer:
    def __init__(self, name):
        import tiktoken
        self.name = name
        try:
            self.enc = tiktoken.get_encoding("r50k_base" if name == "gpt2" else name)
        except OSError as e:  # requests' errors are OSErrors: offline, or the download failed
            raise FileNotFoundError(
                f"tokenizer {name!r}: tiktoken could not fetch its BPE file ({type(e).__name__}); tiktoken downloads "
                f"it from the internet once into TIKTOKEN_CACHE_DIR (now {os.environ.get('TIKTOKEN_CACHE_DIR')}): "
                f"run once where the network is reachable, or use byte or gpt2 (shipped)") from None
        self.n_vocab, self.eot_token = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)

    def encode_docs(self, texts, threads=1):
        ids = self.enc.encode_ordinary_batch(texts, num_threads=threads)  # the BPE runs without the GIL
        lens = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
        eot = [self.eot_token]
        return np.fromiter(itertools.chain.from_iterable(x + eot for x in ids), np.uint16, int(lens.sum())), lens


def open_gguf(path):
    """gguf's reader of a .gguf file (llama.cpp's format), or a one-line error: the gguf package is optional."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading GGUF files needs the gguf package, which is optional: pip install gguf") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a damaged file (struct, numpy, unicode errors)
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# tokenizer.ggml.pre strings (as llama.cpp's converter writes them: "gpt-2", not its type name GPT2) whose
# pre-tokenizer llama.cpp runs as one of these two regex sequences (llama-vocab.cpp); other strings are refused.
# Digits first, then GPT-2's regex, is tokenizers' Digits(individual) + ByteLevel(use_regex); GPT-2's regex alone
# is ByteLevel(use_regex).
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
GPT2_ONLY = ("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0", "mellum",
             "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling")


class GGUFTokenizer:
    """The byte-level BPE a .gguf model file carries (tokenizer.ggml.model "gpt2": vocab, merges, pre-tokenizer
    type), built with the tokenizers package, so text is split as llama.cpp splits it for that model. Text is
    encoded as ordinary text (special tokens in it are not parsed), as tiktoken's encode_ordinary does."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ValueError(f"{path}: its tokenizer needs the tokenizers package, which is optional: "
                             f"pip install tokenizers") from None
        r = open_gguf(path)
        kind, pre = gguf_value(r, "tokenizer.ggml.model"), gguf_value(r, "tokenizer.ggml.pre")
        if kind != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported: only byte-level BPE ('gpt2')")
        if pre not in DIGITS_THEN_GPT2 + GPT2_ONLY:
            raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported: one of "
                             f"{', '.join(DIGITS_THEN_GPT2 + GPT2_ONLY)}")
        tokens, merges = gguf_value(r, "tokenizer.ggml.tokens"), gguf_value(r, "tokenizer.ggml.merges")
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges])
        self.tok = Tokenizer(bpe)
        split = [pre_tokenizers.Digits(individual_digits=True)] if pre in DIGITS_THEN_GPT2 else []
        self.tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.tok.decoder = decoders.ByteLevel()
        self.name, self.n_vocab = str(Path(path).resolve()), len(tokens)
        # documents are separated as in pretraining: <|endoftext|> where the vocabulary has it (an instruct model's
        # eos is its end-of-turn token), else the file's eos
        self.eot_token = vocab.get("<|endoftext|>", gguf_value(r, "tokenizer.ggml.eos_token_id"))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def encode_docs(self, texts, threads=1):
        ids = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]  # threads: tokenizers' own
        lens = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
        eot = [self.eot_token]
        return np.fromiter(itertools.chain.from_iterable(x + eot for x in ids), np.uint16, int(lens.sum())), lens


def get_tokenizer(name):
    too_big = lambda n: f"tokenizer {name!r} has {n} tokens; ids above 65535 do not fit the uint16 token files"
    if str(name).endswith(".gguf"):
        tok = GGUFTokenizer(name)
    elif name != "byte":
        import tiktoken
        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tokenizer {name!r}: choose byte, a tiktoken encoding "
                             f"({', '.join(tiktoken.list_encoding_names())}; gpt2 is r50k_base) or a .gguf model file")
        if name in TIKTOKEN_TOO_BIG:  # before tiktoken downloads a file only to be refused
            raise ValueError(too_big(TIKTOKEN_TOO_BIG[name]))
        tok = TiktokenTokenizer(name)
    else:
        tok = ByteTokenizer()
    if tok.n_vocab > 2 ** 16:
        raise ValueError(too_big(tok.n_vocab))
    return tok


# ----------------------------------------------------------------------------- reading documents
def cut_pieces(chunks, piece_chars):
    """Documents of a text given as consecutive chunks, each ending at the first paragraph break ("\\n\\n") after
    piece_chars characters (one in a later chunk waits for it). With none buffered, 4 * piece_chars are cut at a
    line break, or anywhere, so that a file of single-spaced lines still gives many documents and memory stays
    bounded (by a chunk)."""
    buf = ""
    for chunk in chunks:
        buf, start = buf + chunk, 0
        while True:
            cut = buf.find("\n\n", start + piece_chars)
            if cut >= 0:
                end = cut + 2
            elif len(buf) - start >= 4 * piece_chars:
                end = buf.find("\n", start + piece_chars, start + 4 * piece_chars) + 1 or start + 4 * piece_chars
            else:
                break
            yield buf[start:end]
            start = end
        buf = buf[start:]
    if buf:
        yield buf


def split_pieces(text, piece_chars):
    return list(cut_pieces([text], piece_chars))


def text_chunks(path):
    """A text file's contents a megabyte at a time, newlines translated as open() does."""
    decoder, line = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True), 1
    with open(path, "rb") as f:
        while True:
            raw = f.read(1 << 20)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                line += e.object[:e.start].count(b"\n")
                raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason}); is it a binary file?") from None
            yield text
            if not raw:
                return
            line += raw.count(b"\n")


def jsonl_problem(path):
    """'line N: cause' for the first line of a JSON-lines file that is not a JSON object, else None. datasets'
    reader only tells what went wrong somewhere in a 10 MB block, so a failed file is scanned again here."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                if b"\0" in line:
                    return f"line {n}: binary data (NUL bytes), not JSON lines"
                row = json.loads(line.decode("utf-8")) if line.strip() else {}
            except UnicodeDecodeError as e:
                return f"line {n}: not UTF-8 text ({e.reason}); is it a binary file?"
            except json.JSONDecodeError as e:
                return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n}: a JSON {type(row).__name__}, not an object"
    return None


def read_dataset(text_column, where, *args, **kwargs):
    """Lists of documents, BATCH rows at a time, of the datasets Dataset or IterableDataset that
    load_dataset(*args, **kwargs) gives: the one reader of local .jsonl / .json / .parquet files and of the hub.
    Errors name `where`, with their innermost cause (or, for a JSON-lines file, the line)."""
    if "datasets" not in sys.modules:  # else it imports torch (~180 MB) for a tensor format nothing here uses
        os.environ.setdefault("USE_TORCH", "0")
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors are re-raised below
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # a web request per file read, 3 s each where offline
    rows = None
    while True:
        try:
            if rows is None and str(where).startswith("hf:"):
                try:
                    rows = iter(datasets.load_dataset(*args, **kwargs).iter(batch_size=BATCH))
                except OSError as e:  # offline, unknown name, gated (network errors are OSErrors): say so in one line
                    raise FileNotFoundError(f"{where}: the Hugging Face hub could not provide it ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); run where the hub is "
                                            f"reachable, or download the data and pass --files") from None
            rows = rows or iter(datasets.load_dataset(*args, **kwargs).iter(batch_size=BATCH))
            batch = next(rows, None)
        except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError, StopIteration) as e:
            while e.__cause__ or e.__context__:
                e = e.__cause__ or e.__context__
            why = (str(where).endswith(".jsonl") and jsonl_problem(where)) or f"{type(e).__name__}: {e}".splitlines()[0]
            raise ValueError(f"{where}: {why}") from None
        if batch is None:
            return
        if text_column not in batch:
            raise ValueError(f"{where}: text column {text_column!r} not in the data; columns are {list(batch)} "
                             f"(use --text_column)")
        if (wrong := next((t for t in batch[text_column] if not isinstance(t, (str, type(None)))), None)) is not None:
            raise ValueError(f"{where}: column {text_column!r} holds a {type(wrong).__name__} ({wrong!r:.40}), not text")
        yield [t for t in batch[text_column] if t]


def resolve_files(entries):
    """(paths, format) of the files that entries name: files, globs, and folders (their supported files,
    recursively, sorted, hidden ones skipped, as datasets does). One format per run."""
    paths = []
    for e in filter(None, (str(e).strip() for e in entries)):
        if any(c in e for c in "*?["):
            found, why = sorted(glob.glob(e, recursive=True)), f"no file matches {e!r}"
        elif Path(e).is_dir():
            found = sorted(str(p) for p in Path(e).rglob("*") if p.suffix.lower() in FORMATS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(e).parts))
            why = f"folder {e} holds no {' / '.join(FORMATS)} files"
        else:
            found, why = [e] if Path(e).is_file() else [], f"data file not found: {e}"
        if not found:
            raise FileNotFoundError(why)
        paths += found
    kinds = {FORMATS.get(Path(p).suffix.lower()): p for p in paths}
    if None in kinds:
        raise ValueError(f"{kinds[None]}: files must all be one of {sorted(FORMATS)}")
    if len(kinds) > 1:
        raise ValueError(f"files mix formats ({', '.join(f'{p} is {k}' for k, p in kinds.items())}): one format per run")
    return list(dict.fromkeys(paths)), kinds.popitem()[0]


def local_batches(paths, kind, text_column, piece_chars):
    for path in paths:
        if kind == "text":
            pieces = cut_pieces(text_chunks(path), piece_chars)
            while batch := list(itertools.islice(pieces, BATCH)):
                yield batch
        elif os.path.getsize(path):  # (datasets fails on an empty file, which adds nothing anyway)
            # streaming, for local files too: no Arrow copy of the corpus in the cache, no memory-mapped reads
            yield from read_dataset(text_column, path, kind, data_files=[path], split="train", streaming=True)


# ----------------------------------------------------------------------------- writing
class Splits:
    """train.bin and val.bin as they are appended to. The split cannot wait for the whole corpus (it may be
    streamed, and is never held), so each document is decided as it comes: it goes to val with probability
    val_fraction + debt / its length, clipped to [0, 1], where debt = val_fraction * tokens so far - val tokens
    so far: a seeded coin that leans against the running error. Each choice keeps |debt| at most the longest
    document so far, so val's token share is within one document of val_fraction at every point of the stream
    (a cap included), and val's documents come from the whole corpus, not from its end."""

    def __init__(self, folder, val_fraction, seed):
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in ("train", "val")}
        self.tokens, self.docs = {"train": 0, "val": 0}, {"train": 0, "val": 0}
        self.fraction, self.debt, self.rng, self.max_id = val_fraction, 0.0, np.random.default_rng(seed), 0

    def add(self, flat, lens):
        is_val, debt, f = np.empty(len(lens), bool), self.debt, self.fraction
        for i, (n, u) in enumerate(zip(lens.tolist(), self.rng.random(len(lens)).tolist())):
            debt += f * n
            is_val[i] = v = debt >= u * n
            debt -= n if v else 0
        self.debt = debt
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            self.write(split, flat[np.repeat(chosen, lens)], int(chosen.sum()))
        self.max_id = max(self.max_id, int(flat.max()))
        self.last = (flat[len(flat) - int(lens[-1]):].copy(), "val" if is_val[-1] else "train")

    def write(self, split, ids, docs):
        self.files[split].write(ids.tobytes())
        self.tokens[split], self.docs[split] = self.tokens[split] + len(ids), self.docs[split] + docs

    def close(self):
        """Flush to disk; a tiny source whose documents all fell on one side gives its last one to the other."""
        if sum(self.docs.values()) < 2:
            raise ValueError("need at least 2 documents (pieces) to make a train and a val split"
                             if any(self.docs.values()) else "the source contains no text (every document is empty)")
        ids, side = self.last
        if not (self.docs["train"] and self.docs["val"]):
            self.files[side].truncate(2 * (self.tokens[side] - len(ids)))  # flushes, then drops its last document
            self.tokens[side], self.docs[side] = self.tokens[side] - len(ids), self.docs[side] - 1
            self.write("val" if side == "train" else "train", ids, 1)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())  # on disk before a rename publishes it
            f.close()


def write_tokens(batches, tok, splits, max_docs, max_tokens, threads):
    """Tokenize batch after batch into splits until the source or a cap ends, with a progress bar on stderr."""
    from tqdm import tqdm
    docs = tokens = 0
    start = time.time()
    with tqdm(desc="tokenizing", unit=" docs", total=max_docs or None, file=sys.stderr, mininterval=1) as bar:
        for texts in batches:
            texts = [t for t in texts if t and not t.isspace()][:(max_docs - docs) if max_docs else None]
            if not texts:
                continue
            flat, lens = tok.encode_docs(texts, threads)
            if max_tokens:  # keep the documents that start below the cap, as a stream cut there would
                keep = int(np.searchsorted(np.cumsum(lens) - lens, max_tokens - tokens))
                flat, lens = flat[:int(lens[:keep].sum())], lens[:keep]
            splits.add(flat, lens)
            docs, tokens = docs + len(lens), tokens + int(lens.sum())
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / max(time.time() - start, 1e-6):,.0f} tokens/s", refresh=False)
            bar.update(len(lens))
            if (max_docs and docs >= max_docs) or (max_tokens and tokens >= max_tokens):
                break


def prepare(out_dir, tokenizer="byte", files=None, hf_dataset="", hf_config="", hf_split="train", streaming=False,
            text_column="text", max_docs=0, max_tokens=0, val_fraction=0.1, seed=1337, num_proc=0, piece_chars=20000):
    """Tokenize local files (a list, or comma-separated entries) or a hub dataset (neither: the bundled corpus)
    into out_dir; returns meta. On any error out_dir is left as it was."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    max_docs, max_tokens = int(max_docs or 0), int(max_tokens or 0)
    if streaming and not (max_docs or max_tokens):
        raise ValueError("streaming needs a cap: set --max_docs or --max_tokens")
    if files and hf_dataset:
        raise ValueError("give files or hf_dataset, not both")
    configurator.check_folder("out_dir", str(out_dir))  # (not after tokenizing the whole corpus)
    tok = get_tokenizer(tokenizer)
    if hf_dataset:
        batches = read_dataset(text_column, f"hf:{hf_dataset}", hf_dataset, hf_config or None, split=hf_split,
                               streaming=streaming)  # the hub: one call, then read as the local files are
        source = f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f":{hf_split}"
    else:
        entries = files.split(",") if isinstance(files, str) else [str(f) for f in files or []]
        entries = [e.strip() for e in entries if e.strip()] or [str(BUNDLED)]
        batches = local_batches(*resolve_files(entries), text_column, piece_chars)
        rel = lambda e: str(Path(e).resolve().relative_to(ROOT)) if Path(e).resolve().is_relative_to(ROOT) else e
        source = ",".join(map(rel, entries))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))  # same disk: renames are atomic
    try:
        splits = Splits(tmp, val_fraction, seed)
        write_tokens(batches, tok, splits, max_docs, max_tokens, num_proc or min(8, os.cpu_count() or 1))
        splits.close()
        meta = {"format": 2, "tokenizer": tok.name, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token,
                "max_token_id": splits.max_id, "dtype": "uint16", "source": source, "split_seed": seed,
                "val_fraction": val_fraction}
        for s in ("train", "val"):
            meta[f"{s}_tokens"], meta[f"{s}_documents"] = splits.tokens[s], splits.docs[s]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        configurator.fsync(tmp / "meta.json")  # (Splits.close synced the token files)
        out_dir.mkdir(exist_ok=True)
        configurator.fsync(out_dir.parent)  # (out_dir's own entry, if it is new)
        (out_dir / "meta.json").unlink(missing_ok=True)  # no meta.json = incomplete, until the new one lands
        configurator.fsync(out_dir)  # (that, before any new file lands beside it)
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp / name, out_dir / name)
        configurator.fsync(out_dir)  # the renames themselves: on disk before the caller relies on them
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_meta(data_dir):
    """Read and check a prepared dataset; a clear error for anything missing or corrupt."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first (python prepare_data.py --out_dir={data_dir})")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{meta_path} is corrupt: not UTF-8 text ({e.reason}); re-run prepare_data.py") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is corrupt: {e}") from None
    for key, (ok, why) in REQUIRED.items():
        if not isinstance(meta, dict) or key not in meta:
            raise ValueError(f"{meta_path} has no {key!r}: corrupt, or from an older prepare_data.py; re-run prepare_data.py")
        if not ok(meta[key], meta):  # a hand-edited or damaged value would fail later, far from its cause
            raise ValueError(f"{meta_path}: {key}={json.dumps(meta[key])[:60]} {why.format_map(meta)}; "
                             f"re-run prepare_data.py")
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-run prepare_data.py")
        if path.stat().st_size != 2 * meta[f"{split}_tokens"]:
            raise ValueError(f"{path} has {path.stat().st_size} bytes but meta.json says {meta[f'{split}_tokens']} "
                             f"uint16 tokens: the file is truncated or corrupt; re-run prepare_data.py")
    return meta


# ----------------------------------------------------------------------------- for train.py
BUNDLED_DIRS = {f"data/shakespeare_{t}": t for t in ("byte", "gpt2")}  # data dirs made from the bundled corpus on demand


def find_data(c):
    """train.py's data_dir as (data dir, meta or None if it is a bundled one not prepared yet). Missing data that
    cannot be made here is an error that prints the command that makes it (c["data_recipe"], or the generic one)."""
    data_dir = Path(c["data_dir"])
    if not (data_dir / "meta.json").is_file() and c["data_dir"] in BUNDLED_DIRS:
        data_dir = ROOT / data_dir
    if (data_dir / "meta.json").is_file() or c["data_dir"] in BUNDLED_DIRS:
        return data_dir, (load_meta(data_dir) if (data_dir / "meta.json").is_file() else None)
    how = c["data_recipe"] or f"python prepare_data.py --files=<your text files> --out_dir={c['data_dir']}"
    raise FileNotFoundError(f"{data_dir} holds no prepared data ({data_dir / 'meta.json'} is missing); make it with:\n  {how}")


def check_data(c, data_dir, meta):
    """The token files against a train.py config: each split more than one block, every id inside the vocabulary."""
    for s in ("train", "val"):
        n = meta[f"{s}_tokens"]
        if n <= c["block_size"] + 1:
            raise ValueError(f"{data_dir / (s + '.bin')} holds {n} tokens, not more than one block of "
                             f"block_size={c['block_size']} (+1 for the targets): prepare more data or lower block_size")
    vocab = meta["vocab_size"]
    if c["vocab_size"] is not None and c["vocab_size"] < vocab:  # (load_meta: max_token_id < vocab_size)
        raise configurator.ConfigError("vocab_size", c["vocab_size"], f"is smaller than the data's vocabulary ({vocab}, tokenizer "
                          f"{meta['tokenizer']!r} in {data_dir}): token ids would overflow the embedding")


def schedule_reads(c, meta):
    """How many times max_iters reads the train split (train.py's data line, the preflight): above 1, tokens repeat."""
    return f"train read {c['max_iters'] * c['total_batch_tokens'] / meta['train_tokens']:.3g} times by max_iters"


def ready_data(c, proc=0, world=1, say=print):
    """train.py's data dir and meta. A bundled corpus's dir is prepared on first use, by process 0 while the
    others wait."""
    data_dir, meta = find_data(c)
    if meta is None:
        if proc == 0:
            note_unfinished(data_dir, f"preparation of {data_dir}", say)
            say(f"preparing {data_dir} from the bundled corpus")
            prepare(data_dir, tokenizer=BUNDLED_DIRS[c["data_dir"]])
        if world > 1:
            import torch.distributed  # here, not at the top: tokenizing data needs no torch
            torch.distributed.barrier()
        meta = load_meta(data_dir)
    return data_dir, {**meta, "tokens_sha1": tokens_sha1(data_dir)}  # saved with each checkpoint


def note_unfinished(where, what, say=print):
    """Names the .<name>.tmp-* folders beside `where` that a writer killed mid-way (prepare, tools/hf.py's export)
    left: only a finished one is renamed into place, and a killed process cannot remove its own."""
    for left in sorted(Path(where).parent.glob(f".{Path(where).name}.tmp-*")):
        say(f"note: {left} is an unfinished {what}: one killed (delete it to free its space) or one still running")


def tokens_sha1(data_dir, n=2 ** 20):
    """A fingerprint of the token files, SHA-1 of each split's first and last MiB: a resumed run tells data prepared
    again from other text (same token counts or not) from its own, for the price of reading 4 MiB. A change only in
    the middle of a split over 2 MiB goes unseen."""
    h = hashlib.sha1()
    for split in ("train", "val"):
        with open(Path(data_dir) / f"{split}.bin", "rb") as f:
            h.update(f.read(n))
            f.seek(max(n, os.fstat(f.fileno()).st_size - n))
            h.update(f.read(n))
    return h.hexdigest()


def open_splits(c, data_dir, meta):
    """(train, val) as memory-mapped uint16 tokens, once check_data has passed."""
    check_data(c, data_dir, meta)
    return tuple(np.memmap(data_dir / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val"))


def check_token_ids(c, data_dir, meta, splits, firsts, device):
    """An id beyond the vocabulary (a meta.json that understates it) would fail inside F.embedding, on CUDA as a
    device-side assert. Before the first step every process reads the ids of its first batches (firsts) and of the
    evaluation windows (fixed, so every later eval is covered), and all agree on the largest."""
    import torch  # here, not at the top: tokenizing data needs no torch
    T = c["block_size"]
    evals = [int(d[:min(c["eval_tokens"] // T, (len(d) - 1) // T) * T + 1].max()) for d in splits]
    top = torch.tensor([max(int(t.max()) for xy in firsts for t in xy), *evals])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        top = top.to(device)
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    for split, m in zip(("train", "train", "val"), top.tolist()):
        if m >= c["vocab_size"]:
            raise ValueError(f"{data_dir / (split + '.bin')} holds token id {m}, beyond the model's vocabulary of "
                             f"{c['vocab_size']} ({data_dir / 'meta.json'} says vocab_size {meta['vocab_size']}, "
                             f"max_token_id {meta['max_token_id']}): prepare the data again, or start a run with "
                             f"--vocab_size={m + 1}")


def unigram_entropy(data, vocab_size):
    """Entropy (nats) of the token distribution: the loss of the best model that ignores context."""
    p = np.bincount(data, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def main(argv):
    c, _ = configurator.load(argv, "prepare_data.py", doc=__doc__)
    if not c["out_dir"] and (c["files"] or c["hf_dataset"]):
        raise configurator.ConfigError("out_dir", "", "needed with --files or --hf_dataset")
    out = c["out_dir"] or f"data/shakespeare_{Path(c['tokenizer']).name.split('.')[0]}"  # a .gguf: its name
    where = Path(out if c["out_dir"] else ROOT / out)
    if (where / "meta.json").is_file() and not c["overwrite"]:  # a run may be training on it
        raise configurator.ConfigError("out_dir", out, "already holds prepared data (meta.json); pass --overwrite "
                                                       "to replace it, or choose another out_dir")
    held = [n for n in ("train.bin", "val.bin") if (where / n).exists()]
    if held and not c["overwrite"]:  # e.g. nanoGPT's data (meta.pkl), or a landing cut short
        raise configurator.ConfigError("out_dir", out, f"holds {' and '.join(held)} without meta.json (another tool's "
                                                       f"data?); pass --overwrite to replace them, or choose another out_dir")
    note_unfinished(where, f"prepare_data.py into {out}")
    meta = prepare(where, **{k: v for k, v in c.items() if k not in ("out_dir", "overwrite")})
    print(f"wrote {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['train_documents']} / {meta['val_documents']} documents), tokenizer {meta['tokenizer']}")


if __name__ == "__main__":
    configurator.main_guard(main)
