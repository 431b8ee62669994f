"""Every repository path and test the Markdown names in a code span is there.

Links are checked by test_links.py; this is for what the prose names
without linking: `tests/config/test_envoy_routes.py`, or a test's name
(`test_openapi_describes_every_route_and_the_real_responses`) a reader is
told to copy. A file moved or a test renamed leaves them pointing at
nothing, quietly. The measurement logs are left out: they record what the
tree was when each run was made.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from .test_links import CODE_SPAN, ROOT, markdown_files

# A path from the repository's root: one of its top-level folders, then more.
PATH = re.compile(r"^(?:services|gateway|tests|scripts|envoy|consul|rabbitmq|docs)/[^\s*{}<>]+$")
TEST_NAME = re.compile(r"^test_\w+$")
# adding-a-service.md walks through making services/tag, which is not in the tree.
EXAMPLES = ("services/tag",)


@cache
def defined_tests(root: Path) -> frozenset[str]:
    found: set[str] = set()
    for module in root.rglob("test_*.py"):
        if not any(part.startswith(".") or part == "run" for part in module.relative_to(root).parts):
            found.update(re.findall(r"^\s*(?:async )?def (test_\w+)", module.read_text(), re.MULTILINE))
    return frozenset(found)


def missing(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for span in CODE_SPAN.findall(page.read_text()):
        text = " ".join(span.strip("`").split())
        path = text.split(":")[0].rstrip("/")
        if PATH.match(path) and not path.startswith(EXAMPLES) and not (root / path).exists():
            problems.append(f"{text}: no such path")
        elif TEST_NAME.match(text) and text not in defined_tests(root):
            problems.append(f"{text}: no such test")
    return problems


@pytest.mark.parametrize(
    "page",
    [page for page in markdown_files() if "measurements" not in page.parts],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_what_the_docs_name_is_there(page: Path) -> None:
    assert missing(page) == []


def test_the_check_finds_a_moved_file_and_a_renamed_test(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_here.py").write_text("async def test_that_is_here():\n    pass\n")
    page = tmp_path / "page.md"
    page.write_text(
        "See `tests/test_here.py`, `tests/test_gone.py:12`, `test_that_is_here`,\n"
        "`test_that_was_renamed` and `services/tag/tag_service`.\n"
    )
    assert missing(page, tmp_path) == ["tests/test_gone.py:12: no such path", "test_that_was_renamed: no such test"]
