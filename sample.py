"""
Sample text from a checkpoint written by train.py.

    python sample.py                                  # from out/ckpt.pt or out/ckpt_dcp/ (FSDP runs)
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=2 --max_new_tokens=500
    python sample.py --start=FILE:prompt.txt --temperature=0 # greedy, prompt read from a file
"""
import sys
from pathlib import Path

import torch

from parallel import load_for_inference
from prepare_data import get_tokenizer
from train import load_config

DEFAULTS = dict(out_dir="out", start="\n", num_samples=3, max_new_tokens=300, temperature=0.8, top_k=200,
                seed=1337, device="auto")


def main(argv):
    c = load_config(argv, DEFAULTS)
    device = torch.device(c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_for_inference(c["out_dir"])
    model.to(device)
    tok = get_tokenizer(ckpt["data_meta"]["tokenizer"])
    start = Path(c["start"][5:]).read_text() if c["start"].startswith("FILE:") else c["start"]
    ids = tok.encode(start) or [tok.eot_token]
    x = torch.tensor([ids], dtype=torch.long, device=device).repeat(c["num_samples"], 1)
    torch.manual_seed(c["seed"])
    top_k = c["top_k"] or None
    y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=top_k)
    for row in y.tolist():
        print(tok.decode(row))
        print("-" * 60)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
