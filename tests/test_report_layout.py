"""The report reads like a paper: figures legible at print size, every body float before the Conclusion, at most
8 pages before the references, on the smoke-like fixture and on a synthetic results set of the whole full study."""

from __future__ import annotations

import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from colour_vision import closest_pair
from full_results import MARK, write_full_results
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from test_report import write_fixture

from helpers.ops.setup import write_setup
from helpers.reporting import report
from helpers.reporting.plots import MIN_FONT_PT, PALETTE, TEXT_WIDTH_IN, readable_log_ticks

REPO = Path(__file__).resolve().parent.parent
STEP_LABELS = {"epoch", "round", "local steps J", "calibration rounds R"}
MIN_COLOUR_DIFFERENCE = 12  # CIEDE2000 for normal, protanope and deuteranope readers (10: clearly different)
# table -> the figure that plots the same final metric of the same runs
SAME_NUMBERS = {"fedavg_grid": "fedavg_heatmap", "sparse_editing": "sparse_grid", "mask_rules": "mask_rules",
                "hparam_search": "hparam_search"}  # fmt: skip


@pytest.fixture(scope="module")
def full_root(tmp_path_factory) -> Path:
    return write_full_results(tmp_path_factory.mktemp("full") / "results")


def _texts(fig: Figure) -> list:
    """Every text drawn: titles, labels, annotations, legends, and the tick labels inside the view limits."""
    undrawn = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    undrawn |= {id(tick.label1), id(tick.label2)}
    return [t for t in fig.findobj(Text) if id(t) not in undrawn and t.get_visible() and t.get_text().strip()]


def assert_legible(name: str, fig: Figure) -> None:
    """At most text width; fonts >= MIN_FONT_PT; texts inside the figure and not overlapping; legends <= 8
    entries; integer ticks on step axes."""
    assert fig.get_size_inches()[0] <= TEXT_WIDTH_IN + 1e-6, name
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = _texts(fig)
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < MIN_FONT_PT]
    assert not small, (name, small)
    boxes = [(t.get_text(), t.get_window_extent(renderer).padded(-0.5)) for t in texts]
    page = fig.bbox.padded(1.0)
    outside = [text for text, box in boxes if not page.contains(box.x0, box.y0) or not page.contains(box.x1, box.y1)]
    assert not outside, (name, "text outside the figure", outside)
    overlaps = [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    assert not overlaps, (name, "overlapping texts", overlaps[:5])
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        assert legend is None or len(legend.get_texts()) <= 8, (name, len(legend.get_texts()))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.label.get_text() in STEP_LABELS:
                labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
                assert labels and all(re.fullmatch(r"−?\d+", s) for s in labels), (name, labels)


def assert_distinct_lines_and_log_ticks(name: str, fig: Figure) -> None:
    """Legend entries differ in colour for colour-blind readers, lines also in marker and dash pattern (print in
    grey); every log x axis labels at least three ticks."""
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        handles = legend.legend_handles if legend else []
        colours = [h.get_color() if isinstance(h, Line2D) else h.get_facecolor() for h in handles]
        if len(colours) > 1:
            gap, pair = closest_pair(colours)
            assert gap >= MIN_COLOUR_DIFFERENCE, (name, pair, gap)
        lines = [h for h in handles if isinstance(h, Line2D) and h.get_color() in PALETTE]
        assert len({(h.get_marker(), h.get_linestyle()) for h in lines}) == len(lines), (name, "alike lines")
    fig.canvas.draw()
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            lo, hi = sorted(ax.get_xlim())
            labels = [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]
            assert len([t for t in labels if t]) >= 3, (name, ax.get_title(), labels)


def test_the_palette_differs_for_colour_blind_readers():
    gap, pair = closest_pair(PALETTE)
    assert gap >= MIN_COLOUR_DIFFERENCE, pair
    import seaborn as sns

    # the check can fail: seaborn's "colorblind" has an orange and a vermillion a deuteranope hardly tells apart
    assert closest_pair(sns.color_palette("colorblind", 4).as_hex())[0] < MIN_COLOUR_DIFFERENCE


@pytest.mark.parametrize(("lo", "hi"), [(0.0035, 0.0125), (3.1, 12.5), (32.6, 33.6), (3.0, 40.0), (2.5, 70000.0),
                                        (0.9, 1.1), (1e-3, 1e3), (33.9, 34.8), (20000.0, 70000.0)])  # fmt: skip
def test_log_ticks_are_round_inside_and_at_least_three(lo: float, hi: float):
    ticks = readable_log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 8 and all(lo <= t <= hi for t in ticks), ticks
    assert all(len(re.sub(r"\D", "", f"{t:f}").strip("0")) <= 3 for t in ticks), ticks  # <= 3 significant digits
    if hi / lo < 10:  # within a decade: the closest two ticks are one round step apart, and every tick a multiple of it
        step = float(np.diff(ticks).min())
        mantissa = step / 10.0 ** np.floor(np.log10(step))
        assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5)), (ticks, step)  # not 33.9, 34.3, 34.8 (steps 0.4, 0.5)
        assert all(abs(t / step - round(t / step)) < 1e-6 for t in ticks), (ticks, step)
    gaps = np.diff(np.log10(ticks)) / np.log10(hi / lo)
    assert gaps.min() >= 0.15, (ticks, gaps)  # labels spread over the axis, none crowded at one end


def test_lines_that_coincide_stay_visible():
    """Every algorithm of the remedies figure given the same numbers: each one's colour still shows in every panel."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        df = report.load_results("smoke", write_fixture(Path(tmp) / "results"))
    rows = df["source"] == "remedies"
    same = df[rows].groupby(["round", "sparsity", "classes_per_client"])[["val_acc", "upload_bytes"]].transform("first")
    df.loc[rows, ["val_acc", "upload_bytes"]] = same
    fig = report.make_figure(df, "remedies", strict=True)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3] / 255
    handles = fig.legends[0].legend_handles
    assert len(handles) == 4
    for ax in fig.axes:
        x0, y0, x1, y1 = ax.bbox.extents.astype(int)
        panel = image[image.shape[0] - y1 : image.shape[0] - y0, x0:x1]
        for handle in handles:  # pixels of about this colour (drawn under the others, only a rim of it shows)
            seen = (np.abs(panel - to_rgb(handle.get_color())).max(axis=-1) < 0.08).sum()
            assert seen >= 8, (ax.get_title(), handle.get_label(), seen)


def test_the_legibility_check_catches_small_crowded_and_clipped_text():
    fig = Figure(figsize=(TEXT_WIDTH_IN + 1, 2))
    with pytest.raises(AssertionError):
        assert_legible("too wide", fig)
    for case in ("small", "overlap", "outside", "fractional"):
        fig = Figure(figsize=(3, 2), layout="constrained")
        ax = fig.subplots()
        ax.plot([1, 2], [0, 1])
        ax.set_xlabel("epoch")
        if case == "small":
            ax.set_title("tiny", fontsize=5)
        if case == "overlap":
            ax.text(0.5, 0.5, "one", transform=ax.transAxes)
            ax.text(0.5, 0.5, "two", transform=ax.transAxes)
        if case == "outside":
            ax.text(1.2, 0.5, "beyond the right edge", transform=ax.transAxes)
        if case != "fractional":
            ax.set_xticks([1, 2])
        with pytest.raises(AssertionError):
            assert_legible(case, fig)


def test_figures_are_legible_at_print_size_on_the_fixture(tmp_path: Path):
    df = report.load_results("smoke", write_fixture(tmp_path / "results"))
    for name in report.FIGURES:
        fig = report.make_figure(df, name, strict=True)
        assert_legible(name, fig)
        assert_distinct_lines_and_log_ticks(name, fig)


def test_figures_are_legible_at_print_size_on_the_full_study(full_root: Path):
    df = report.load_results("full", full_root)
    assert set(df["data_root"]) == {MARK}  # every row says it is synthetic
    for name in report.FIGURES:
        fig = report.make_figure(df, name, strict=True)
        assert_legible(name, fig)
        assert_distinct_lines_and_log_ticks(name, fig)


def test_a_result_shown_in_a_figure_is_not_also_a_table_in_the_body():
    """One home per number: no table of main.tex summarises the same runs and metric as one of its figures."""
    tex = re.sub(r"(?m)%.*$", "", (REPO / "report" / "main.tex").read_text())  # comments mention \reportfig{name}
    figures, tables = set(re.findall(r"\\reportfig\{(\w+)\}", tex)), set(re.findall(r"\\reporttable\{(\w+)\}", tex))
    assert figures <= set(report.FIGURES) and tables - {"deviations", "setup"} <= set(report.TABLES)
    for table, figure in SAME_NUMBERS.items():
        assert not (table in tables and figure in figures), (table, figure)
    assert {"mask_rules", "communication", "fedavg_heatmap", "sparse_grid"} <= figures


def _build(results_root: Path, profile: str, tmp_path: Path) -> Path:
    """The report built as `make report` does, in a copy: figures, tables, then latexmk."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "report", copy / "report", ignore=shutil.ignore_patterns("generated", "*.pdf", "*.aux"))
    with pytest.MonkeyPatch.context() as env:  # make report writes the settings first, for the profile it builds
        env.delenv("FLME_PROFILE", raising=False)
        write_setup(profile, results_root)
    report.write_report_inputs(profile, results_root, copy / "figures", copy / "report" / "generated")
    done = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                          cwd=copy / "report", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    return copy / "report"


def float_headings(tex: str) -> dict[str, str]:
    """Each float's label -> the title of the section or subsection main.tex defines it in."""
    heading, found = "", {}
    pattern = r"\\(?:sub)?section\{([^}]*)\}|\\label\{((?:fig|tab):[^}]+)\}|\\reporttable\{(\w+)\}"
    for m in re.finditer(pattern, re.sub(r"(?m)%.*$", "", tex)):
        if m.group(1):
            heading = m.group(1)
        else:
            found[m.group(2) or f"tab:{m.group(3)}"] = heading
    return found


def assert_floats_after_their_headings(folder: Path, text: str) -> None:
    """In reading order, every figure's and table's caption comes after the heading of the section defining it."""
    numbers = dict(re.findall(r"\\newlabel\{((?:fig|tab):[^}]+)\}\{\{(\d+)\}", (folder / "main.aux").read_text()))
    for label, heading in float_headings((folder / "main.tex").read_text()).items():
        title = re.search(r"\n\f?[\d.]+\s+" + re.escape(heading) + r"\n", text)
        kind = "Figure" if label.startswith("fig:") else "Table"
        caption = re.search(rf"(?m)^{kind} {numbers[label]}:", text)
        assert title and caption and caption.start() > title.start(), (label, heading)


def assert_paper_layout(folder: Path) -> None:
    """At most 8 pages, references included; every body figure and table on a page no later than the
    Conclusion's, before its heading in reading order and after its own section's heading; no figure placeholder;
    nothing overfull."""
    pages = dict(re.findall(r"\\newlabel\{([^}]+)\}\{\{[^}]*\}\{(\d+)\}", (folder / "main.aux").read_text()))
    assert int(pages["body-end"]) <= 8, pages
    floats = {k: int(v) for k, v in pages.items() if k.startswith(("fig:", "tab:"))}
    defined = float_headings((folder / "main.tex").read_text())  # every float main.tex defines is in the PDF
    assert set(floats) == set(defined) and max(floats.values()) <= int(pages["sec:conclusion"]), pages
    text = subprocess.run(["pdftotext", "main.pdf", "-"], cwd=folder, capture_output=True, text=True).stdout
    assert text.count("\f") <= 8, "over 8 pages with the references (the course spec counts them)"
    conclusion = re.search(r"\n\f?\d+\s+Conclusion\n", text)  # \f: the heading may open a page
    assert conclusion, "no Conclusion heading"
    captions = [m.start() for m in re.finditer(r"(?m)^(?:Figure|Table) \d+:", text)]
    assert captions and max(captions) < conclusion.start(), "a caption comes after the Conclusion heading"
    assert "not generated" not in text and "not run yet" not in text and "NO RESULTS" not in text
    assert "??" not in text, "a setting main.tex quotes (\\cfg) or a reference is undefined"
    assert_floats_after_their_headings(folder, text)
    assert "Overfull \\hbox" not in (folder / "main.log").read_text()


needs_latex = pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk not installed: LaTeX not checked")


@needs_latex
def test_full_study_report_fits_eight_pages_with_floats_before_the_conclusion(full_root: Path, tmp_path: Path):
    folder = _build(full_root, "full", tmp_path)
    assert_paper_layout(folder)
    text = " ".join(
        subprocess.run(["pdftotext", "main.pdf", "-"], cwd=folder, capture_output=True, text=True).stdout.split()
    )
    assert "not run for this profile" not in text and "incomplete" not in text  # every question has its finding
    for question in ("How many epochs are needed?", "Which schedule is best?", "Does heterogeneity cost accuracy?"):
        assert question in text, question


@needs_latex
def test_fixture_report_fits_eight_pages_with_floats_before_the_conclusion(tmp_path: Path):
    assert_paper_layout(_build(write_fixture(tmp_path / "results"), "smoke", tmp_path))


@needs_latex
@pytest.mark.parametrize("flafter", [False, True])
def test_a_float_above_its_own_heading_is_caught_and_flafter_prevents_it(flafter: bool, tmp_path: Path):
    """A [t] float defined under a mid-page heading goes to the top of that page, above the heading, unless
    flafter is loaded (as main.tex does)."""
    (tmp_path / "main.tex").write_text("\n".join([
        r"\documentclass{article}", r"\usepackage{flafter}" if flafter else "", r"\begin{document}",
        r"\section{First}", "Some text.", r"\section{Second}", "More text.",
        r"\begin{figure}[t]\centering\fbox{x}\caption{A float.}\label{fig:x}\end{figure}", r"\end{document}",
    ]))  # fmt: skip
    subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "main.tex"], cwd=tmp_path, capture_output=True,
                   timeout=120, check=True)  # fmt: skip
    text = subprocess.run(["pdftotext", "main.pdf", "-"], cwd=tmp_path, capture_output=True, text=True).stdout
    if flafter:
        assert_floats_after_their_headings(tmp_path, text)
    else:
        with pytest.raises(AssertionError):
            assert_floats_after_their_headings(tmp_path, text)
    assert "flafter" in (REPO / "report" / "main.tex").read_text()


@pytest.mark.parametrize("study", ["fixture", "full"])
def test_table_headers_name_each_column_once(study: str, full_root: Path, tmp_path: Path):
    """No "setting = Nc=1": a sharding heads its column as $N_c = 1$ (or IID), and no header repeats a name."""
    root = full_root if study == "full" else write_fixture(tmp_path / "results")
    profile = "full" if study == "full" else "smoke"
    for path in report.write_tables(report.load_results(profile, root), profile, tmp_path / "gen"):
        lines = path.read_text().splitlines()
        if r"\toprule" not in lines:
            continue
        header = lines[lines.index(r"\toprule") + 1]
        cells = [c.strip() for c in header.removesuffix(r"\\").split("&")]
        for cell in cells:
            assert "setting" not in cell and "Nc=" not in cell and cell.count("=") <= 1, (path.name, cell)
        assert len(set(cells)) == len(cells), (path.name, cells)


@needs_latex
def test_escaped_text_prints_as_written(tmp_path: Path):
    """latex_escape'd text reads the same in the PDF: results/<profile>/ is not "results/¡profile¿/"."""
    text = r"results/<profile>/a.csv & 50% $5 #1 {a} ~ ^ | \ x"
    body = report.latex_escape(text)
    (tmp_path / "main.tex").write_text("\n".join([r"\documentclass{article}", r"\begin{document}", body,
                                                  r"\end{document}"]))  # fmt: skip
    subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=tmp_path,
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    printed = subprocess.run(["pdftotext", "main.pdf", "-"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert text in printed.replace("\u02dc", "~").replace("\u02c6", "^"), printed  # the accents pdftotext reads


@needs_latex
def test_a_profile_without_results_says_so_on_page_one(tmp_path: Path):
    folder = _build(tmp_path / "no-results", "full", tmp_path)
    first = subprocess.run(["pdftotext", "-l", "1", "main.pdf", "-"], cwd=folder, capture_output=True,
                           text=True).stdout  # fmt: skip
    assert "NO RESULTS" in first and "holds no results" in " ".join(first.split()), first[:1500]
    whole = subprocess.run(["pdftotext", "main.pdf", "-"], cwd=folder, capture_output=True, text=True).stdout
    assert "results/<profile>/" in whole and "¡" not in whole and "¿" not in whole


def test_the_no_results_banner_follows_the_results_found(tmp_path: Path):
    empty = report.write_tables(report.load_results("full", tmp_path / "none"), "full", tmp_path / "a")
    fixture = report.load_results("smoke", write_fixture(tmp_path / "results"))
    filled = report.write_tables(fixture, "smoke", tmp_path / "b")
    assert r"\newcommand{\resultsfiles}{0}" in empty[-1].read_text()
    assert rf"\newcommand{{\resultsfiles}}{{{fixture['source'].nunique()}}}" in filled[-1].read_text()
    assert r"\ifnum\resultsfiles=0" in (REPO / "report" / "main.tex").read_text()


def test_generated_report_files_of_every_profile_are_ignored_by_git():
    """What 07 and `make report` write for any profile (its placeholders too) can never be committed by mistake."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    generated = [
        "figures/full/remedies.png",
        "figures/any-profile/remedies.pdf",
        "report/generated/profile.tex",
        "report/generated/full/remedies.tex",
        "report/generated/any-profile/remedies.tex",
        "report/main-full.pdf",
        "report/main-any-profile.pdf",
        "report/main-full.log",
        "results/smoke/a.csv",
    ]
    kept = ["report/main.tex", "report/references.bib", "figures/.gitkeep", "docs/img/smoke_fedavg_heatmap.png",
            "results/full/remedies.csv"]  # fmt: skip
    for path, ignored in [*((p, True) for p in generated), *((p, False) for p in kept)]:
        done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO)
        assert (done.returncode == 0) == ignored, path
