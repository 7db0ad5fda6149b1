# Qwen-3-MoE at LLaMA-60M's scale (crnet): h 512, 8 layers, 8 query heads of 64, 4 key/value heads (q 512 wide, k and v 256),
# QK-norm, RoPE theta 1,000,000; each MLP a mixture of 8 SwiGLU experts of width 688, top-2 routing (renormalised), so a
# token runs 2 x 688 = 1376 wide, LLaMA-60M's SwiGLU width: 49.0M matmul parameters per token (LLaMA-60M: 51.0M).
# Parameters: 89.8M with GPT-2 BPE (50257), which we use (125.4M for the full-rank model); non-embedding 38.3M.
# Rank r = 128 = h/4 in layers 2..8; layer 1 full-rank. A CR-Net layer: attention r (3h + q + 2kv) + r (q + h) = 458,752,
#   router h x 8 = 4,096 (full-rank), 8 low-rank experts of r (2h + 2ff) + r (ff + h) = 460,800 each, 5 betas (q, k, v, o
#   and the MoE output's lane): 4.15M against 9.24M full-rank.
# Memory: fp32 weights + grads + AdamW state = 16 bytes/param = 1.4 GB per GPU under DDP, before activations.
# Batch: the paper's 512 sequences x 256 tokens = 131,072 tokens/step; 64 seq x 256 tok per GPU
#   -> grad_accum = 131072 / (64 * 256 * n_gpus) = 1 on 8 GPUs, 8 on 1 GPU.
# Schedule: 10,000 steps = 1.3B tokens, 10% warmup, cosine to 10% of peak (GaLore protocol).
# Data: data_recipe below (train.py prints it when data_dir has no prepared data): a folder of its own, whose 99%
#   train split holds as many tokens as the schedule reads (windows start at random: each is read about once).
# Launch: torchrun --standalone --nproc_per_node=8 train.py configs/crnet_qwen3_moe_60m.py

out_dir = "out/crnet_qwen3_moe_60m"
data_dir = "data/c4_gpt2_1.3b"
data_recipe = "python prepare_data.py --hf_dataset=allenai/c4 --hf_config=en --streaming --tokenizer=gpt2 --val_fraction=0.01 --max_tokens=1.34e+09 --out_dir=data/c4_gpt2_1.3b"
arch = "qwen3_moe"
n_layer = 8
n_head = 8
n_kv_head = 4
n_embd = 512
n_expert = 8
expert_top_k = 2
intermediate_size = 688  # each expert's SwiGLU width
router_aux_coef = 0.001  # Qwen3-MoE's load-balancing weight
block_size = 256
param = "crnet"
rank = 128
batch_size = 64
total_batch_tokens = 131072  # 512 * 256
max_iters = 10000
warmup_iters = 1000
learning_rate = 0.003  # as the LLaMA CR-Net configs: ~3x the full-rank lr (CoLA's rule of thumb); untuned here
weight_decay = 0.0  # GaLore protocol
eval_interval = 1000
eval_tokens = 10_000_000 // 256 * 256  # ~10M validation tokens
log_interval = 50
torch_compile = True  # the experts' loop (moe.mix) runs eagerly inside the compiled blocks
recompute = "auto"  # the fastest mode whose memory plan fits the GPU
