"""Every relative link in the repo's Markdown reaches a file, and a heading when it names one.

The docs are read on GitHub and in a clone; a page moved or a heading
renamed leaves links that fail quietly there, so they fail here. A file
GitHub does not have (one git does not track, or one outside the repository)
is a 404 there, though a clone finds it.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Markdown puts a line break, but never a blank line, inside a link's text or
# a code span: prose here is hard-wrapped.
WITHIN_A_PARAGRAPH = r"\n(?![ \t]*\n)"
# [text](target) and [text](target "title"). An image, ![alt](src), holds one,
# so its source is checked too.
LINK = re.compile(rf"\[(?:[^\]\n]|{WITHIN_A_PARAGRAPH})*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A reference-style link's definition, [ref]: target, checked as the inline
# link's target is. A [text][ref] naming no definition is not looked for:
# GitHub shows it as text, which a check could not tell from prose's a[i][j].
DEFINITION = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*<?([^\s>]+)>?", re.MULTILINE)
# What is removed before links are looked for: a link written in code is shown
# as text, not followed, so it may name a file that is not there.
CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(rf"`(?:[^`\n]|{WITHIN_A_PARAGRAPH})*`")
# Without a .git (a ZIP download), the Markdown is every *.md but in these
# folders (and hidden ones, .venv's among them): tools' and the stack's.
NOT_THE_REPOS = {"run", "build", "node_modules", "__pycache__"}


@cache
def tracked(root: Path) -> frozenset[str] | None:
    """The files git tracks under ``root``, and the folders holding them; None without a .git."""
    if not (root / ".git").exists():
        return None
    # safe.directory: git refuses a checkout another user owns (a CI agent's, run as root) as "dubious".
    listed = subprocess.run(
        ["git", "-c", f"safe.directory={root}", "ls-files", "-z"], cwd=root, check=True, capture_output=True, text=True
    )
    names = set()
    for name in listed.stdout.split("\0"):
        if name:
            names.add(name)
            names.update(str(folder) for folder in PurePosixPath(name).parents)  # "." among them
    return frozenset(names)


def markdown_files(root: Path = ROOT) -> list[Path]:
    names = tracked(root)
    if names is None:
        return sorted(
            page
            for page in root.rglob("*.md")
            if not any(part.startswith(".") or part in NOT_THE_REPOS for part in page.relative_to(root).parts[:-1])
        )
    # A file deleted and not yet committed is still in git's index.
    return sorted(root / name for name in names if name.endswith(".md") and (root / name).is_file())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as shown, lower case, punctuation dropped, spaces to hyphens.

    Shown, a code span keeps what it holds; elsewhere a link shows its text,
    an HTML tag nothing, and ``*`` and ``_`` nothing when they mark emphasis:
    ``_`` only at a word's edge (``snake_case`` keeps its own).
    """
    shown = []
    for n, part in enumerate(re.split(r"(`[^`]*`)", heading)):
        if n % 2:  # a code span
            shown.append(part[1:-1])
        else:
            part = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", part)
            shown.append(re.sub(r"<[^>]+>|\*|(?<!\w)_+|_+(?!\w)", "", part))
    text = "".join(shown).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in CODE_BLOCK.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeats
    return frozenset(found)


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", CODE_BLOCK.sub("", page.read_text()))
    targets = LINK.findall(text) + DEFINITION.findall(text)
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    names = tracked(root)
    for target in links(page):
        raw_path, _, raw_anchor = target.partition("#")
        path, anchor = unquote(raw_path), unquote(raw_anchor)
        # Resolved as GitHub does, by the link's text: ".." is the folder above, whatever symlinks say,
        # and a path from "/" starts at the repository's root.
        base = root if path.startswith("/") else page.parent
        dest = Path(os.path.normpath(base / path.lstrip("/"))) if path else page
        if not dest.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif names is not None and dest.relative_to(root).as_posix() not in names:
            problems.append(f"{target}: not tracked by git")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no such heading")
    return problems


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken(page) == []


def test_the_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text(
        "# A heading, with punctuation\n\n## Again\n## Again\n"
        "## The `rate_limit_reads` setting, `_private` and snake_case\n"
        "## Reads ÷ seconds ≥ *one* _emph_ and <code>x</code>\n"
        "## Café\n"
    )
    (tmp_path / "with space.md").write_text("# Here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-punctuation) [ok](other.md#again-1) [ok](#here)\n"
        "# Here\n"
        "[ok](other.md#the-rate_limit_reads-setting-_private-and-snake_case)\n"
        "[ok](other.md#reads--seconds--one-emph-and-x) [ok](other.md#caf%C3%A9) [ok](with%20space.md#here)\n"
        "[ok, over\ntwo lines](other.md#again) [ok][ref]\n"
        "\n"
        "[gone](missing.md) [gone](other.md#nowhere) [web](https://example.com/x.md)\n"
        "`[code](missing-too.md)` and `[code over\ntwo lines](missing-three.md)`\n"
        "[gone over\ntwo lines](missing-four.md) [gone][gone-ref]\n"
        "[gone](other.md#the-ratelimitreads-setting-private-and-snakecase) [gone](other.md#caf%C3%A8)\n"
        "[not a link, a paragraph apart\n\n](missing-five.md)\n"
        "\n"
        "[ref]: other.md#again\n"
        "[gone-ref]: missing-six.md\n"
    )
    assert broken(page, tmp_path) == [
        "missing.md: no such file",
        "other.md#nowhere: no such heading",
        "missing-four.md: no such file",
        "other.md#the-ratelimitreads-setting-private-and-snakecase: no such heading",
        "other.md#caf%C3%A8: no such heading",
        "missing-six.md: no such file",
    ]


def test_a_file_github_does_not_have_is_broken_though_it_is_there(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs" / "kept").mkdir(parents=True)
    (root / "docs" / "local").mkdir()
    (root / "docs" / "kept" / "a.md").write_text("# A\n")
    (root / "docs" / "local" / "notes.md").write_text("# Notes\n")
    (root / "docs" / "local.md").write_text("# Local\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = root / "docs" / "page.md"
    page.write_text(
        "[ok](kept/a.md#a) [ok](kept) [ok](..) [ok](../docs/./kept/a.md) [ok](/docs/kept/a.md)\n"
        "[untracked](local.md) [untracked](local) [outside](../../outside.md) [outside](../../repo-not/x.md)\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "docs/kept/a.md", "docs/page.md"], cwd=root, check=True)
    assert markdown_files(root) == [root / "docs" / "kept" / "a.md", page]
    assert broken(page, root) == [
        "local.md: not tracked by git",
        "local: not tracked by git",
        "../../outside.md: outside the repository",
        "../../repo-not/x.md: outside the repository",
    ]


def test_without_git_the_markdown_is_every_md_file_outside_tools_folders(tmp_path: Path) -> None:
    for name in ("README.md", "docs/a.md", ".venv/x.md", "run/y.md", "node_modules/z/z.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("[ok](/README.md) [ok](docs/a.md) [ok](/run/y.md) [gone](gone.md)\n")
    assert markdown_files(tmp_path) == [tmp_path / "README.md", tmp_path / "docs" / "a.md"]
    # Without git, "tracked" can only be "there": a link to run/y.md passes.
    assert broken(tmp_path / "README.md", tmp_path) == ["gone.md: no such file"]
