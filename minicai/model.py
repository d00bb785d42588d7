"""A decoder-only transformer of the Llama / Qwen2 family, written out by hand: the reference implementation.

One class (`Transformer`) covers Llama-style checkpoints (SmolLM2, TinyLlama, Llama 3) and Qwen2 (q/k/v bias):
RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, pre-norm residual blocks,
a final RMSNorm and a tied or untied output embedding. Parameter names equal the Hugging Face ones
(`model.layers.0.self_attn.q_proj.weight`, ...), so a checkpoint loads by name and saves back unchanged
(checkpoint.py reads and writes them).

Positions come from the attention mask (`cumsum(mask) - 1`), so a left-padded row gives exactly the logits of the
same row run alone. The RL stage depends on that (PPO's ratio must be 1 before the first update).

This file is the specification. minicai/fast.py computes the same thing faster on the CPU (only real tokens, a
shared prefix once, packed decoding weights, oneDNN products); tests/test_fast.py holds it to this file.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """The shape of the network (checkpoint.py reads it from, and writes it back to, a HF config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias: True for Qwen2
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back on save


def tiny_config(**overrides) -> ModelConfig:
    """A tiny Llama-style config for tests: 2 layers, GQA (4 query heads, 2 KV heads), vocab 128."""
    cfg = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=256, model_type="llama", bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as the reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32) if dtype != torch.float64 else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for rotary embeddings at the given positions [B, T] -> two [B, T, 1, head_dim] tensors.

    Frequencies theta^(-2i/d) for i < d/2, each used twice (the "rotate half" layout of HF Llama checkpoints).
    The sine table carries the rotation's sign: -sin on the first half, +sin on the second (see apply_rope).
    Angles are computed in float32 (float64 for float64 models) and cast to the model dtype afterwards."""
    calc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=calc) / head_dim))
    angles = positions.to(calc)[..., None] * inv_freq  # [B, T, head_dim/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype)[:, :, None], torch.cat([-sin, sin], dim=-1).to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of a head by the position's angle a:
    (x_i cos a - x_{i+d/2} sin a, x_{i+d/2} cos a + x_i sin a). x: [B, T, heads, head_dim]; the halves swapped
    (a roll by d/2) times the signed sine table of rope_cos_sin gives the second terms."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache:
    """Preallocated key/value buffers for every layer: [B, n_kv_heads, max_len, head_dim] each (gpt-fast style).

    `length` is how many positions are filled; `key_mask` [B, max_len] says which of them are real tokens (0 for
    left padding and for the pad tokens fed to rows that have already stopped)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values [B, Hkv, T, Dh] after the filled part; return all of them so far
        [B, Hkv, length + T, Dh]. (Transformer.hidden_states advances `length` once every layer has written.)"""
        start, T = self.length, k.shape[2]
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        return self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]

    def repeat_rows(self, repeats: int, max_len: int) -> "KVCache":
        """A new cache of B * repeats rows with room for max_len positions, row i * repeats + r starting as row i
        of this one: one prompt, computed once, continued several ways (feedback.option_logprobs)."""
        n, rows = self.length, self.key_mask.shape[0] * repeats
        fork = copy.copy(self)
        fork.k = [t.new_zeros(rows, t.shape[1], max_len, t.shape[3]) for t in self.k]
        fork.v = [t.new_zeros(rows, t.shape[1], max_len, t.shape[3]) for t in self.v]
        for layer in range(len(self.k)):
            fork.k[layer][:, :, :n] = self.k[layer][:, :, :n].repeat_interleave(repeats, 0)
            fork.v[layer][:, :, :n] = self.v[layer][:, :, :n].repeat_interleave(repeats, 0)
        fork.key_mask = self.key_mask.new_zeros(rows, max_len)
        fork.key_mask[:, :n] = self.key_mask[:, :n].repeat_interleave(repeats, 0)
        fork.max_len = max_len
        return fork

    def copy_prefix(self, prefix: "KVCache") -> None:
        """Start every row with the tokens of `prefix`, a filled batch-1 cache (Transformer.encode_prefix)."""
        n = prefix.length
        for layer in range(len(self.k)):
            self.k[layer][:, :, :n] = prefix.k[layer][:, :, :n]
            self.v[layer][:, :, :n] = prefix.v[layer][:, :, :n]
        self.key_mask[:, :n] = prefix.key_mask[:, :n]
        self.length = n


def attention_bias(key_mask: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of the last T of S positions: key_mask [B, S] (True = real token) ->
    [B, 1, T, S], 0 where a query may attend (causal, real keys) and -inf where not."""
    S = key_mask.shape[1]
    q_idx = torch.arange(T, device=key_mask.device)[:, None] + (S - T)
    k_idx = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (k_idx <= q_idx)[None] & key_mask[:, None, :]  # [B, T, S]: causal and real
    # A padding query would see no key at all (NaN softmax); let it see itself. Its output is never used.
    allowed = (allowed | (k_idx == q_idx)[None])[:, None]  # [B, 1, T, S]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(~allowed, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with grouped-query attention: q [B, H, T, Dh]; k, v [B, Hkv, S, Dh];
    bias [B, 1, T, S]. Query head h reads KV head h // (H / Hkv). Returns [B, T, H * Dh]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, S, Dh]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, Dh]; scale 1/sqrt(head_dim)
    return y.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        # Llama's attention_bias also puts a bias on o_proj; Qwen2 has q/k/v bias only.
        o_bias = c.attention_bias and c.model_type == "llama"
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=o_bias)

    def forward(self, x, cos, sin, bias, cache: KVCache | None = None, layer: int = 0):
        # x: [B, T, D]; bias: [B, 1, T, S], S = T without a cache, the cache's filled length + T with one
        B, T, _ = x.shape
        H, Hkv, Dh = self.c.num_heads, self.c.num_kv_heads, self.c.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, Dh), cos, sin).transpose(1, 2)  # [B, H, T, Dh]
        k = apply_rope(self.k_proj(x).view(B, T, Hkv, Dh), cos, sin).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # [B, Hkv, T, Dh]
        if cache is not None:  # continue the cached sequence: attend over everything so far
            k, v = cache.update(layer, k, v)  # [B, Hkv, S, Dh]
        return self.o_proj(attend(q, k, v, bias))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, bias, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The causal language model. `forward(ids, mask)` -> logits; `hidden_states` feeds the preference model's head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config) for _ in range(config.num_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model["embed_tokens"].weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None, prefix=None):
        """input_ids [B, T] (attention_mask [B, T], 1 = real token, 0 = padding) -> final-norm hidden [B, T, D].

        Alone: positions = cumsum(mask) - 1, causal attention restricted to real keys.
        With a cache: the T new tokens continue the cached sequence (and are written into it).
        With a prefix (token ids [L], no cache): every row continues the same prefix, as if it were [prefix | row].
        In every case `attention_mask` covers only the T new tokens, and only their hidden states are returned."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if prefix is not None and len(prefix):  # the definition (fast.py computes the prefix once for all rows)
            prefix = torch.as_tensor(prefix, dtype=torch.long, device=input_ids.device).expand(B, -1)  # [B, L]
            ids = torch.cat([prefix, input_ids], dim=1)
            mask = torch.cat([torch.ones_like(prefix), attention_mask.long()], dim=1)
            return self.hidden_states(ids, mask)[:, prefix.shape[1] :]
        start = 0 if cache is None else cache.length
        key_mask = attention_mask.bool()  # [B, S]: which keys are real tokens
        if cache is not None:
            cache.key_mask[:, start : start + T] = key_mask
            key_mask = cache.key_mask[:, : start + T]
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B, T]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        bias = attention_bias(key_mask, T, self.dtype)  # [B, 1, T, S], one mask for every layer
        x = self.model["embed_tokens"](input_ids)  # [B, T, D]
        for i, block in enumerate(self.model["layers"]):
            x = block(x, cos, sin, bias, cache, i)
        if cache is not None:
            cache.length += T
        return self.model["norm"](x)

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> logits [B, T, V] in the model's dtype."""
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., D] -> logits [..., V]."""
        return self.lm_head(hidden)

    def decoding(self, batch: int):
        """A block inside which the weights stay fixed and no gradients are taken (sampling.generate). Here it does
        nothing; fast.py uses it to build packed copies of the weights for the CPU."""
        return nullcontext(self)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def encode_prefix(self, prefix_ids) -> KVCache:
        """Keys and values of a token sequence [L] that every row of a batch starts with, computed once (batch 1).

        Chat prompts share their opening (the system message, a few-shot block), so generation can compute it once
        instead of once per row: copy the result into a generation cache (KVCache.copy_prefix). Each row then
        continues as [prefix | row] run whole would (equal to floating-point rounding)."""
        ids = torch.as_tensor(prefix_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        cache = self.new_cache(1, ids.shape[1])
        self.hidden_states(ids, cache=cache)
        return cache

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", fast: bool = False):
        """Load a HF-layout directory (checkpoint.load_model: strict on tensor names and shapes). fast=True gives
        the same model with fast.py's CPU path (on the CPU only; elsewhere this model as it is)."""
        from minicai.checkpoint import load_model

        return load_model(path, dtype=dtype, device=device, fast=fast, cls=cls)

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors (HF layout), atomically, loadable by transformers unchanged."""
        from minicai.checkpoint import save_model

        save_model(self, path)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix common to every prompt, leaving at least one token of each prompt after
    it (so each row still ends on a token of its own); 0 for fewer than two prompts."""
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms) for tests and tiny experiments."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype).eval()
