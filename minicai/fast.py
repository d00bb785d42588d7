"""The same model, faster on the CPU: minicai/model.py is the specification, this file only makes it quick.

Nothing here is needed to understand the method. `make_fast(model)` (what `Transformer.from_pretrained(...,
fast=True)` and the scripts' default do on the CPU; `--no-fast` skips it) swaps the classes of the model's modules
for the subclasses below, in place: parameter names, values and state_dict stay as they are. What they change:

- FlatRows (full forward passes: PPO, PM scoring, SFT): the per-token work runs over the rows' real tokens only, as
  one sequence, and a prompt prefix that every row shares is computed once (model.py's definition runs it B times).
- Packed decoding weights (`decoding`, used by sampling.generate): frozen copies of the weights in oneDNN's blocked
  layout, with q/k/v and gate/up fused into one product each; decoding a token streams every weight once, so on the
  CPU its speed is how fast the products read weights from memory.
- OneDNNLinear: every other weight product through oneDNN's CPU kernel (with a hand-written backward).
- One-query attention: for the single new token of a decoding step, a plain baddbmm/softmax/bmm instead of SDPA.
- keep_freed_memory: a process-level malloc setting, turned on explicitly by the scripts (run.setup), never on import.

Measured effects are in BENCHMARKS.md; tests/test_fast.py holds every path to model.py (values, gradients, padding
not computed). MINICAI_PACKED=0 and MINICAI_ONEDNN_LINEAR=0 turn single features off for ablations (bench/).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicai.model import MLP, Attention, KVCache, Transformer, apply_rope, attention_bias, rope_cos_sin


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def cpu_has_low_precision_products(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices in hardware (oneDNN's check). Without it (an AVX2-only CPU)
    torch emulates them, 5x (forward products) to 80x (input gradients) slower than float32 (measured on an AMD EPYC
    with AVX2, BENCHMARKS.md)."""
    try:
        check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
        return _onednn_available() and bool(check())
    except (AttributeError, RuntimeError, KeyError):
        return False


# Packed decoding weights (FastTransformer.decoding); MINICAI_PACKED=0 turns them off (plain products).
PACKED_DECODING = _onednn_available() and os.environ.get("MINICAI_PACKED", "1") != "0"
# Every other weight product through oneDNN (OneDNNLinear); MINICAI_ONEDNN_LINEAR=0 gives plain F.linear.
ONEDNN_LINEAR = _onednn_available() and os.environ.get("MINICAI_ONEDNN_LINEAR", "1") != "0"
# Both of them in bf16 too (bf16 weights, or float32 weights under bf16 autocast), only where the CPU has them: oneDNN's
# bf16 products need AVX512 (BW, VL, DQ) or AVX-NE-CONVERT. Elsewhere (an AVX2-only CPU) packing or multiplying a bf16
# weight raises, so these paths step aside and autocast runs torch's own products (the code path CUDA runs).
ONEDNN_BF16 = cpu_has_low_precision_products(torch.bfloat16)


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's products (OneDNNLinear, packed decoding weights) take operands of this dtype here."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and ONEDNN_BF16)


def make_fast(model: Transformer) -> Transformer:
    """The CPU fast path for `model`, in place (module classes swapped; parameters, names and values unchanged).
    Only on the CPU: a model elsewhere is returned as it is (model.py's reference path)."""
    if model.device.type != "cpu" or isinstance(model, FastTransformer):
        return model
    for module in model.modules():
        if type(module) is nn.Linear and ONEDNN_LINEAR and module is not model.lm_head:  # the head: `logits`
            module.__class__ = OneDNNLinear
        elif type(module) in (Attention, MLP):
            module.__class__ = FastAttention if type(module) is Attention else FastMLP
            module.packed = None  # packed decoding weights, set only inside FastTransformer.decoding
    model.__class__ = FastTransformer
    model.packed_head = None
    return model


def pack_weight(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """A frozen copy of a linear weight [out, in] in oneDNN's blocked layout, for inputs of about `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b with a weight from pack_weight (no autograd). Equals F.linear to floating-point rounding. x is
    taken in the packed weight's dtype, as autocast takes a float32 input to a bf16 product (a no-op otherwise)."""
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")


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
    """layer(x), with the product through oneDNN on the CPU (float32; bfloat16 where the CPU has it): faster than
    torch's default CPU product at this project's shapes (a few hundred tokens by 576-1536 features). Equal to
    F.linear up to float rounding; the same inputs always give the same bits, with or without autograd. Elsewhere
    it is F.linear, and so is it under autocast (the oneDNN call bypasses autocast's casts; precision.autocast)."""
    w = layer.weight
    if (ONEDNN_LINEAR and w.device.type == "cpu" and onednn_dtype(w.dtype)
            and not torch.is_autocast_enabled("cpu")):
        return _OneDNNLinear.apply(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


class OneDNNLinear(nn.Linear):
    """nn.Linear through `linear` (oneDNN on the CPU); the projections inside the blocks become these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)


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
    """model.attend in the grouped layout: softmax(q k^T / sqrt(d) + bias) v. q [B, H, T, Dh]; k, v [B, Hkv, S, Dh];
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


class FastAttention(Attention):
    """Attention with three more layouts: packed decoding weights, FlatRows, and one-query decoding (attend)."""

    packed: dict | None

    def forward(self, x, cos, sin, attn_bias, cache: KVCache | None = None, layer: int = 0,
                flat: FlatRows | None = None):
        # x: [B, T, D]; attn_bias: [B, 1, groups * T, S] additive mask, S = the keys attended to (the cache's filled
        # length with a cache, else T). Flattened, x is [1, L + n, D] (FlatRows) and attn_bias is the rows' mask over
        # [prefix | own tokens]: [B, 1, groups * T, L + T].
        B, T, _ = x.shape
        c = self.c
        H, Hkv, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        if self.packed:  # decoding (FastTransformer.decoding): q, k and v from one product with a packed, fused weight
            qkv = packed_linear(x, *self.packed["qkv"])  # [B, T, (H + 2 Hkv) Dh]
            qk = apply_rope(qkv[..., : (H + Hkv) * Dh].view(B, T, H + Hkv, Dh), cos, sin)  # one rotation for both
            q, k = qk.split([H, Hkv], dim=2)
            v = qkv[..., (H + Hkv) * Dh :].view(B, T, Hkv, Dh)
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, Dh), cos, sin)  # [B, T, H, Dh]
            k = apply_rope(self.k_proj(x).view(B, T, Hkv, Dh), cos, sin)  # [B, T, Hkv, Dh]
            v = self.v_proj(x).view(B, T, Hkv, Dh)
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
                k, v = cache.update(layer, k, v)
            y = attend(q, k, v, attn_bias)  # [B, T, H * Dh]
        return packed_linear(y, *self.packed["o"]) if self.packed else self.o_proj(y)


class FastMLP(MLP):
    packed: dict | None

    def forward(self, x):
        if self.packed:  # decoding: gate and up from one product with a packed, fused weight
            gate, up = packed_linear(x, self.packed["gate_up"]).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self.packed["down"])
        return super().forward(x)


def grouped_bias(key_mask: torch.Tensor, T: int, dtype: torch.dtype, groups: int) -> torch.Tensor:
    """model.attention_bias [B, 1, T, S] in the grouped-query layout of `attend`: [B, 1, groups * T, S]."""
    bias = attention_bias(key_mask, T, dtype)
    B, _, _, S = bias.shape
    return bias[:, :, None].expand(B, 1, groups, T, S).reshape(B, 1, groups * T, S)


class FastTransformer(Transformer):
    """Transformer with FlatRows full passes and packed decoding weights (see the module docstring)."""

    packed_head: torch.Tensor | None

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None, prefix=None):
        """model.Transformer.hidden_states, computed differently: without a cache, only real tokens are computed
        (FlatRows), the hidden states at padding are zeros, and a prefix is computed once for all rows (gradients
        flow through it into every weight)."""
        B, T = input_ids.shape
        device = input_ids.device
        groups = self.config.num_heads // self.config.num_kv_heads
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
                bias = grouped_bias(key_mask[:1, :start], start, self.dtype, groups) if start else None
                flat = FlatRows(start, B, T, real, bias)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B, T]
        attn_bias = grouped_bias(key_mask, T, self.dtype, groups)  # one mask for every layer
        if flat is not None:  # one sequence of L + n tokens: the prefix, then the rows' real tokens
            input_ids = torch.cat([prefix, flat.gather(input_ids)])[None]  # [1, L + n]
            positions = torch.cat([torch.arange(start, device=device), flat.gather(positions)])[None]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        x = self.model["embed_tokens"](input_ids)
        for i, block in enumerate(self.model["layers"]):
            x = x + block.self_attn(block.input_layernorm(x), cos, sin, attn_bias, cache, i, flat)
            x = x + block.mlp(block.post_attention_layernorm(x))
        if cache is not None:
            cache.length += T
        x = self.model["norm"](x)
        return x if flat is None else flat.scatter(x)  # [B, T, D]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """model.Transformer.new_cache, but under bf16 autocast the keys and values are stored in bf16. Autocast's
        attention products read them in bf16 anyway, so rounding each once when it is written gives the same
        numbers as rounding the whole cache at every decoding step, which an float32 cache costs (the same tokens
        and log-probs, tests/test_fast.py)."""
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        dtype = amp if amp == torch.bfloat16 and self.device.type == "cpu" else self.dtype
        return KVCache(self.config, batch, max_len, dtype, self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., D] -> logits [..., V]."""
        return packed_linear(hidden, self.packed_head) if self.packed_head is not None else linear(self.lm_head, hidden)

    @contextmanager
    def decoding(self, batch: int):
        """Inside this block, inference uses packed copies of the weights (CPU, float32 or bfloat16, no grad).

        oneDNN's kernel with weights reordered into its blocked layout (what torch.compile's CPU backend does)
        streams weights faster than torch's default CPU product at batch 1 to 16, more with q/k/v and gate/up
        fused into one product each (bench/bench_generate.py). The copies are frozen snapshots, so this is for
        no-grad use while the weights do not change (sampling.generate); they are freed on exit. Costs one extra
        copy of the weights while active. Under bf16 autocast (float32 weights, precision.py) the copies are the
        weights cast to bf16 once, what autocast would otherwise cast (and oneDNN reorder) at every product of
        every decoding step; the products then compute what autocast's do (bf16 operands, bf16 result)."""
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        dtype = amp or self.dtype  # the dtype the products run in
        use = (PACKED_DECODING and self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
               and onednn_dtype(dtype))  # fp16 autocast, or bf16 on a CPU without oneDNN bf16: plain products
        if not use or torch.is_grad_enabled():
            yield self
            return
        cast = lambda w: w.detach().to(dtype)  # noqa: E731  (the weight itself when it has that dtype)
        cat = lambda *ws: torch.cat([cast(w) for w in ws])  # noqa: E731
        try:
            for block in self.model["layers"]:
                a, m = block.self_attn, block.mlp
                qkv_bias = cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) if a.q_proj.bias is not None else None
                a.packed = {"qkv": (pack_weight(cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), batch),
                                    qkv_bias),
                            "o": (pack_weight(cast(a.o_proj.weight), batch),
                                  None if a.o_proj.bias is None else cast(a.o_proj.bias))}
                m.packed = {"gate_up": pack_weight(cat(m.gate_proj.weight, m.up_proj.weight), batch),
                            "down": pack_weight(cast(m.down_proj.weight), batch)}
            self.packed_head = pack_weight(cast(self.lm_head.weight), batch)
            yield self
        finally:
            for block in self.model["layers"]:
                block.self_attn.packed = block.mlp.packed = None
            self.packed_head = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every large block (logits, activations, gradients: megabytes each) with a fresh mmap and
    unmaps it on free, so a training step that frees and re-allocates the same gigabytes pays a page fault per 4 KiB
    every time. With M_MMAP_MAX = 0 (no per-block mmap) and a 2 GiB M_TRIM_THRESHOLD, freed blocks stay in the heap
    and are reused, at the price of a few freed blocks held in reserve (BENCHMARKS.md has the measured effect).
    This changes the whole process, so only scripts call it (run.setup on the CPU; bench/), never an import.
    Linux with glibc only; MINICAI_MALLOC=default leaves malloc alone. Returns whether the settings were applied."""
    if sys.platform != "linux" or os.environ.get("MINICAI_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
