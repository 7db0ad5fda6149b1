# LLaMA-60M (full), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 58.1M with the paper's 32000-token vocabulary; 76.8M with GPT-2 BPE (50257), which we use.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 1.2 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 64 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (64 * 256 * n_gpus) = 1 on 8 GPUs, 8 on 1 GPU.
# Schedule: 10,000 steps = 1.3B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/full_llama_60m.py

out_dir = "out/full_llama_60m"
data_dir = "data/c4_gpt2_1.3b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=1.34e+09 --out_dir=data/c4_gpt2_1.3b"
arch = "llama"
n_layer = 8
n_head = 8
n_embd = 512
intermediate_size = 1376
block_size = 256
param = "full"
batch_size = 64
total_batch_tokens = 131072  # 512 * 256
max_iters = 10000
warmup_iters = 1000
learning_rate = 0.001  # GaLore's full-rank baseline
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
