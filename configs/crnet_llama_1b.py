# LLaMA-1B (crnet), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 582.4M with the paper's 32000-token vocabulary; 657.2M with GPT-2 BPE (50257), which we use.
# Rank r = 448 in layers 2..24 (the paper reports 583M at 1B); layer 1 full-rank.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 10.5 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 32 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (32 * 256 * n_gpus) = 16 on 1 GPU, 2 on 8.
# Schedule: 100,000 steps = 13.1B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/crnet_llama_1b.py

out_dir = "out/crnet_llama_1b"
data_dir = "data/c4_gpt2_13b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=1.34e+10 --out_dir=data/c4_gpt2_13b"
arch = "llama"
n_layer = 24
n_head = 32
n_embd = 2048
intermediate_size = 5461
block_size = 256
param = "crnet"
rank = 448
batch_size = 32
total_batch_tokens = 131072  # 512 * 256
max_iters = 100000
warmup_iters = 10000
learning_rate = 0.003  # the paper gives no lr for this size: low-rank factors usually want ~3x the full-rank lr (CoLA); untuned here
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
recompute = "auto"  # the fastest mode whose memory plan fits the GPU: none, else crnet (the paper's Algorithm 1), else reversible
