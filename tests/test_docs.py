"""Every `make` target the docs, configs and scripts quote exists in the Makefile."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUOTED = [re.compile(r"`make ([a-z][a-z0-9-]*)"),  # inline code: `make test`
          re.compile(r"^\s*(?:\$ )?make ([a-z][a-z0-9-]*)\s*$", re.MULTILINE)]  # a command line of its own


def test_every_quoted_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    files = subprocess.run(["git", "ls-files", "*.md", "*.toml", "*.py", "*.sh", "*.yaml", ".ci/*"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    quoted: dict[str, set[str]] = {}
    for name in files:
        text = (REPO / name).read_text(errors="replace")
        for pattern in QUOTED:
            for target in pattern.findall(text):
                quoted.setdefault(target, set()).add(name)
    assert {"test", "demo", "bench-strategies", "test-slow"} <= set(quoted)  # the scan finds what is there
    missing = {t: sorted(where) for t, where in quoted.items() if t not in targets}
    assert not missing, f"make targets quoted but not defined: {missing}"


EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", re.DOTALL)


def test_docs_examples_are_their_files_verbatim():
    """A code block under ``<!-- example: path -->`` is that file (which its tests run), character for character."""
    examples = [(doc, path, code) for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
                for path, code in EXAMPLE.findall(doc.read_text())]
    assert "docs/examples/fedjax_clipped_mean.py" in [path for _, path, _ in examples]
    for doc, path, code in examples:
        assert code == (REPO / path).read_text(), f"{doc.relative_to(REPO)}: the example differs from {path}"
