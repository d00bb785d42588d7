"""Mixed precision: the one rule every trained network follows (SFT, preference model, PPO/GRPO policy and value
model, DPO policy).

`--dtype bf16` (the default on CUDA) or `fp16` means, as in Micikevicius et al. 2018 ("Mixed precision training"):

- the trained weights and the AdamW state are float32 ("master weights"). An AdamW step moves a weight by about lr
  (3e-5 in PPO), far below bfloat16's resolution (2^-8 relative: 0.004 for a weight near 1). In bf16 storage most
  such updates round away (RMSNorm weights near 1.0 never move), so training silently stops;
- the forward and backward passes run under autocast in the low dtype: matrix products and attention in bf16/fp16,
  while norms, softmax, log-probs and losses stay in float32 (what torch.autocast does op by op);
- networks that are only run, never trained, may be stored in the low dtype (the preference model when it scores).
  The frozen reference (PPO, GRPO, DPO) is kept in the weight dtype instead: it then takes exactly the policy's
  passes, so KL is exactly 0 at iteration 0. Only its blocks' linear weights are stored in the low dtype
  (frozen_for_autocast): autocast casts them to it at every pass anyway, so the numbers stay the same bits and the
  casts go away.

fp32 and fp64 runs use no autocast at all. `autocast` below runs the same torch.autocast on the CPU as on CUDA, so
the CPU tests the GPU's code path (fast where it has bf16 matrix instructions, emulated on an AVX2-only CPU). fp16
(for GPUs without bf16) also scales the loss (`grad_scaler`): its narrow exponent range would flush small gradients
to 0; bf16 has float32's range.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

LOW = (torch.bfloat16, torch.float16)  # dtypes that only autocast uses; weights are never trained in them


def weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of trained weights and optimizer state in a run of dtype `dtype`: float32 for bf16/fp16 runs."""
    return torch.float32 if dtype in LOW else dtype


def amp_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of a run of dtype `dtype` (None: no autocast, the weights' own dtype is used)."""
    return dtype if dtype in LOW else None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """The context every forward (and backward) pass of a run runs in: torch.autocast in `dtype` when it is bf16 or
    fp16, else nothing. `dtype` is the run's dtype (or amp_dtype's result)."""
    if dtype not in LOW:
        return nullcontext()
    # fast.py under it: OneDNNLinear steps aside (autocast's products), decoding packs the weights cast to bf16 once
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 runs (Micikevicius et al. 2018): the loss is multiplied by a large factor before
    the backward pass and the gradients divided by it before clipping; a step with inf/nan gradients is skipped and
    the factor halved. Disabled (every call a no-op, bit for bit) for any other dtype. Use: scaler.scale(loss)
    .backward(); scaler.unscale_(opt); clip; scaler.step(opt); scaler.update()."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def frozen_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A frozen network run only under autocast(dtype), in place: the blocks' linear weights (and biases) stored in
    the low dtype, which is what autocast casts them to before every product. Autocast keeps such casts only for one
    autocast region and only for weights that require grad, so a frozen float32 model (the PPO reference) pays them
    at every pass. The results are the same bits. Everything else keeps its dtype: the embedding (autocast does not
    cast lookups), the norms (float32 math) and the LM head (it sets model.dtype, and a tied head is the embedding).
    A float32/float64 run (dtype not bf16/fp16) leaves the model as it is."""
    if dtype not in LOW:
        return model
    head = getattr(model, "lm_head", None)
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(dtype)
    return model


def check_trainable(model: torch.nn.Module, what: str) -> None:
    """Raise if a trainable parameter of `model` is stored in bf16/fp16 (its AdamW updates would round away)."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad and
                  p.dtype in LOW})
    if low:
        raise ValueError(f"{what} has trainable {'/'.join(low)} parameters: AdamW steps round away in them. Keep the "
                         f"weights in float32 (precision.weight_dtype) and train under precision.autocast")


def logprob_tolerance(dtype: torch.dtype | None, fp32_tol: float) -> float:
    """Largest expected |sampler log-prob - forward log-prob| when products run in `dtype` (None: float32).

    The two paths compute the same numbers with different shapes (one token at a time with a KV cache, or all
    tokens at once), so they differ by rounding only: about 1e-5 in float32 (`fp32_tol` leaves room). bf16 keeps 8
    significant bits, fp16 11, so the rounding is 2^15 and 2^12 times larger; log-probs of a 30-layer model then
    differ by up to a few tenths (bf16). A padding or position bug shifts them by whole nats."""
    if dtype == torch.bfloat16:
        return max(fp32_tol, 0.5)
    if dtype == torch.float16:
        return max(fp32_tol, 0.1)
    return fp32_tol
