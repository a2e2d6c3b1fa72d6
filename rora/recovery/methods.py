"""The adapter methods (rora.registry.METHODS): LoRA, RoRA and DoRA differ only in the scaling exponent b and DoRA's flag.

Every method is a LoRA adapter whose update is scaled by alpha / r**b. PEFT owns the scaling (one source of
truth), so an adapter saved here reloads with plain `PeftModel.from_pretrained` and the same scale:
  * b = 1   -> plain LoRA, PEFT computes lora_alpha / r;
  * b = 0.5 -> `use_rslora=True`, PEFT computes lora_alpha / sqrt(r) (RoRA);
  * other b -> we store lora_alpha' = alpha * r**(1 - b) with plain LoRA scaling, so PEFT computes
    lora_alpha' / r = alpha / r**b. The user's alpha and b are recorded in the recovery's manifest (rora.json) next to the adapter.
"""
from __future__ import annotations

from torch import nn

from ..config import RecoverConfig
from ..errors import ConfigError
from ..registry import METHODS, did_you_mean

ADAPTER_NAME = "default"
get_method = METHODS.get  # the registered method, or ConfigError with a did-you-mean


def scaling_exponent(config: RecoverConfig) -> float:
    """The b in alpha / r**b: the config's override, else the method's own."""
    b = config.scaling_exponent
    return float(b) if b is not None else get_method(config.method).scaling_exponent


def effective_scale(config: RecoverConfig) -> float:
    """alpha / r**b, the factor the adapter update B @ A is multiplied by."""
    return config.resolved_alpha / config.rank ** scaling_exponent(config)


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's Linear layers that an adapter could target (lm_head excluded)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def peft_config(config: RecoverConfig, model):
    """The `peft.LoraConfig` that realises `config` on `model` (see the module docstring for the scaling)."""
    from peft import LoraConfig

    method = get_method(config.method)
    available = linear_module_names(model)
    missing = [t for t in config.target_modules if t not in available]
    if missing:
        raise ConfigError(
            f"target module(s) {', '.join(missing)} not found in the model"
            f"{did_you_mean(missing[0], available)}; it has: {', '.join(available)}"
        )
    b, alpha, r = scaling_exponent(config), config.resolved_alpha, config.rank
    # Checked before PEFT allocates r x width matrices per module: a rank past every adapted layer's smaller side
    # adds nothing, and a huge one would exhaust memory.
    widest = max(min(m.in_features, m.out_features) for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules)
    if r > widest:
        raise ConfigError(f"recover.rank {r} is more than any adapted layer's smaller side ({widest}); use at most {widest}")
    use_rslora = b == 0.5
    stored_alpha = alpha if b in (0.5, 1.0) else alpha * r ** (1.0 - b)
    return LoraConfig(
        r=r,
        lora_alpha=stored_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        use_rslora=use_rslora,
        use_dora=method.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def module_scales(peft_model, adapter: str = ADAPTER_NAME) -> dict[str, float]:
    """The scale PEFT actually applies in each adapted module (read from its `scaling` dicts, not re-derived)."""
    scales = {}
    for name, module in peft_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling:
            scales[name.removeprefix("base_model.model.")] = float(scaling[adapter])
    return scales
