"""Assemble BENCHMARKS.md from the sections the benchmark scripts write (benchmarks/results/<name>.md).

    python benchmarks/assemble.py
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ORDER = ("rank_sweep", "recover", "eval", "prune")  # the claim first, then the speed figures
INTRO = """# Benchmarks

Every figure below was measured by the scripts in `benchmarks/` on this repository's code; each section names the
machine, the package versions, the date and the exact command. Comparisons run side by side in one run and are
reported as ratios, since absolute times on shared 2-core machines are noisy. Regenerate this file with
`python benchmarks/assemble.py` after running the scripts.
"""


def main() -> None:
    sections = [HERE / "results" / f"{name}.md" for name in ORDER]
    missing = [s.stem for s in sections if not s.is_file()]
    body = [s.read_text().strip() for s in sections if s.is_file()]
    if missing:
        body.append("## Not yet measured\n\n" + ", ".join(missing))
    (HERE.parent / "BENCHMARKS.md").write_text(INTRO + "\n" + "\n\n".join(body) + "\n")


if __name__ == "__main__":
    main()
