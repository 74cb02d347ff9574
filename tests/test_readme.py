"""The README's quick-start commands stay true: CI runs exactly its test command with the same torch pin,
and every config group / experiment it names exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()


def _quick_start() -> list:
    block = README.split("## Quick start", 1)[1].split("##", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("    ")]


def test_ci_runs_the_readme_test_command():
    install, run, test = _quick_start()[:3]
    assert test == "python -m pytest -q"
    assert "\npython -m pytest -q\n" in CI, ".ci/run must run exactly the README's test command"
    assert run == "python train.py"
    torch_pin = re.search(r"torch==[\d.]+", install).group(0)
    assert f"pip install -q {torch_pin}" in CI, f"README installs {torch_pin} but .ci/run does not"


def test_named_config_choices_exist():
    for group, name in re.findall(r"\b(model|parallel|experiment|curriculum|data|optim)=([\w.-]+)", README):
        if group == "data" and name == "my_corpus":  # the README tells the user to create this one
            continue
        assert (REPO / "conf" / group / f"{name}.yaml").exists(), f"README names {group}={name}, not in conf/"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    """Every relative link of README.md and docs/*.md names an existing file and, after '#', one of its headings."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    headings = {d.resolve(): {_anchor(h) for h in re.findall(r"^#+ (.+)$", d.read_text(), re.M)} for d in docs}
    checked = 0
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc.resolve()
            assert dest.exists(), f"{doc.name} links to {target}: no file {dest}"
            if anchor:
                assert anchor in headings.get(dest, set()), f"{doc.name} links to {target}: no such heading"
            checked += 1
    assert checked > 10  # the README links into docs/performance.md in many places
