"""Tiny random Llama models and a 16-token tokenizer for running other frameworks' PPO code on the CPU (needs
transformers and tokenizers; built in memory, nothing is downloaded)."""

from dataclasses import dataclass

import torch

VOCAB = ["<pad>", "<eos>"] + [f"t{i}" for i in range(14)]  # 16 tokens: the random policy samples <eos> often
PAD_ID, EOS_ID = 0, 1


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def models(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None,
                      num_labels=1)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg)
    ref = LlamaForCausalLM(cfg)
    value = LlamaForSequenceClassification(cfg)
    reward = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        # The policy must not sample <pad> (TRL would read it as the end of the response): residual dimension 0
        # carries a constant 10 (embeddings set, attention and MLP outputs never write it), and the <pad> row of the
        # LM head reads -10 times it, a logit of about -40 whatever the context.
        policy.model.embed_tokens.weight[:, 0] = 10.0
        for layer in policy.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        policy.lm_head.weight[PAD_ID] = 0.0
        policy.lm_head.weight[PAD_ID, 0] = -10.0
        for m in (value, reward):  # a non-trivial score head
            torch.nn.init.normal_(m.score.weight, std=1.0)
    ref.load_state_dict(policy.state_dict())
    return policy, ref, value, reward


@dataclass
class Rollout:
    """One sampled batch, left-padded prompts then responses; B rows, P prompt and N response columns."""

    seqs: torch.Tensor  # [B, P+N] prompt and response ids
    P: int  # prompt columns (the longest prompt)
    resp: torch.Tensor  # [B, N] response ids
    first: torch.Tensor  # [B] index of the first <eos> in the response, N where there is none
    resp_mask: torch.Tensor  # [B, N] long: 1 through the first <eos>
    attn: torch.Tensor  # [B, P+N] long: prompt tokens and the masked response
    pos: torch.Tensor  # [B, P+N] position ids (0 on left padding)
    g: torch.Generator  # seeded with `seed`, after drawing the prompts: the caller draws on from it


def rollout(policy, ref, seed: int, batch: int, response_length: int, temperature: float) -> Rollout:
    """Nudge `ref` away from `policy` (so that the KL is not 0), draw `batch` random prompts of 2-4 tokens, and
    sample responses with transformers `generate` (standing in for vLLM) at `temperature`, no top-k/top-p."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, len(VOCAB), (int(n),), generator=g).tolist()
               for n in torch.randint(2, 5, (batch,), generator=g)]
    P = max(map(len, prompts))
    query = torch.tensor([[PAD_ID] * (P - len(p)) + p for p in prompts])
    qmask = (query != PAD_ID).long()
    torch.manual_seed(seed)
    with torch.no_grad():
        seqs = policy.generate(input_ids=query, attention_mask=qmask, do_sample=True, temperature=temperature,
                               top_k=0, top_p=1.0, max_new_tokens=response_length, eos_token_id=EOS_ID,
                               pad_token_id=PAD_ID)
    resp = seqs[:, P:]
    N = resp.shape[1]
    is_eos = resp == EOS_ID
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((batch,), N))
    resp_mask = (torch.arange(N).expand(batch, N) <= first.unsqueeze(1)).long()  # verl get_response_mask
    attn = torch.cat([qmask, resp_mask], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return Rollout(seqs, P, resp, first, resp_mask, attn, pos, g)
