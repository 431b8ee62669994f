"""The README's table of measured figures says what docs/gateway.md says.

The README repeats the gateway's five figures for a first reader; the
tallies are kept in docs/gateway.md, run after run, and the README's copy
fell behind (5 of 10 there, 8 of 14 here) before this test.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The targets of the gateway's five figures, as both tables write them.
TARGETS = ("≥ 0.45", "≥ 0.7", "≥ 0.8", "≥ 0.85", "≤ 4")


def figures(page: Path) -> dict[str, tuple[str, str]]:
    """Target -> (the runs' range, the target with its tally), from a page's Markdown tables."""
    found = {}
    for line in page.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (target := re.match(r"[≥≤] [\d.]+", cells[-1])) and target.group() in TARGETS:
            found[target.group()] = (cells[-2], cells[-1])
    return found


def test_the_readme_repeats_the_gateways_figures_as_they_are() -> None:
    gateway = figures(ROOT / "docs" / "gateway.md")
    assert set(gateway) == set(TARGETS)
    assert figures(ROOT / "README.md") == gateway
