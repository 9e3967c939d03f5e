"""MkDocs hook: pages include the committed result files, so the numbers in the docs ARE bench/results/.

A line `<!-- include: bench/results/ctr_ml100k.md -->` (path from the repository root) is replaced by that
file's content at build time; a missing file fails the build. `<!-- include?: PATH -->` is the optional form,
for results still being produced: the file's content when it exists, a "not measured yet" line otherwise.
The included file's headings are shifted so its top heading sits one level under the heading the marker is
in, relative links in it are rebased onto the including page, and a "Source:" line names the file. Every PNG
(and SVG, JSON, CSV) under bench/results/ is published at `bench/results/<name>`, so a page can show it (from docs/results/:
`![...](../bench/results/x.png)`), and an included result file can link its own plots (`![...](x_auc.png)`).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

MARKER = re.compile(r"^<!--\s*include(\?)?:\s*(\S+)\s*-->[ \t]*$", re.M)
HEADING = re.compile(r"^(#{1,6})[ \t]")
FENCE = re.compile(r"^(```|~~~)")
PUBLISHED = ("bench/results", ("*.png", "*.svg", "*.json", "*.csv"))  # static files pages and results may link
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _headings(lines: list[str]):
    """(index, level) of each ATX heading outside fenced code."""
    fenced = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            yield i, len(m.group(1))


def _shifted(text: str, parent_level: int) -> str:
    lines = text.splitlines()
    found = list(_headings(lines))
    if found:
        shift = parent_level + 1 - min(level for _, level in found)
        for i, level in found:
            lines[i] = "#" * min(6, max(1, level + shift)) + lines[i][level:]
    return "\n".join(lines).strip("\n")


def _rebased(text: str, rel: str, page_uri: str) -> str:
    """Relative links of an included file (written from its own folder) rewritten for the including page."""

    def rebase(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(rel), path))
        site_path = repo_path[len("docs/"):] if repo_path.startswith("docs/") else repo_path
        new = posixpath.relpath(site_path, posixpath.dirname(page_uri) or ".")
        return f"{match.group(1)}{new}{hash_}{anchor}{match.group(3)}"

    return LINK.sub(rebase, text)


def on_files(files, config):
    root = _root(config)
    folder, patterns = PUBLISHED
    for pattern in patterns:
        for path in sorted((root / folder).glob(pattern)):
            files.append(File.generated(config, path.relative_to(root).as_posix(), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    root = _root(config)
    where = page.file.src_uri

    def include(match: re.Match) -> str:
        optional, rel = match.group(1) == "?", match.group(2)
        path = (root / rel).resolve()
        if root not in path.parents:
            raise PluginError(f"{where}: include '{rel}' is outside the repository")
        if not path.is_file():
            if optional and rel.startswith("runs/results/movielens/"):
                return (f"*MovieLens-100K results are never committed: this table is `{rel}`, written where the "
                        "benchmark ran on a local copy of the data (`MOVIELENS=/path`).*")
            if optional:
                return f"*Not measured yet: `{rel}` is not in this checkout.*"
            raise PluginError(f"{where}: included file '{rel}' does not exist")
        before = markdown[: match.start()].splitlines()
        levels = [level for _, level in _headings(before)]
        body = _shifted(path.read_text(encoding="utf-8"), levels[-1] if levels else 1)
        body = _rebased(body, rel, where)
        return f"{body}\n\n<small>Source: `{rel}`</small>\n"

    return MARKER.sub(include, markdown)
