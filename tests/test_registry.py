"""The registry is the one list of names: configs validate against it, stage modules implement exactly it, and the
CLI's options and help come from the config fields."""
import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from rora import registry
from rora.cli import RUN_FLAGS, main
from rora.config import EvalConfig, ExportConfig, MergeConfig, PipelineConfig, PruneConfig, RecoverConfig, load_preset
from rora.errors import ConfigError

STAGES = (PruneConfig, RecoverConfig, EvalConfig, MergeConfig, ExportConfig, PipelineConfig)
COMMANDS = {"prune": PruneConfig, "recover": RecoverConfig, "eval": EvalConfig, "merge": MergeConfig,
            "export": ExportConfig}


def test_unknown_name_gets_a_did_you_mean_and_the_known_names():
    with pytest.raises(ConfigError, match=r"unknown scheduler 'cosin' \(did you mean 'cosine'\?\); known schedulers: "
                                          r"linear, cosine"):
        registry.SCHEDULERS.get("cosin")
    gguf = registry.EXPORT_FORMATS.get("gguf")
    assert "float32" in gguf and "float32" not in gguf.names()  # an alias: accepted, not listed


def test_stage_modules_implement_exactly_the_registered_names():
    from rora.evaluation import evaluate, tasks
    from rora.deployment.gguf_file import GGUF_DTYPES
    from rora.numerics import DTYPES
    from rora.pruning.importance import SCORERS
    from rora.recovery import methods

    assert tuple(SCORERS) == registry.IMPORTANCE.names()
    assert tuple(tasks.TASKS) == registry.TASKS.names()
    assert tuple(evaluate.PROTOCOLS) == registry.PROTOCOLS.names()
    gguf = registry.EXPORT_FORMATS.get("gguf")
    assert set(GGUF_DTYPES) == set(gguf.names()) | set(gguf.aliases)
    torch_dtypes = {*registry.MERGE_DTYPES, *registry.COMPUTE_DTYPES, *registry.EXPORT_FORMATS.get("hf"),
                    *(n for n in registry.TEACHER_DTYPES if n != "auto")}
    assert torch_dtypes <= set(DTYPES)
    assert methods.get_method("dora").use_dora and methods.METHODS is registry.METHODS


@pytest.mark.parametrize("cls", STAGES)
def test_every_field_has_help_and_name_fields_are_validated(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        table = f.metadata.get("names")
        if table is not None:  # a name outside the table is rejected with the registry's message
            value = ["nope"] if isinstance(getattr(cls(), f.name), list) else "nope"
            with pytest.raises(ConfigError, match=rf"{cls.SECTION}\.{f.name} must be one of {table.names()[0]}"):
                cls(**{f.name: value})


def _generated_options(command, cls, paths):
    """(option, field, default) for each of the command's options that is a field of `cls` (at one of `paths`); the
    default is the section's own where there is one (rora run's recover.lr is auto)."""
    for path in paths:
        *section, key = path.split(".")
        owner = getattr(cls(), section[0]) if section else cls()
        field = next(f for f in dataclasses.fields(owner) if f.name == key)
        yield next(p for p in command.params if p.name == key), field, getattr(owner, key)


@pytest.mark.parametrize("name", [*COMMANDS, "run"])
def test_cli_help_of_config_options_is_the_field_metadata(name):
    command = main.commands[name]
    cls = COMMANDS.get(name, PipelineConfig)
    fields = {f.name for f in dataclasses.fields(cls)}
    paths = RUN_FLAGS if name == "run" else [p.name for p in command.params if p.name in fields]
    found = list(_generated_options(command, cls, paths))
    assert found
    for option, field, default in found:
        assert option.help == field.metadata["help"]
        if default not in (None, []) and not option.required:  # the dataclass default is what --help shows
            assert option.show_default and option.default == (",".join(default) if isinstance(default, list) else default)


def test_help_shows_the_dataclass_defaults():
    out = CliRunner().invoke(main, ["recover", "--help"], terminal_width=200).output
    assert "Adapter rank.  [default: 32]" in out
    merge = CliRunner().invoke(main, ["merge", "--help"], terminal_width=200).output
    assert MergeConfig.__dataclass_fields__["compute_dtype"].metadata["help"] in merge and "[default: float64]" in merge


def test_run_unknown_method_fails_before_any_stage(tmp_path):
    (tmp_path / "bad.yaml").write_text(f"out: {tmp_path / 'run2'}\nrecover:\n  method: lorra\n")
    for args in (["--method", "lorra", "--out", str(tmp_path / "run")], [str(tmp_path / "bad.yaml")]):
        result = CliRunner().invoke(main, ["run", *args])
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [
            "rora: error: invalid config: recover.method must be one of lora, rora, dora, got 'lorra' "
            "(did you mean 'lora'?)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_run_set_any_key_between_yaml_and_flags():
    args = ["run", "--preset", "quickstart", "--set", "recover.rank=4", "--set", "prune.channel_multiple=32",
            "--set", "skip=[eval_base]", "--set", "recover.lr=3e-4", "--print-config"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cfg = PipelineConfig.from_dict(yaml.safe_load(result.output))
    assert (cfg.recover.rank, cfg.prune.channel_multiple, cfg.skip, cfg.recover.lr) == (4, 32, ["eval_base"], 3e-4)
    assert cfg.prune.ratio == load_preset("quickstart").prune.ratio  # the preset's, untouched
    flagged = CliRunner().invoke(main, args[:-1] + ["--rank", "8", "--print-config"])
    assert yaml.safe_load(flagged.output)["recover"]["rank"] == 8  # a flag wins over --set


@pytest.mark.parametrize("setting,message", [
    ("recover.rnak=4", "unknown key recover.rnak (did you mean 'rank'?)"),
    ("recovr.rank=4", "unknown section 'recovr' in 'recovr.rank' (did you mean 'recover'?)"),
    ("modle=x", "unknown key pipeline.modle (did you mean 'model'?)"),
    ("recover.rank=four", "recover.rank: expected int, got 'four'"),
    ("recover.rank", "--set takes SECTION.KEY=VALUE"),
])
def test_run_set_errors_are_one_line(setting, message, tmp_path):
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "run"), "--set", setting])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("rora: error: ") and message in line
    assert list(tmp_path.iterdir()) == []
