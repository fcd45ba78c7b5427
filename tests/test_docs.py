"""README: a first screen (what it is, the three commands, one figure the pipeline draws, where to go next); details
live in docs/."""

import re
import shutil
from pathlib import Path

import numpy as np

from helpers.ops.pipeline import README_DATA, README_FIGURE, README_IMAGE, refresh_readme_figure

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"


def links(path: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)", path.read_text()) if "://" not in t]


def test_readme_first_screen_has_the_commands_a_figure_and_the_way_on():
    assert len(README.splitlines()) <= 60 and len(README) < 4000
    first_screen = README[: README.index("## On a Colab T4")]
    for command in ("make smoke", "make report", "make test"):  # each with what it gives, in the code block
        assert re.search(rf"(?m)^{command} +# \S", first_screen), command
    assert "remedies" in first_screen.lower() and "docs/remedies.md" in first_screen
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert len(images) == 1 and (REPO / images[0]) == README_IMAGE and README_IMAGE.is_file()
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


def test_the_readme_figure_is_what_the_pipeline_draws_from_the_rows_beside_it(tmp_path: Path):
    """Redrawn by the report's own function from docs/img/<figure>.csv (the rows the smoke pipeline copied with it),
    the README's image comes out the same: it is the current style, not an old picture."""
    from matplotlib.image import imread

    from helpers.reporting import report

    source, _ = README_DATA
    (tmp_path / "results" / "smoke").mkdir(parents=True)
    shutil.copyfile(README_IMAGE.with_suffix(".csv"), tmp_path / "results" / "smoke" / f"{source}.csv")
    df = report.load_results("smoke", tmp_path / "results")
    drawn = report.save_figure(report.make_figure(df, README_FIGURE, strict=True), "x", "smoke", tmp_path / "fig")[0]
    ours, theirs = imread(drawn), imread(README_IMAGE)
    assert ours.shape == theirs.shape
    differing = (np.abs(ours - theirs).max(axis=-1) > 0.1).mean()  # text may shift by a pixel under another FreeType
    assert differing < 0.01, f"{differing:.1%} of the pixels differ: make smoke redraws {README_IMAGE.name}"


def test_a_smoke_pipeline_copies_the_readme_figure_and_its_rows(tmp_path: Path):
    figures, results, image = tmp_path / "figures", tmp_path / "results", tmp_path / "img" / "fig.png"
    image.parent.mkdir()
    assert not refresh_readme_figure(figures, results, image)  # 07 has not drawn it: nothing to copy
    (figures / "smoke").mkdir(parents=True)
    (figures / "smoke" / f"{README_FIGURE}.png").write_bytes(b"png")
    (results / "smoke").mkdir(parents=True)
    source, columns = README_DATA
    (results / "smoke" / f"{source}.csv").write_text(",".join([*columns, "elapsed_s"]) + "\n" + "1," * len(columns)
                                                     + "2.5\n" + "1," * (len(columns) - 1) + ",3\n")  # fmt: skip
    assert refresh_readme_figure(figures, results, image)
    assert image.read_bytes() == b"png"
    rows = image.with_suffix(".csv").read_text().splitlines()
    assert rows == [",".join(columns), ",".join(["1"] * len(columns))]  # final rows only, no timings
    assert not refresh_readme_figure(figures, results, image)  # unchanged: the files are not rewritten


def test_the_cost_table_of_the_docs_is_what_the_estimator_prints(monkeypatch):
    """docs/reproduce.md holds the T4 estimate per notebook as `python -m helpers.cost --markdown` prints it."""
    from helpers.ops.cost import MARKDOWN_BEGIN, MARKDOWN_END, cost_markdown

    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would turn the full profile into smoke
    text = (DOCS / "reproduce.md").read_text()
    block = text[text.index(MARKDOWN_BEGIN) : text.index(MARKDOWN_END) + len(MARKDOWN_END)]
    assert block == cost_markdown("full"), "run `python -m helpers.cost --markdown` and paste it into reproduce.md"
    for page in DOCS.glob("*.md"):  # nowhere else a number of T4 hours that could go stale
        outside = page.read_text().replace(block, "")
        assert not re.search(r"\d+(\.\d+)? (T4|GPU)[- ]hours", outside), page.name


def test_the_readme_memory_figures_are_what_the_estimator_gives(monkeypatch):
    """The README's GPU memory per phase is `helpers.ops.memory`'s estimate for the full profile, rounded as shown."""
    from helpers.config.experiments import make_config
    from helpers.ops.memory import GiB, estimate_phases

    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would turn the full profile into smoke
    config = make_config("fedavg", "full")
    phases = {p.name.split(" (")[0]: p for p in estimate_phases(config)}
    text = " ".join(README.split())
    said = re.search(r"a FedAvg round at batch (\d+) ([\d.]+) GiB, per-sample scoring \(chunk (\d+)\) ([\d.]+) GiB, "
                     r"evaluation ([\d.]+) GiB", text)  # fmt: skip
    assert said, "the README's memory sentence changed: keep this test's pattern in step"
    batch, dense, chunk, scoring, evaluation = said.groups()
    assert int(batch) == config["batch_size"] and f"chunk {chunk}," in phases["sensitivity scoring"].name + ","
    for shown, phase in ((dense, "dense fine-tuning"), (scoring, "sensitivity scoring"), (evaluation, "evaluation")):
        assert shown == f"{phases[phase].total / GiB:.1f}", (phase, shown)


def test_no_count_of_tests_in_the_docs():
    """A count of tests goes stale with the next test: the docs say how to count them instead."""
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        assert not re.search(r"\b\d[\d,]* (unit )?tests\b", page.read_text()), page.name
    assert "pytest --collect-only -q" in (DOCS / "development.md").read_text()
