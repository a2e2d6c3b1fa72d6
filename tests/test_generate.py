"""Free text generation: generate_text against a hand-written greedy loop (batched, streamed, through the chat
template, through an adapter, sampled), prompts files, and `rora generate` on a model directory, a pruned stage
directory, a recovery directory and an adapter directory."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_model, make_tokenizer

from rora.artifacts import save_model_dir, write_stage_manifest
from rora.cli import main
from rora.config import GenerateConfig
from rora.errors import ConfigError, DataError
from rora.evaluation.text import encode_prompt, gather_prompts, generate_text, read_prompts
from rora.models import load_model, peft_wrapping

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The capital of France is", "A cat sat", "Below is an instruction that describes a task."]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@torch.no_grad()
def greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """The plainest greedy decode: a full forward pass per token, argmax, stop after the end-of-text token."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        if out[-1] == eos:
            break
    return out


def test_greedy_equals_a_manual_decode_batched_or_not(tokenizer):
    model = make_model(heads=4, kv_heads=2)
    batched = generate_text(model, tokenizer, PROMPTS, GenerateConfig(max_new_tokens=12, batch_size=3))
    alone = generate_text(model, tokenizer, PROMPTS, {"max_new_tokens": 12, "batch_size": 1})
    for p, b, a in zip(PROMPTS, batched, alone):
        ids = tokenizer(p).input_ids
        expected = greedy(model, ids, 12, tokenizer.eos_token_id)
        assert b.prompt == p and b.prompt_ids == ids and b.new_ids == expected == a.new_ids
        assert b.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert b.stopped == (expected[-1] == tokenizer.eos_token_id)


def test_stops_at_the_end_of_text_token_and_drops_the_padding_after_it(tokenizer):
    model = make_model()
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 100.0  # the end-of-text token is always the favourite: it stops after one token
    model.lm_head.bias = torch.nn.Parameter(bias)
    found = generate_text(model, tokenizer, PROMPTS, {"max_new_tokens": 8})
    assert [g.new_ids for g in found] == [[tokenizer.eos_token_id]] * 3 and all(g.stopped for g in found)
    assert [g.text for g in found] == [""] * 3


def test_streamed_pieces_join_to_the_text(tokenizer):
    model = make_model()
    pieces: list[str] = []
    streamed = generate_text(model, tokenizer, PROMPTS[:1], {"max_new_tokens": 16}, stream=pieces.append)
    assert len(pieces) >= 1 and "".join(pieces) == streamed[0].text
    assert streamed[0].new_ids == generate_text(model, tokenizer, PROMPTS[:1], {"max_new_tokens": 16})[0].new_ids


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    model, tok = make_model(), make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rendered = "<s>user: A cat sat</s><s>assistant:"
    assert encode_prompt(tok, "A cat sat", chat=True) == tok(rendered, add_special_tokens=False).input_ids
    by_default, plain = (generate_text(model, tok, ["A cat sat"], {"max_new_tokens": 10, "chat": c})[0]
                         for c in (None, False))
    assert by_default.prompt_ids == encode_prompt(tok, "A cat sat", chat=True)
    assert by_default.new_ids == greedy(model, by_default.prompt_ids, 10, tok.eos_token_id)
    assert plain.prompt_ids == tok("A cat sat").input_ids != by_default.prompt_ids
    with pytest.raises(ConfigError, match="no chat template"):
        generate_text(model, make_tokenizer(), ["A cat sat"], {"chat": True})


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tokenizer):
    model = make_model()
    cfg = {"max_new_tokens": 12, "temperature": 1.5, "seed": 3}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = [g.new_ids for g in generate_text(model, tokenizer, PROMPTS, cfg)]
    assert torch.equal(torch.get_rng_state(), state)
    assert [g.new_ids for g in generate_text(model, tokenizer, PROMPTS, cfg)] == first
    other = [g.new_ids for g in generate_text(model, tokenizer, PROMPTS, {**cfg, "seed": 4})]
    greedy_ids = [g.new_ids for g in generate_text(model, tokenizer, PROMPTS, {"max_new_tokens": 12})]
    assert other != first and greedy_ids != first


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -0.5}, "generate.temperature must be >= 0"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": 0.0}, "generate.top_p must be in (0, 1]"),
    ({"max_new_tokens": 0}, "generate.max_new_tokens must be > 0"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GenerateConfig(**settings)


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second one  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"text": "b", "id": 2}\n')
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "  second one  "]
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    assert gather_prompts(["x"], tmp_path / "p.jsonl") == ["x", "a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"question": "b"}\n')
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, message in ((tmp_path / "bad.jsonl", "line 2 has no string"), (tmp_path / "empty.txt", "no prompts"),
                          (tmp_path / "nope.txt", "not found")):
        with pytest.raises(DataError, match=message):
            read_prompts(path)
    with pytest.raises(DataError, match="prompt 2 is empty"):
        gather_prompts(["x", " "])
    with pytest.raises(ConfigError, match="no prompt"):
        gather_prompts([])


# ---- rora generate ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny model directory, a pruned stage directory made from it, an adapter for it, and a recovery directory
    holding that adapter."""
    from peft import get_peft_model

    from rora.config import RecoverConfig
    from rora.recovery.methods import peft_config

    root = tmp_path_factory.mktemp("generate")
    save_model_dir(make_model(heads=4, kv_heads=2), tokenizer, root / "model")
    result = CliRunner().invoke(main, ["prune", str(root / "model"), "--ratio", "0.5", "--importance", "l2",
                                       "--layers", "0:1", "--out", str(root / "pruned")])
    assert result.exit_code == 0, result.output
    model, _ = load_model(root / "model")
    with peft_wrapping():
        peft = get_peft_model(model, peft_config(RecoverConfig(rank=4), model))
    with torch.no_grad():  # PEFT starts B at zero, a no-op: make the adapter change the model's writing
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft.save_pretrained(root / "adapter")
    shutil.copytree(root / "adapter", root / "recovery" / "adapter")
    write_stage_manifest(root / "recovery", "recover", {"model": root / "model"}, {}, {})
    chat_tok = make_tokenizer()
    chat_tok.chat_template = CHAT_TEMPLATE
    save_model_dir(make_model(heads=4, kv_heads=2), chat_tok, root / "chat_model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def generate(*args):
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def expected_texts(model, tok, n: int, chat: bool = False) -> list[str]:
    return [tok.decode(greedy(model, encode_prompt(tok, p, chat), n, tok.eos_token_id), skip_special_tokens=True)
            for p in PROMPTS]


def outputs(stdout: str) -> list[str]:
    return [o["text"] for o in json.loads(stdout)["outputs"]]


@pytest.mark.parametrize("spec", ["model", "pruned"])
def test_cli_writes_the_greedy_text_of_a_model_or_stage_directory(world, spec):
    model, tok = load_model(world / spec)
    expected = expected_texts(model, tok, 10)
    found = json.loads(generate(world / spec, "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10,
                                "--json"))
    assert [o["text"] for o in found["outputs"]] == expected and found["chat"] is False
    assert found["model"] == str(world / spec) and found["adapter"] is None and found["config"]["temperature"] == 0.0
    assert all(o["new_tokens"] >= 1 for o in found["outputs"])
    # Streaming (the default) prints the same texts, each under a line naming its prompt.
    streamed = generate(world / spec, "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10)
    assert streamed == "\n".join(f"[{i}/3] {p}\n{t}\n" for i, (p, t) in enumerate(zip(PROMPTS, expected), 1))
    batched = generate(world / spec, "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10, "--no-stream")
    assert batched == streamed


def test_cli_single_prompt_prints_only_the_text(world):
    model, tok = load_model(world / "model")
    assert generate(world / "model", "--prompt", PROMPTS[0], "--max-new-tokens", 10) == \
        expected_texts(model, tok, 10)[0] + "\n"


@pytest.mark.parametrize("args, adapter", [
    (("{w}/recovery",), "recovery/adapter"),
    (("{w}/model", "--adapter", "{w}/adapter"), "adapter"),
    (("{w}/model", "--adapter", "{w}/recovery"), "recovery/adapter"),
])
def test_cli_through_an_adapter(world, args, adapter):
    from rora.models import load_adapter

    model, tok = load_model(world / "model")
    base = expected_texts(model, tok, 10)
    adapted = expected_texts(load_adapter(model, world / "adapter"), tok, 10)
    assert adapted != base  # the adapter changes what the model writes
    found = json.loads(generate(*(a.format(w=world) for a in args), "--prompts-file", world / "prompts.jsonl",
                                "--max-new-tokens", 10, "--json"))
    assert [o["text"] for o in found["outputs"]] == adapted
    assert found["model"] == str(world / "model") and found["adapter"] == str(world / adapter)


def test_cli_chat_template_by_default(world):
    model, tok = load_model(world / "chat_model")
    found = json.loads(generate(world / "chat_model", "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10,
                                "--json"))
    assert found["chat"] is True and outputs(json.dumps(found)) == expected_texts(model, tok, 10, chat=True)
    plain = outputs(generate(world / "chat_model", "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10,
                             "--no-chat", "--json"))
    assert plain == expected_texts(model, tok, 10)


def test_cli_says_when_the_model_writes_nothing_visible(world, tmp_path, tokenizer):
    model = make_model(heads=4, kv_heads=2)
    with torch.no_grad():  # every logit 0: the argmax is token 0, <unk>, which decodes to nothing
        model.model.norm.weight.zero_()
    save_model_dir(model, tokenizer, tmp_path / "mute")
    for flag in ("--stream", "--no-stream"):
        result = CliRunner().invoke(main, ["generate", str(tmp_path / "mute"), "--prompt", "A cat", "--max-new-tokens",
                                           "5", flag])
        assert result.exit_code == 0 and result.stdout == "\n"
        assert result.stderr == "rora: note: prompt 1: the model wrote 5 tokens of no visible text\n"


def test_cli_sampling_is_reproducible(world):
    args = [world / "model", "--prompts-file", world / "prompts.jsonl", "--max-new-tokens", 10, "--temperature", 1.2,
            "--top-p", 0.9, "--json"]
    first = outputs(generate(*args, "--seed", 5))
    assert outputs(generate(*args, "--seed", 5)) == first and outputs(generate(*args, "--seed", 6)) != first
