"""A decoder-only transformer of the Llama / Qwen2 family, written out by hand, with a preallocated KV cache.

One class (`Transformer`) covers Llama-style checkpoints (SmolLM2, TinyLlama, Llama 3) and Qwen2 (q/k/v bias):
RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, pre-norm residual blocks,
a final RMSNorm and a tied or untied output embedding. Parameter names equal the Hugging Face ones
(`model.layers.0.self_attn.q_proj.weight`, ...), so a checkpoint loads by name and saves back unchanged.

Positions come from the attention mask (`cumsum(mask) - 1`), so a left-padded row gives exactly the logits of the
same row run alone. The RL stage depends on that (PPO's ratio must be 1 before the first update).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicai import MinicaiError
from minicai.data import atomic_write_text

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelConfig:
    """The shape of the network, read from (and written back to) a Hugging Face config.json."""

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

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a HF config dict (hub style or transformers-5 style, where rope_theta sits in rope_parameters)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES or any(a not in SUPPORTED_ARCHITECTURES.values() for a in archs):
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
            raise MinicaiError(
                f"{source}: unsupported model_type={model_type!r} architectures={archs!r}; "
                f"minicai supports {supported}. Use a Llama- or Qwen2-family checkpoint."
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise MinicaiError(f"{source}: missing required key {key!r}; the file is not a complete HF config.")
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
        if hf.get("rope_scaling") or rope_type not in ("default", None):
            raise MinicaiError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE).")
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
            "attention_bias", "max_position_embeddings", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
            "architectures", "rope_scaling",
        }
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict:
        """The config.json that transformers' AutoModelForCausalLM reads back as the same network."""
        hf = dict(self.extra)
        hf.update(
            architectures=[SUPPORTED_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        return hf


def tiny_config(**overrides) -> ModelConfig:
    """A tiny Llama-style config for tests: 2 layers, GQA (4 query heads, 2 KV heads), vocab 128."""
    cfg = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=256, model_type="llama", bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


# Packed decoding weights (Transformer.decoding) on the CPU; MINICAI_PACKED=0 turns them off (plain nn.Linear).
PACKED_DECODING = _onednn_available() and os.environ.get("MINICAI_PACKED", "1") != "0"
# Every other weight product on the CPU through oneDNN (`linear`); MINICAI_ONEDNN_LINEAR=0 gives plain F.linear.
ONEDNN_LINEAR = _onednn_available() and os.environ.get("MINICAI_ONEDNN_LINEAR", "1") != "0"


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


def pack_weight(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """A frozen copy of a linear weight [out, in] in oneDNN's blocked layout, for inputs of about `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b with a weight from pack_weight (no autograd). Equals F.linear to floating-point rounding."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """x @ W^T + b with oneDNN's CPU kernel. Backward: grad_x = grad @ W (oneDNN again, as a product with the
    weight W^T), grad_W = grad^T @ x and grad_b = sum of grad (plain torch, which is as fast there)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # grad [..., out]
        x, weight = ctx.saved_tensors
        grad_x = (torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")  # [..., in]
                  if ctx.needs_input_grad[0] else None)
        grad_w = grad.flatten(0, -2).t() @ x.flatten(0, -2) if ctx.needs_input_grad[1] else None  # [out, in]
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x). On the CPU (float32/bfloat16) the forward product (and the backward's grad @ W) goes through
    oneDNN, which is 10-18% faster than torch's default CPU product (MKL) at this project's shapes: a few hundred
    tokens by 576-1536 features, as in every full forward pass of PPO, PM scoring and SFT. Equal to F.linear up to
    float rounding; the same inputs always give the same bits, with or without autograd. Elsewhere (float64, GPU)
    it is F.linear itself."""
    w = layer.weight
    if ONEDNN_LINEAR and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
        return _OneDNNLinear.apply(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


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

    def copy_prefix(self, prefix: "KVCache") -> None:
        """Start every row with the tokens of `prefix`, a filled batch-1 cache (Transformer.encode_prefix)."""
        n = prefix.length
        for layer in range(len(self.k)):
            self.k[layer][:, :, :n] = prefix.k[layer][:, :, :n]
            self.v[layer][:, :, :n] = prefix.v[layer][:, :, :n]
        self.key_mask[:, :n] = prefix.key_mask[:, :n]
        self.length = n


@dataclass
class FlatRows:
    """How one forward pass lays out B rows of T tokens (with padding, and maybe a prefix of L tokens they all start
    with) as one sequence: the prefix once, then only the rows' real tokens, row after row.

    The per-token work (norms, every weight product, the MLP) runs over those L + n tokens (n = real tokens in the
    rows), so neither padding nor B copies of the prefix cost anything; under autograd the prefix's share of each
    weight's gradient comes out of the same product as the rows' share. Only attention treats the parts apart: the
    prefix attends causally to itself, and each row (scattered back into [B, T], padding as zeros that no query may
    read) to the whole prefix and then to its own tokens."""

    length: int  # L, the shared prefix (0 = none)
    rows: int  # B
    cols: int  # T
    real: torch.Tensor | None  # [n] where the real tokens sit in the flattened [B * T] rows (None: no padding)
    bias: torch.Tensor | None  # [1, 1, groups * L, L] additive causal mask of the prefix over itself (None if L = 0)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """The rows' tokens of a flat tensor back into their [B, T] places: [..., L + n, X] -> [B, ..., T, X],
        zeros at padding (a tensor with a heads axis [1, heads, L + n, Dh] becomes [B, heads, T, Dh])."""
        t = t[0, ..., self.length :, :]  # [..., n, X]
        if self.real is not None:
            full = t.new_zeros(*t.shape[:-2], self.rows * self.cols, t.shape[-1])
            t = full.index_copy(full.dim() - 2, self.real, t)
        t = t.unflatten(-2, (self.rows, self.cols))  # [..., B, T, X]
        return t.movedim(-3, 0)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The rows' real tokens, in flat order: [B, T, ...] -> [n, ...] (the inverse of scatter)."""
        t = t.flatten(0, 1)
        return t if self.real is None else t.index_select(0, self.real)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with grouped-query attention. q [B, H, T, Dh]; k, v [B, Hkv, S, Dh];
    attn_bias [B, 1, groups * T, S] (0 = may attend, -inf = may not). Returns [B, T, H * Dh].

    Query head h reads KV head h // groups. Rather than copying K and V `groups` times, each group's queries are
    folded into the query axis: [B, Hkv, groups * T, Dh] against [B, Hkv, S, Dh]."""
    B, H, T, Dh = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, (H // Hkv) * T, Dh)
    if T == 1:
        # One new token (decoding): written out, since for a single query row this is cheaper on the CPU than the
        # fused kernel's setup. The scale and the mask go in with the product (baddbmm); softmax in float32 at least.
        scores = torch.baddbmm(attn_bias.expand(B, Hkv, H // Hkv, k.shape[2]).reshape(B * Hkv, H // Hkv, -1),
                               q.reshape(B * Hkv, H // Hkv, Dh), k.reshape(B * Hkv, -1, Dh).transpose(1, 2),
                               alpha=1.0 / math.sqrt(Dh))
        probs = scores.softmax(-1, dtype=torch.promote_types(v.dtype, torch.float32)).to(v.dtype)
        y = torch.bmm(probs, v.reshape(B * Hkv, -1, Dh))  # [B * Hkv, groups, Dh]
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # scale 1/sqrt(head_dim)
    return y.view(B, H, T, Dh).transpose(1, 2).reshape(B, T, H * Dh)


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
        self.packed: dict | None = None  # packed decoding weights, set only inside Transformer.decoding

    def forward(self, x, cos, sin, attn_bias, cache: KVCache | None = None, layer: int = 0,
                flat: FlatRows | None = None):
        # x: [B, T, D]; attn_bias: [B, 1, groups * T, S] additive mask, S = the keys attended to (the cache's filled
        # length with a cache, else T). Flattened, x is [1, L + n, D] (FlatRows) and attn_bias is the rows' mask over
        # [prefix | own tokens]: [B, 1, groups * T, L + T].
        B, T, _ = x.shape
        c = self.c
        H, Hkv, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        if self.packed:  # decoding (Transformer.decoding): q, k and v from one product with a packed, fused weight
            qkv = packed_linear(x, *self.packed["qkv"])  # [B, T, (H + 2 Hkv) Dh]
            qk = apply_rope(qkv[..., : (H + Hkv) * Dh].view(B, T, H + Hkv, Dh), cos, sin)  # one rotation for both
            q, k = qk.split([H, Hkv], dim=2)
            v = qkv[..., (H + Hkv) * Dh :].view(B, T, Hkv, Dh)
        else:
            q = apply_rope(linear(self.q_proj, x).view(B, T, H, Dh), cos, sin)  # [B, T, H, Dh]
            k = apply_rope(linear(self.k_proj, x).view(B, T, Hkv, Dh), cos, sin)  # [B, T, Hkv, Dh]
            v = linear(self.v_proj, x).view(B, T, Hkv, Dh)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: [B, heads, T, Dh]
        if flat is not None:  # the prefix attends to itself; each row to the prefix, then to its own tokens
            L = flat.length
            k_rows, v_rows = flat.scatter(k), flat.scatter(v)  # [B, Hkv, T, Dh]
            if L:
                k_rows = torch.cat([k[:, :, :L].expand(flat.rows, -1, -1, -1), k_rows], dim=2)  # [B, Hkv, L+T, Dh]
                v_rows = torch.cat([v[:, :, :L].expand(flat.rows, -1, -1, -1), v_rows], dim=2)
            y = flat.gather(attend(flat.scatter(q), k_rows, v_rows, attn_bias))  # [n, H * Dh]
            if L:
                y = torch.cat([attend(q[:, :, :L], k[:, :, :L], v[:, :, :L], flat.bias)[0], y])  # [L + n, H * Dh]
            y = y[None]
        else:
            if cache is not None:  # write this step's keys/values into the buffers, attend over everything so far
                start = cache.length
                cache.k[layer][:, :, start : start + T] = k
                cache.v[layer][:, :, start : start + T] = v
                k = cache.k[layer][:, :, : start + T]
                v = cache.v[layer][:, :, : start + T]
            y = attend(q, k, v, attn_bias)  # [B, T, H * Dh]
        return packed_linear(y, *self.packed["o"]) if self.packed else linear(self.o_proj, y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.packed: dict | None = None  # packed decoding weights, set only inside Transformer.decoding

    def forward(self, x):
        if self.packed:  # decoding: gate and up from one product with a packed, fused weight
            gate, up = packed_linear(x, self.packed["gate_up"]).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self.packed["down"])
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, attn_bias, cache=None, layer=0, flat=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_bias, cache, layer, flat)
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
        self.packed_head: torch.Tensor | None = None  # set only inside decoding()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model["embed_tokens"].weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- the forward pass -------------------------------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None, prefix=None):
        """input_ids [B, T] (attention_mask [B, T], 1 = real token, 0 = padding) -> final-norm hidden [B, T, D].

        Alone: positions = cumsum(mask) - 1, causal attention restricted to real keys.
        With a cache: the T new tokens continue the cached sequence (and are written into it).
        With a prefix (token ids [L]): every row continues the same prefix, as if it were [prefix | row], and the
        prefix is computed once for all rows; gradients flow through it into every weight.
        Without a cache, only real tokens are computed (FlatRows): the hidden states at padding are zeros.
        In every case `attention_mask` covers only the T new tokens, and only their hidden states are returned."""
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        new_mask = attention_mask.bool()
        flat = None
        if cache is not None:
            start = cache.length
            cache.key_mask[:, start : start + T] = new_mask
            key_mask = cache.key_mask[:, : start + T]  # [B, S]
        else:
            prefix = torch.as_tensor([] if prefix is None else prefix, dtype=torch.long, device=device)
            start = len(prefix)
            key_mask = torch.cat([torch.ones(B, start, dtype=torch.bool, device=device), new_mask], dim=1)
            padded = not bool(new_mask.all())
            if start or padded:
                real = new_mask.flatten().nonzero().squeeze(1) if padded else None
                bias = self._attention_bias(key_mask[:1, :start], start) if start else None
                flat = FlatRows(start, B, T, real, bias)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B, T]
        attn_bias = self._attention_bias(key_mask, T)  # one mask for every layer
        if flat is not None:  # one sequence of L + n tokens: the prefix, then the rows' real tokens
            input_ids = torch.cat([prefix, flat.gather(input_ids)])[None]  # [1, L + n]
            positions = torch.cat([torch.arange(start, device=device), flat.gather(positions)])[None]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        x = self.model["embed_tokens"](input_ids)
        for i, block in enumerate(self.model["layers"]):
            x = block(x, cos, sin, attn_bias, cache, i, flat)
        if cache is not None:
            cache.length += T
        x = self.model["norm"](x)
        return x if flat is None else flat.scatter(x)  # [B, T, D]

    def _attention_bias(self, key_mask: torch.Tensor, T: int) -> torch.Tensor:
        """The additive attention mask of the last T of S positions: key_mask [B, S] (True = real token) ->
        [B, 1, groups * T, S], 0 where a query may attend (causal, real keys) and -inf where not, already in the
        grouped-query layout of `attend`."""
        B, S = key_mask.shape
        q_idx = torch.arange(T, device=key_mask.device)[:, None] + (S - T)
        k_idx = torch.arange(S, device=key_mask.device)[None, :]
        allowed = (k_idx <= q_idx)[None] & key_mask[:, None, :]  # [B, T, S]: causal and real
        # A padding query would see no key at all (NaN softmax); let it see itself. Its output is never used.
        allowed = allowed | (k_idx == q_idx)[None]
        groups = self.config.num_heads // self.config.num_kv_heads
        allowed = allowed[:, None, None].expand(B, 1, groups, T, S).reshape(B, 1, groups * T, S)
        return torch.zeros(allowed.shape, dtype=self.dtype, device=key_mask.device).masked_fill(~allowed, float("-inf"))

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> logits [B, T, V] in the model's dtype."""
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., D] -> logits [..., V]."""
        return packed_linear(hidden, self.packed_head) if self.packed_head is not None else linear(self.lm_head, hidden)

    @contextmanager
    def decoding(self, batch: int):
        """Inside this block, inference uses packed copies of the weights (CPU only; a no-op elsewhere).

        Decoding a token reads every weight once, so on the CPU its speed is how fast the matrix products stream
        weights from memory. torch's default CPU product (MKL) streams about 11 GB/s on this project's 2-core
        AMD EPYC at batch 1 to 16; oneDNN's kernel with weights reordered into its blocked layout (what
        torch.compile's CPU backend does) streams 16-23 GB/s, more with q/k/v and gate/up fused into one product
        each (bench/bench_generate.py). The copies are frozen snapshots, so this is for no-grad use while the
        weights do not change (sampling.generate); they are freed on exit. Costs one extra copy of the weights
        while active and about 0.2 s to build for a 135M model."""
        use = PACKED_DECODING and self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        if not use or torch.is_grad_enabled():
            yield self
            return
        cat = lambda *ws: torch.cat([w.detach() for w in ws])  # noqa: E731
        try:
            for block in self.model["layers"]:
                a, m = block.self_attn, block.mlp
                qkv_bias = cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) if a.q_proj.bias is not None else None
                a.packed = {"qkv": (pack_weight(cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), batch),
                                    qkv_bias),
                            "o": (pack_weight(a.o_proj.weight, batch),
                                  None if a.o_proj.bias is None else a.o_proj.bias.detach())}
                m.packed = {"gate_up": pack_weight(cat(m.gate_proj.weight, m.up_proj.weight), batch),
                            "down": pack_weight(m.down_proj.weight, batch)}
            self.packed_head = pack_weight(self.lm_head.weight, batch)
            yield self
        finally:
            for block in self.model["layers"]:
                block.self_attn.packed = block.mlp.packed = None
            self.packed_head = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def encode_prefix(self, prefix_ids) -> KVCache:
        """Keys and values of a token sequence [L] that every row of a batch starts with, computed once (batch 1).

        Chat prompts share their opening (the system message, a few-shot block), so generation can compute it once
        instead of once per row: copy the result into a generation cache (KVCache.copy_prefix). Each row then
        continues as [prefix | row] run whole would (equal to floating-point rounding). Full forward passes share a
        prefix through hidden_states(..., prefix=ids) instead."""
        ids = torch.as_tensor(prefix_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        cache = self.new_cache(1, ids.shape[1])
        self.hidden_states(ids, cache=cache)
        return cache

    # ---- loading and saving -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "Transformer":
        """Load a HF-layout directory (config.json + model.safetensors or a sharded index). Strict on tensor names."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            raise MinicaiError(f"{path}: model directory not found. Pass --model DIR with a HF-layout model "
                               "(config.json, model.safetensors, tokenizer.json), or omit it for the default model.")
        config = load_config(path)
        files = _safetensors_files(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        tensors = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints store the head too; the embedding is the one used
                    if name not in expected:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise MinicaiError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model "
                                           f"with {config.num_layers} layers (is config.json from the same model?)")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(expected[name].shape):
                        raise MinicaiError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                                           f"{tuple(expected[name].shape)}")
                    tensors[name] = t.to(dtype)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise MinicaiError(f"{path}: missing tensor(s) {', '.join(missing[:3])}{more} in the safetensors file(s)")
        model = model.to_empty(device=device).to(dtype)
        model.load_state_dict(tensors, strict=not config.tie_word_embeddings)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model["embed_tokens"].weight
        return model.eval()

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors (HF layout), atomically, loadable by transformers unchanged."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        hf = self.config.to_hf()
        hf["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
        tmp = path / f".model.safetensors.tmp{os.getpid()}"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / "model.safetensors")
        stale_index = path / "model.safetensors.index.json"
        if stale_index.exists():
            stale_index.unlink()


def load_config(path) -> ModelConfig:
    file = Path(path) / "config.json"
    if not file.exists():
        raise MinicaiError(f"{file}: not found; a model directory needs config.json (HF layout).")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MinicaiError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    return ModelConfig.from_hf(hf, source=str(file))


def _safetensors_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise MinicaiError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                       "weights are read; convert .bin checkpoints with transformers' save_pretrained).")


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
