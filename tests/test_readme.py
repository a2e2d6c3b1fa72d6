"""The README's Python API example runs as written, and the README keeps its two set-up-included commands."""
import re

from conftest import REPO


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs_as_written(data_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RORA_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in _python_blocks((REPO / "README.md").read_text()) if "rora.prune(" in b]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "134,515,008 -> " in out and "| boolq |" in out
    assert namespace["report"].params_after < namespace["report"].params_before
    assert namespace["merge_report"].max_abs_diff <= 1e-4
    assert (tmp_path / "runs" / "api-example" / "model.safetensors").is_file()


def test_readme_has_exactly_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: install", makefile, flags=re.M) and re.search(r"^test: install", makefile, flags=re.M)
