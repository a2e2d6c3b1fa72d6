import pytest

from rora.config import EvalConfig, ExportConfig, PruneConfig, RecoverConfig
from rora.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = RecoverConfig(method="lora", rank=8, target_modules=["q_proj", "v_proj"])
    cfg.to_yaml(tmp_path / "r.yaml")
    assert RecoverConfig.from_yaml(tmp_path / "r.yaml") == cfg


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key recover\.rnak \(did you mean 'rank'\?\)"):
        RecoverConfig.from_dict({"rnak": 8})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"recover\.rank: expected int"):
        RecoverConfig.from_dict({"rank": "eight"})


def test_all_problems_collected_at_once():
    with pytest.raises(ConfigError) as err:
        PruneConfig(ratio=1.5, importance="taylr", layers="9:3")
    msg = str(err.value)
    assert "prune.ratio" in msg and "did you mean 'taylor'" in msg and "prune.layers" in msg


def test_flags_override_yaml_values():
    cfg = RecoverConfig.from_dict({"rank": 8, "lr": 1e-3}).replace(rank=16, lr=None)
    assert (cfg.rank, cfg.lr, cfg.resolved_alpha) == (16, 1e-3, 32.0)


@pytest.mark.parametrize("cls,kwargs,key", [
    (RecoverConfig, {"rank": 0}, "recover.rank"),
    (RecoverConfig, {"alpha": -1.0}, "recover.alpha"),
    (EvalConfig, {"tasks": ["boolk"]}, "eval.tasks"),
    (EvalConfig, {"limit": 0}, "eval.limit"),
    (ExportConfig, {"format": "onnx"}, "export.format"),
])
def test_bad_values_rejected(cls, kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls(**kwargs)


def test_objective_auto_is_kd_with_a_teacher_else_sft():
    from rora.config import RecoverConfig

    cfg = RecoverConfig()
    assert cfg.objective == "auto" and not cfg.needs_teacher
    assert cfg.with_objective(True).objective == "kd" and cfg.with_objective(False).objective == "sft"
    assert RecoverConfig(objective="sft").with_objective(True).objective == "sft"
