"""The Python examples in README.md run, so they cannot rot."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    # blocks that need a trained run are run by test_readme_commands.py, after the README's
    # shell commands made one
    blocks = [b for b in blocks if not b.startswith("# after the commands above")]
    for i, block in enumerate(blocks):
        namespace = {}
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"README.md python block {i} failed: {e!r}\n{block}") from e
    out = capsys.readouterr().out
    assert "(1, 20, 5) (1, 20, 4)" in out, out


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
