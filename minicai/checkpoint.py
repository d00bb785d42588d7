"""Checkpoint I/O: a Hugging Face model directory <-> ModelConfig + Transformer weights.

A model directory holds config.json and model.safetensors (or model.safetensors.index.json + shards), so every
stage's output loads in transformers unchanged. Loading is strict: every tensor the config implies must be there,
with its shape, and nothing else (a wrong config.json fails here, not as a silent mismatch later). Damaged files
(truncated, not safetensors, a shard index pointing at a missing file or out of the directory) raise MinicaiError
naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minicai import MinicaiError
from minicai.data import atomic_write, atomic_write_text, read_json
from minicai.model import ModelConfig, Transformer

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_KNOWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "max_position_embeddings", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "architectures", "rope_scaling",
}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Read a HF config dict (hub style or transformers-5 style, where rope_theta sits in rope_parameters)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES or any(a not in SUPPORTED_ARCHITECTURES.values() for a in archs):
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise MinicaiError(f"{source}: unsupported model_type={model_type!r} architectures={archs!r}; "
                           f"minicai supports {supported}. Fix: use a Llama- or Qwen2-family checkpoint.")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise MinicaiError(f"{source}: missing required key {key!r}; the file is not a complete HF config. "
                               "Fix: use the model's own config.json")
    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
    if hf.get("rope_scaling") or rope_type not in ("default", None):
        raise MinicaiError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE). "
                           "Fix: use a model without rope scaling")
    heads = hf["num_attention_heads"]
    return ModelConfig(
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
        extra={k: v for k, v in hf.items() if k not in _KNOWN_KEYS},
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json that transformers' AutoModelForCausalLM reads back as the same network."""
    hf = dict(config.extra)
    hf.update(
        architectures=[SUPPORTED_ARCHITECTURES[config.model_type]],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act="silu",
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if config.model_type == "llama":
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    return hf


def load_config(path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise MinicaiError(f"{file}: not found; a model directory needs config.json (HF layout). Fix: pass --model "
                           "DIR with a complete HF-layout model, or omit it for the default model")
    return config_from_hf(read_json(file, "repair or replace config.json"), source=str(file))


def safetensors_files(path) -> list[Path]:
    """The weight files of a model directory: model.safetensors, or the shards its index names (each inside the
    directory and present)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if not index.exists():
        raise MinicaiError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                           "weights are read). Fix: convert .bin checkpoints with transformers' save_pretrained")
    weight_map = read_json(index, "re-download or re-save the model").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MinicaiError(f"{index}: no 'weight_map' (tensor name -> shard file). Fix: re-download or re-save the "
                           "model")
    files = []
    for shard in sorted(set(weight_map.values())):
        file = path / str(shard)
        if Path(str(shard)).is_absolute() or path.resolve() not in file.resolve().parents:
            raise MinicaiError(f"{index}: shard {shard!r} lies outside {path}; an index may only name files in "
                               "its own directory. Fix the weight_map or re-save the model.")
        if not file.is_file():
            raise MinicaiError(f"{index}: shard {shard!r} is missing ({file}); the download or copy is "
                               "incomplete. Fix: copy the missing shard or re-download the model.")
        files.append(file)
    return files


def _read_tensors(file: Path, expected: dict, config: ModelConfig, dtype: torch.dtype) -> dict:
    """The tensors of one safetensors file, checked against the names and shapes the config implies."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the head too; the embedding is the one used
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise MinicaiError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model "
                                       f"with {config.num_layers} layers. Fix: use the config.json of the same model")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise MinicaiError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                                       f"{tuple(expected[name].shape)}. Fix: use the config.json of the same model")
                tensors[name] = t.to(dtype)
    except MinicaiError:
        raise
    except Exception as e:  # safetensors' SafetensorError, or an OSError for a file cut short
        raise MinicaiError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated "
                           "or damaged. Fix: re-download or re-convert the model (or rerun the stage that wrote it)."
                           ) from None
    return tensors


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", fast: bool = False, cls=Transformer):
    """Load a HF-layout directory as a Transformer (strict on tensor names and shapes). fast=True: fast.make_fast
    (the CPU path, chosen here once; a no-op off the CPU)."""
    path = Path(path)
    if not path.is_dir():
        raise MinicaiError(f"{path}: model directory not found. Pass --model DIR with a HF-layout model "
                           "(config.json, model.safetensors, tokenizer.json), or omit it for the default model.")
    config = load_config(path)
    files = safetensors_files(path)
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    tensors = {}
    for file in files:
        tensors.update(_read_tensors(file, expected, config, dtype))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MinicaiError(f"{path}: missing tensor(s) {', '.join(missing[:3])}{more} in the safetensors file(s). "
                           "Fix: re-download or re-save the model")
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(tensors, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model["embed_tokens"].weight
    if fast:
        from minicai.fast import make_fast

        model = make_fast(model)
    return model.eval()


def save_model(model: Transformer, path) -> None:
    """Write config.json + model.safetensors (HF layout), atomically, loadable by transformers unchanged."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf = config_to_hf(model.config)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    stale_index = path / "model.safetensors.index.json"
    if stale_index.exists():
        stale_index.unlink()
