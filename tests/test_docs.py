"""README: a first screen (what it is, the two commands, one figure, where to go next); details live in docs/."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def links(path: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)", path.read_text()) if "://" not in t]


def test_readme_first_screen_has_the_commands_a_figure_and_the_way_on():
    assert len(README.splitlines()) <= 60 and len(README) < 4000
    assert "make smoke" in README and "make test" in README
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert len(images) == 1 and (REPO / images[0]).is_file() and "smoke" in images[0]
    assert "constraints.txt" in README and "Versions" in README
    assert "flwr" not in README  # Flower has its own page now


def test_every_link_of_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in links(page):
            resolved = (page.parent / target).resolve().relative_to(REPO).as_posix()
            assert (REPO / resolved).exists(), f"{page.name}: {target}"
    linked = {(REPO / t).resolve() for t in links(REPO / "README.md")}
    assert set((REPO / "docs").glob("*.md")) <= linked, "a docs page nobody links"


def test_the_former_readme_sections_live_in_docs():
    # the sections of the 30 KB README before the split: moved, not deleted
    former = ["Profiles", "Notebooks (Colab)", "Reproduction guide", "Model editing: controls, calibration data",
              "Report", "Runs, checkpoints, resume", "Command line and batch runs",
              "Flower (optional): the same clients on a real federation", "On a real federation", "Benchmark",
              "Layout", "Tests"]  # fmt: skip
    docs = "\n".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    headings = set(re.findall(r"(?m)^#+ (.+)$", docs))
    for name in former:
        assert any(h.startswith(name) for h in headings), name
