"""The PyTorch reference: nanoGPT's model and training loop, on the CPU.

    python -m bench.torch_gpt --threads 2 --out result.json            # eager
    python -m bench.torch_gpt --threads 2 --compile --out result.json  # nanoGPT's defaults
    python -m bench.torch_gpt --model small --compile                   # the default job's model

`--compile` is what nanoGPT's train.py does by default: `torch.compile(model)`
and `AdamW(fused=True)`; it is the peer the project is measured against.

Same shape as the Keras reference (bench/common.py REFERENCE: 4 layers, 4
heads, width 128, FFN 512, block 64, batch 12, 96 characters), same data
(the built-in corpus as characters), AdamW with global-norm clipping, as in
nanoGPT's train.py (model.py's GPT: pre-norm blocks, causal
scaled_dot_product_attention, GELU MLP, learned positions, tied output
embedding). `--model small` is the `small` preset (the default job's model:
vocabulary 4,000, batch 8, its dropout), on the same token ids as
`python -m bench.step --model small`. Needs `pip install torch==2.13.0` (the
`bench` extra).
"""

from __future__ import annotations

import argparse
import math
import sys

from bench.common import emit, flops_per_token, median_time, model_and_data, timing_arguments


def build_gpt(
    vocab: int,
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_ff: int,
    seq_len: int,
    dropout: float = 0.0,
):
    """nanoGPT's GPT (model.py), trimmed to what training uses; bias=True.

    `dropout` sits where nanoGPT puts it (and Keras's model too): after the embeddings, on
    the attention weights, after the attention projection and after the MLP.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(d_model, 3 * d_model)
            self.c_proj = nn.Linear(d_model, d_model)
            self.resid_dropout = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(d_model, dim=2)
            q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout if self.training else 0.0, is_causal=True
            )
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.attn = CausalSelfAttention()
            self.mlp = nn.Sequential(
                nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
            )

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, d_model)
            self.wpe = nn.Embedding(seq_len, d_model)
            self.drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d_model)
            self.lm_head = nn.Linear(d_model, vocab, bias=False)
            self.wte.weight = self.lm_head.weight  # tied, as in nanoGPT
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            pos = torch.arange(idx.size(1), device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.torch_gpt", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--model", choices=("reference", "small"), default="reference")
    p.add_argument("--batch", type=int, default=0, help="batch (default: the model's)")
    p.add_argument(
        "--dropout", type=float, default=None, help="dropout rate (default: the model's)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="nanoGPT's defaults: torch.compile(model) and AdamW(fused=True)",
    )
    timing_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    import os

    import numpy as np
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg, batch, tokens, vocab = model_and_data(args.model, args.batch)
    dropout = model_cfg.dropout if args.dropout is None else args.dropout
    shape = {
        k: getattr(model_cfg, k) for k in ("n_layers", "n_heads", "d_model", "d_ff", "seq_len")
    }
    model = build_gpt(vocab, **shape, dropout=dropout)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.98),
        fused=args.compile or None,
    )
    if args.compile:
        model = torch.compile(model)
    data = torch.from_numpy(tokens.astype(np.int64))
    block, generator = shape["seq_len"], torch.Generator().manual_seed(0)

    def get_batch():  # nanoGPT's get_batch: random windows
        ix = torch.randint(len(data) - block - 1, (batch,), generator=generator)
        x = torch.stack([data[i : i + block] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
        return x, y

    model.train()

    def step():
        x, y = get_batch()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # wait for the step, as the Keras benchmark does

    seconds, blocks = median_time(step, args.warmup, args.steps, args.repeats)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "framework": f"pytorch {torch.__version__} "
        + ("torch.compile, fused AdamW" if args.compile else "eager"),
        "model": args.model,
        "threads": threads,
        "batch_per_rank": batch,
        "dropout": dropout,
        "seq_len": block,
        "parameters": params,
        "ms_per_step": seconds * 1e3,
        "blocks_ms": [b * 1e3 for b in blocks],
        "tokens_per_sec": batch * block / seconds,
        "flops_per_token": flops_per_token(params, shape["n_layers"], shape["d_model"], block),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
