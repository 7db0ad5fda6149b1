# LLaMA-1B (full), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 1339.1M with the paper's 32000-token vocabulary; 1413.9M with GPT-2 BPE (50257), which we use.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 22.6 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 32 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (32 * 256 * n_gpus) = 16 on 1 GPU, 2 on 8.
# Schedule: 100,000 steps = 13.1B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/full_llama_1b.py

out_dir = "out/full_llama_1b"
data_dir = "data/c4_gpt2_13b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=1.34e+10 --out_dir=data/c4_gpt2_13b"
arch = "llama"
n_layer = 24
n_head = 32
n_embd = 2048
intermediate_size = 5461
block_size = 256
param = "full"
batch_size = 32
total_batch_tokens = 131072  # 512 * 256
max_iters = 100000
warmup_iters = 10000
learning_rate = 0.001  # GaLore's full-rank baseline
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
recompute = "auto"  # none where it fits the GPU, else block
