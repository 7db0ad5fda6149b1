# tools/ablate.py at the LLaMA-60M dimensions arXiv 2509.18993 trains, for one GPU:
#   python tools/ablate.py configs/ablate_llama_60m.py        (5.3 min on one H100 with --torch_compile: results/ablate_gpu_60m.md)
# Dims: h 512, h_ff 1376, 8 heads, 8 layers. Non-embedding parameters: full 25.31M; CR-Net at r = 128 = h/4
#   (layers 2..8) 11.92M = 0.471x; lowrank/cola at r = 152 (tools/ablate.py's match) 11.88M = 0.997x of CR-Net.
# Data: the bundled Shakespeare in GPT-2 BPE (vocab 50257; 1.41M train tokens), because it needs no download.
#   400 steps x 64 seq x 256 tok = 16,384 tokens/step = 6.6M tokens, ~4.6 epochs (on an H100 no variant's
#   val loss had turned up yet by step 400; the table shows best and final val loss). For the paper's setting (C4, 1.3B tokens):
#   --data_dir=data/c4_gpt2_1.3b --total_batch_tokens=131072 --max_iters=10000 --warmup_iters=1000 (configs/crnet_llama_60m.py).
ablate_dir = "out/ablate_60m"         # an tools/ablate.py key
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
