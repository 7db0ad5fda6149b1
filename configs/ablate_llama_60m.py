# ablate.py at the paper's LLaMA-60M dimensions (method note, section 3), for one GPU:
#   python ablate.py configs/ablate_llama_60m.py        (~64 GPU-minutes for the 4 default variants: not yet measured)
# Dims: h 512, h_ff 1376, 8 heads, 8 layers. Non-embedding parameters: full 25.7M; CR-Net at r = 128 = h/4
#   (layers 2..8) 12.0M = 0.47x; lowrank/cola get the rank that matches CR-Net within 2% (ablate.py).
# Data: the bundled Shakespeare in GPT-2 BPE (vocab 50257; ~1.3M train tokens), because a lent GPU machine has
#   no internet. 400 steps x 64 seq x 256 tok = 16,384 tokens/step = 6.6M tokens, ~5 epochs: the models will
#   start to overfit, so compare best as well as final val loss. For the paper's setting (C4, 1.3B tokens):
#   --data_dir=data/c4_gpt2 --total_batch_tokens=131072 --max_iters=10000 --warmup_iters=1000 (configs/crnet_llama_60m.py).
ablate_dir = "out/ablate_60m"         # an ablate.py key
data_dir = "data/shakespeare_gpt2"
arch = "llama"
n_layer = 8
n_head = 8
n_embd = 512
intermediate_size = 1376
block_size = 256
rank = 128                    # CR-Net, layers 2..8: h / 4
batch_size = 64
total_batch_tokens = 16384    # 64 * 256, one GPU, no accumulation
max_iters = 400
warmup_iters = 40
learning_rate = 0.003         # one lr for every variant (same schedule); untuned, as the paper's per-method lrs are not in the note
weight_decay = 0.0            # GaLore protocol
eval_interval = 50
eval_tokens = 131072          # 512 windows of 256
log_interval = 10
