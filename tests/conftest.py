"""Shared fixtures: tiny random Llama-family models built in-process, a tiny real tokenizer, the data dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RORA_DATA_DIR") or REPO.parent / "shared" / "data" / "commonsense")

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: Please answer the following question with true or false. ### Response:",
    "the correct answer is true false answer1 answer2 answer3 answer4 answer5 solution1 solution2 option1 option2",
    "ending1 ending2 ending3 ending4 The capital of France is Paris. A cat sat on the mat.",
]


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process (no downloads), with eos/pad tokens like a chat model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def make_model(arch: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 4,
               intermediate: int = 96, vocab: int = 384, seed: int = 0, tie: bool = False):
    """A tiny random causal LM of a Llama-family architecture, fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-zero std weights in some versions; make every unit matter for pruning tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared CPU are far faster on one thread (no spin-waiting on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    """Multi-head attention: 4 query heads, 4 KV heads."""
    return make_model("llama")


@pytest.fixture
def tiny_gqa():
    """Grouped-query attention: 4 query heads over 2 KV heads (like SmolLM2's 9 over 3)."""
    return make_model("llama", heads=4, kv_heads=2)


@pytest.fixture
def tiny_nonuniform():
    """Different head counts and MLP widths per layer, as non-uniform pruning leaves a model."""
    from rora.pruning.structure import keep_units, layer_shapes, sync_config

    model = make_model("llama", layers=3, heads=4, kv_heads=2)
    layers = model.model.layers
    keep_units(layers[0], model.config, keep_q=[0, 2], keep_kv=[0, 1], keep_channels=list(range(0, 96, 2)))
    keep_units(layers[2], model.config, keep_q=[2, 3], keep_kv=[1], keep_channels=list(range(80)))
    sync_config(model.config, layer_shapes(model))
    return model


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def tiny_any(request):
    """One tiny model per supported architecture (Qwen2 has biases on q/k/v)."""
    return make_model(request.param, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "boolq" / "test.json").is_file():
        pytest.skip(f"commonsense data not found at {DATA_DIR} (set RORA_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (loaded once per session; the first load converts the GGUF, ~30 s)."""
    from rora.models import load_model

    return load_model("smollm2-135m")
