"""The report's PDF: latexmk run quietly (its output kept in a log file), a failed build's errors, the PDF's path."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from helpers.core.settings import REPO

REPORT_DIR = REPO / "report"


class LatexError(RuntimeError):
    """The PDF did not build; the message holds the LaTeX errors and where the whole log is."""


def build_pdf(profile: str, folder: str | Path | None = None, timeout_s: float = 600) -> Path:
    """<folder>/main-<profile>.pdf from main.tex with latexmk (folder: report/); its chatter goes to
    main-<profile>.latexmk.log. Raises LatexError with the log's errors."""
    folder = Path(folder if folder is not None else REPORT_DIR)
    job = f"main-{profile}"
    if shutil.which("latexmk") is None:
        raise LatexError("latexmk is not installed: see docs/report.md (LaTeX installation)")
    command = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"-jobname={job}", "main.tex"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout_s)
    chatter = folder / f"{job}.latexmk.log"
    chatter.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        log = folder / f"{job}.log"
        errors = latex_errors(log.read_text(errors="replace")) if log.exists() else ""
        raise LatexError(f"the PDF did not build:\n{errors or last_lines(chatter.read_text())}\n(whole log: {log})")
    return folder / f"{job}.pdf"


def latex_errors(log: str, context: int = 3) -> str:
    """The error lines of a LaTeX log ('! ...') with the few lines after each (they hold 'l.<line> <source>')."""
    lines = log.splitlines()
    picked = [lines[i : i + 1 + context] for i, line in enumerate(lines) if line.startswith("!")]
    return "\n".join("\n".join(block) for block in picked)


def last_lines(text: str, count: int = 15) -> str:
    return "\n".join(text.splitlines()[-count:])


def page_count(pdf: Path) -> int | None:
    """Pages of a PDF LaTeX wrote, from its log ('Output written on main.pdf (8 pages, ...)')."""
    log = pdf.with_suffix(".log")
    found = re.search(r"Output written on .*?\((\d+) pages?", log.read_text(errors="replace")) if log.exists() else None
    return int(found.group(1)) if found else None
