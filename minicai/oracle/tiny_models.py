"""Tiny random Llama models and a 16-token tokenizer for running other frameworks' PPO code on the CPU (needs
transformers and tokenizers; built in memory, nothing is downloaded)."""

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
