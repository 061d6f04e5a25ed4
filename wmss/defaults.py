"""The method's defaults (WMSS paper, arXiv 2602.08222), named once and used everywhere."""

IGNORE_INDEX = -100

# WD-JT: z_mix = LAMBDA * z_strong + (1 - LAMBDA) * z_weak.
LAMBDA = 0.5

# WD-DS: p_i ∝ ALPHA * [-dH_i]_+ + BETA * H(strong; x_i) + GAMMA * [dH_i]_+.
ALPHA = 0.1
BETA = 0.8
GAMMA = 0.1

# Optimisation (paper section 5): AdamW, lr 1e-5, 10% warm-up, gradient clipping at 1.0.
LEARNING_RATE = 1e-5
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
MAX_LENGTH = 4096
SFT_EPOCHS = 1
WMSS_EPOCHS = 1
ROUNDS = 1

# LoRA runs (wmss train --lora): the adapters' rank (alpha defaults to twice the rank).
LORA_RANK = 16
