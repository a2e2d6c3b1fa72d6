"""Method registry and scaling: the module's output change is alpha / r**b * B @ A @ x, before and after a
save/reload with plain PEFT; DoRA follows PEFT's DoRA formula; the training prompt is pinned character for character."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from rora.config import RecoverConfig
from rora.errors import ConfigError
from rora.recovery import methods
from rora.recovery.prompts import TRAIN_TEMPLATE, TRAIN_TEMPLATE_WITH_INPUT, split_prompt, training_prompt


pytestmark = pytest.mark.usefixtures("one_thread")

# (method, rank, scaling_exponent override, alpha)
CASES = [
    ("lora", 4, None, 8.0),
    ("lora", 16, None, 32.0),
    ("rora", 4, None, 8.0),
    ("rora", 16, None, 32.0),
    ("rora", 64, None, 16.0),
    ("lora", 8, 0.25, 16.0),  # custom b: stored as lora_alpha' = alpha * r**(1-b)
    ("rora", 32, 0.75, 7.0),
    ("dora", 4, None, 8.0),
    ("dora", 16, 0.5, 32.0),
]


def _adapted(method, rank, b, alpha):
    from peft import get_peft_model

    cfg = RecoverConfig(method=method, rank=rank, alpha=alpha, scaling_exponent=b, dropout=0.0)
    model = get_peft_model(make_model(), methods.peft_config(cfg, make_model()))
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; make the update visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    return cfg, model.eval()


def _check_modules(model, scale, use_dora):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    layer = model.get_base_model().model.layers[1]
    checked = 0
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj):
        assert module.scaling["default"] == pytest.approx(scale, rel=1e-12)
        W = module.base_layer.weight
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            got = module(x)
            if use_dora:  # PEFT's DoRA: m * (W + s B A) / ||W + s B A||_row
                V = W + scale * B @ A
                m = module.lora_magnitude_vector["default"].weight
                want = F.linear(x, (m / V.norm(dim=1)).unsqueeze(1) * V)
            else:
                want = F.linear(x, W) + scale * x @ A.T @ B.T
        delta = (want - F.linear(x, W)).abs().max()
        assert delta > 1e-3  # the adapter really changes the output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("method,rank,b,alpha", CASES)
def test_output_change_is_scale_times_BAx_before_and_after_reload(method, rank, b, alpha, tmp_path):
    from peft import PeftModel

    cfg, model = _adapted(method, rank, b, alpha)
    expected_b = b if b is not None else {"lora": 1.0, "rora": 0.5, "dora": 1.0}[method]
    scale = alpha / rank**expected_b
    assert methods.effective_scale(cfg) == pytest.approx(scale, rel=1e-12)
    _check_modules(model, scale, methods.METHODS[method].use_dora)
    scales = methods.module_scales(model)
    assert len(scales) == 2 * 5 and all(v == pytest.approx(scale, rel=1e-12) for v in scales.values())

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path).eval()  # plain PEFT, nothing from rora
    _check_modules(reloaded, scale, methods.METHODS[method].use_dora)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_registry_and_peft_fields():
    assert {n: (m.b, m.use_dora) for n, m in methods.METHODS.items()} == {
        "lora": (1.0, False), "rora": (0.5, False), "dora": (1.0, True)}
    model = make_model()
    rora = methods.peft_config(RecoverConfig(method="rora", rank=16), model)
    assert (rora.use_rslora, rora.lora_alpha, rora.use_dora) == (True, 32.0, False)
    lora = methods.peft_config(RecoverConfig(method="lora", rank=16), model)
    assert (lora.use_rslora, lora.lora_alpha) == (False, 32.0)
    custom = methods.peft_config(RecoverConfig(method="lora", rank=16, alpha=8, scaling_exponent=0.25), model)
    assert custom.use_rslora is False and custom.lora_alpha == pytest.approx(8 * 16**0.75)
    assert sorted(custom.target_modules) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


def test_unknown_method_and_missing_target_module():
    with pytest.raises(ConfigError, match=r"unknown method 'roar'.*did you mean 'rora'"):
        methods.get_method("roar")
    with pytest.raises(ConfigError, match="did you mean"):
        methods.peft_config(RecoverConfig(method="dorra"), make_model())
    with pytest.raises(ConfigError, match=r"attn_proj.*it has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        methods.peft_config(RecoverConfig(target_modules=["q_proj", "attn_proj"]), make_model())


def test_bad_rank_and_alpha_are_config_errors():
    with pytest.raises(ConfigError, match="rank must be > 0"):
        RecoverConfig(rank=0)
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        RecoverConfig(alpha=-1.0)


def test_training_template_is_llm_adapters_character_for_character():
    # Literals copied from LLM-Adapters finetune.py generate_prompt (see PROTOCOL.md); every space counts.
    assert TRAIN_TEMPLATE == (
        'Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                {instruction}\n                \n                ### Response:\n                {output}'
    )
    assert TRAIN_TEMPLATE_WITH_INPUT == (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                {instruction}\n                \n                ### Input:\n                {input}\n                \n                ### Response:\n                {output}'
    )
    text = training_prompt("Q {x}?", "", "the correct answer is true")
    assert text.endswith("### Response:\n                the correct answer is true") and "{x}" in text
    prompt, full = split_prompt("Q", "ctx", "A")
    assert full == prompt + "A" and "### Input:\n                ctx\n" in full
