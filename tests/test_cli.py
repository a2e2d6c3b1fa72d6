import json

from click.testing import CliRunner

from rora.artifacts import save_model_dir
from rora.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_info_json_on_nonuniform_dir(tmp_path, tiny_nonuniform, tokenizer):
    save_model_dir(tiny_nonuniform, tokenizer, tmp_path / "m")
    result = run("info", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [p["q_heads"] for p in info["per_layer"]] == [2, 4, 2]
    assert info["uniform"] is False


def test_info_text_groups_identical_layers(tmp_path, tiny_llama, tokenizer):
    save_model_dir(tiny_llama, tokenizer, tmp_path / "m")
    result = run("info", tmp_path / "m")
    assert result.exit_code == 0
    assert "0-1: 4/4 96" in result.output


def test_bad_spec_is_one_line_exit_2(tmp_path):
    result = run("info", tmp_path / "nope")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rora: error: unknown model")
    assert "Traceback" not in result.output


def test_pickle_without_opt_in_exit_2(tmp_path):
    (tmp_path / "ck.bin").write_bytes(b"\x80\x04N.")
    result = run("info", tmp_path / "ck.bin")
    assert result.exit_code == 2 and "--allow-pickle" in result.output
