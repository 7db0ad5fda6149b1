"""
Sample text from a checkpoint written by train.py.

    python sample.py                                  # from out/ckpt.pt or out/ckpt_dcp/ (FSDP runs)
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=2 --max_new_tokens=500
    python sample.py --start=FILE:prompt.txt --temperature=0 # greedy, prompt read from a file
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import configurator
from checkpoint import load_for_inference
from parallel import check_device, pick_device
from prepare_data import get_tokenizer

# ----------------------------------------------------------------------------- config
out_dir = "out"             # the run to sample from (its ckpt.pt or ckpt_dcp/)
start = "\n"                # the prompt, or FILE:path to read it from a file
num_samples = 3             # [>=1]
max_new_tokens = 300        # [>=1]
temperature = 0.8           # 0 = greedy [>=0]
top_k = 200                 # keep the k most likely tokens; 0 = all [>=0]
seed = 1337                 # [0,4294967296)
device = "auto"             # "auto" = cuda, else mps, else cpu
cpu_threads = 0             # 0 = torch's default; 1 is often faster on a machine busy with other work [>=0]
# -----------------------------------------------------------------------------


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, vocab=None):
    """Sample max_new_tokens after idx (B, T); temperature 0 means greedy. vocab: the tokenizer's ids, where the
    model's head is padded beyond them (vocab_size 50304 for GPT-2's 50257: rows no target ever trained)."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.block_size:])
        logits = logits[:, -1, :vocab].double()  # a tiny temperature is still > 0 here (float32 rounds 1e-300 to 0)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = (logits - logits.max(-1, keepdim=True).values) / temperature  # <= 0: no inf - inf at tiny ones
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def main(argv):
    c, _ = configurator.load(argv, "sample.py", doc=__doc__)
    check_device(c["device"], cpu_threads=c["cpu_threads"])
    device = pick_device(c["device"], 0)
    if c["cpu_threads"]:
        torch.set_num_threads(c["cpu_threads"])
    model, ckpt = load_for_inference(c["out_dir"])
    model.to(device)
    ev, best = ckpt.get("last_eval"), ckpt["best_val_loss"]  # checkpoints from before last_eval: the best so far
    said = (f"val loss {ev['val_loss']:.4f} at iteration {ev['iter']}" if ev else f"best val loss {best:.4f}"
            if best < float("inf") else "not evaluated yet")  # a run stopped before its first eval
    print(f"sampling from {ckpt['path']} (iteration {ckpt['iter']}, {said})", flush=True)
    tok = get_tokenizer(ckpt["data_meta"]["tokenizer"])
    if c["start"].startswith("FILE:") and not Path(c["start"][5:]).is_file():
        raise configurator.ConfigError("start", c["start"], f"prompt file {c['start'][5:]} not found")
    try:
        start = Path(c["start"][5:]).read_text() if c["start"].startswith("FILE:") else c["start"]
    except UnicodeDecodeError as e:
        raise configurator.ConfigError("start", c["start"], f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tok.encode(start) or [tok.eot_token]
    x = torch.tensor([ids], dtype=torch.long, device=device).repeat(c["num_samples"], 1)
    torch.manual_seed(c["seed"])
    top_k = c["top_k"] or None
    y = generate(model, x, c["max_new_tokens"], temperature=c["temperature"], top_k=top_k,
                 vocab=ckpt["data_meta"]["vocab_size"])
    for row in y.tolist():
        print(tok.decode(row))
        print("-" * 60)


if __name__ == "__main__":
    configurator.main_guard(main)
