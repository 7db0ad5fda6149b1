# LLaMA-350M (full), the GaLore/C4 LLaMA dimensions that arXiv 2509.18993 trains.
# Parameters: 368.0M with the paper's 32000-token vocabulary; 405.4M with GPT-2 BPE (50257), which we use.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 6.5 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 64 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (64 * 256 * n_gpus) = 8 on 1 GPU, 1 on 8.
# Schedule: 60,000 steps = 7.9B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/full_llama_350m.py

out_dir = "out/full_llama_350m"
data_dir = "data/c4_gpt2_8b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=8.02e+09 --out_dir=data/c4_gpt2_8b"
arch = "llama"
n_layer = 24
n_head = 16
n_embd = 1024
intermediate_size = 2736
block_size = 256
param = "full"
batch_size = 64
total_batch_tokens = 131072  # 512 * 256
max_iters = 60000
warmup_iters = 6000
learning_rate = 0.001  # GaLore's full-rank baseline
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True
