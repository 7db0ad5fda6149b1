# The paper's LLaMA-60M dimensions as CR-Net on a laptop: Apple-silicon GPU (mps) or CPU, 16 GB of memory.
#   python train.py configs/laptop_60m.py          (device auto: cuda, else mps, else cpu)
# Dims: h 512, h_ff 1376, 8 heads, 8 layers, r 128 = h/4 in layers 2..8 (layer 1 full-rank), as
#   configs/crnet_llama_60m.py. 63.4M parameters with GPT-2 BPE (50257): 25.7M of them in the embedding and
#   another 25.7M in the untied head.
# Data: the bundled Shakespeare in GPT-2 BPE (prepared automatically on first use; 1.41M train tokens).
# Batch: 16 seq x 256 tok x 2 accum = 8,192 tokens/step. plan.py (--gpus=1 --gpu_gib=16 --dtype=float32):
#   4.9 GiB with no recompute, so it fits 16 GiB (measured on the CPU: 6.2 GiB peak RSS, runtime included).
# Schedule: 160 steps = 1.3M tokens (~0.9 epoch), 16 warmup, cosine to 10%: about an hour on a 2-core CPU.
# Measured on a 2-core CPU (float32, `--stop_iter=10`): 21-26 s per step (320-385 tokens/s), peak RSS 6.2 GiB;
#   loss from ln(50257) = 10.8 at init to 6.62 at step 10, val 6.45 (the val split's unigram entropy is 6.33);
#   the eval (2 x 32,768 tokens) about a minute; the log's ETA for 160 steps: 1.0 h. A laptop CPU with more cores,
#   or mps, should be faster: not measured here.
# Not measured on mps. dtype "auto" is float32 there: bf16 autocast on mps depends on the macOS and torch
#   versions, and float32 always works; --dtype=bfloat16 to try it.
out_dir = "out/laptop_60m"
data_dir = "data/shakespeare_gpt2"
arch = "llama"
n_layer = 8
n_head = 8
n_embd = 512
intermediate_size = 1376
block_size = 256
param = "crnet"
rank = 128
batch_size = 16
total_batch_tokens = 8192  # 16 * 256 * 2
max_iters = 160
warmup_iters = 16
learning_rate = 0.003
weight_decay = 0.0
eval_interval = 40
eval_tokens = 32768        # 128 windows of 256
log_interval = 10
