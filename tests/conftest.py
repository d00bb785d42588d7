"""Shared fixtures: a tiny ChatML tokenizer and a tiny random model directory in HF layout (seconds to build)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def load_script(name: str):
    """A top-level script (train_sl.py, pipeline.py, ...) as a module, without running its main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses (train_dpo.py's DPOConfig) look their module up there
    spec.loader.exec_module(module)
    return module

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "How do I bake bread? Mix flour, water, salt and yeast, then let it rise.",
    "I can't help with that, but here is some safer information instead.",
    "Critique: the response is harmful because it explains how to break the law.",
    "Revision: I won't help with hurting anyone; if you are in danger, please contact local services.",
    "Options: (A) first answer (B) second answer. The answer is: (A)",
    "Human: hello there! Assistant: hi, how can I help you today?",
]


def build_tiny_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """Train a small byte-level BPE with SmolLM2's special tokens and chat template into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": SMOLLM2_TEMPLATE, "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_tiny_model_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama-style model (2 layers, hidden 32) with the tiny tokenizer, saved in HF layout."""
    from tokenizers import Tokenizer

    from minicai.model import random_model, tiny_config

    build_tiny_tokenizer(directory)
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    cfg = tiny_config(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    random_model(cfg, seed=seed).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def pip_package_root(request, tmp_path_factory, env: str, package: str, version: str) -> str:
    """For an opt-in slow test: the directory holding `package` (env variable `env`, or a fresh
    `pip install --no-deps --target`, never touching torch); skips when not run with -m slow or when pip fails."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in slow test: run with -m slow")
    root = os.environ.get(env)
    if not root:
        root = str(tmp_path_factory.mktemp(f"{package}_pkg"))
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", root,
                            f"{package}=={version}"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"could not fetch {package} {version}: {r.stderr[-300:]}")
    return root


def framework_dump(request, tmp_path_factory, module: str, env: str, package: str, version: str) -> Path:
    """For an opt-in slow test: the dump that minicai.oracle.<module>.run(ROOT, OUT) writes from the published
    package at ROOT (pip_package_root)."""
    import importlib

    root = pip_package_root(request, tmp_path_factory, env, package, version)
    path = tmp_path_factory.mktemp(package) / f"{package}.safetensors"
    importlib.import_module(f"minicai.oracle.{module}").run(root, path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine one costs a lot (spin waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
