"""The documentation stays true to the code and to the repository.

- Every dotted name ``bdiff_pyro.<module>[.<attr>...]`` written in backticks (inline code or a
  fenced block) in README.md or docs/*.md resolves by import and getattr, so renaming a
  function without updating the docs fails here.
- No file of the repository refers to a document or a path that is not in it: a reader with
  only the repository must be able to follow every reference.
"""

import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

FENCED_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
DOTTED_NAME = re.compile(r"(?<![\w.])bdiff_pyro(?:\.[A-Za-z_]\w*)+")


def code_spans(markdown):
    """The text inside backticks: fenced blocks first, then inline spans of what is left."""
    blocks = FENCED_BLOCK.findall(markdown)
    rest = FENCED_BLOCK.sub("", markdown)
    return blocks + INLINE_CODE.findall(rest)


def documented_names():
    """(doc file relative to the root, dotted name) for every name in backticks, each once."""
    found = []
    for doc in DOCS:
        names = {name for span in code_spans(doc.read_text()) for name in DOTTED_NAME.findall(span)}
        found += [(str(doc.relative_to(ROOT)), name) for name in sorted(names)]
    return found


def resolve(dotted):
    """The object a dotted name denotes: attributes by getattr, submodules by import."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for depth, attr in enumerate(parts[1:], 2):
        if not hasattr(obj, attr) and hasattr(obj, "__path__"):  # a package's submodule not imported yet
            importlib.import_module(".".join(parts[:depth]))
        obj = getattr(obj, attr)
    return obj


def test_the_docs_name_code_at_all():
    names = [name for doc, name in documented_names() if doc == "docs/math.md"]
    assert len(names) > 50, names


@pytest.mark.parametrize("doc, name", documented_names(), ids=lambda value: value)
def test_every_documented_name_exists(doc, name):
    try:
        resolve(name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{doc}: `{name}` does not resolve ({error})")


def test_resolve_rejects_a_missing_attribute_and_a_missing_module():
    assert resolve("bdiff_pyro.diffusion.bound.elbo_exact").__name__ == "elbo_exact"
    with pytest.raises(AttributeError):
        resolve("bdiff_pyro.diffusion.bound.no_such_function")
    with pytest.raises(ModuleNotFoundError):
        resolve("bdiff_pyro.no_such_module.anything")


def test_code_spans_find_inline_and_fenced_names_only():
    text = ("Prose bdiff_pyro.prose_only, `bdiff_pyro.diffusion.kernels.make_kernel(name)` inline,\n"
            "```python\nx = bdiff_pyro.load(path)\n```\n")
    names = sorted(n for span in code_spans(text) for n in DOTTED_NAME.findall(span))
    assert names == ["bdiff_pyro.diffusion.kernels.make_kernel", "bdiff_pyro.load"]


# ---------------------------------------------------------------------------------------
# References out of the repository

# spelled in two parts so that this file does not match itself
OUTSIDE_DOCUMENT = "DESIGN" + ".md"
RELATIVE_PATH = re.compile(r"(?:\.\./)+[\w.\-/]*")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "build", "dist"}


def repository_files():
    """Tracked and untracked, not ignored, files (outside .git and .venv)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            paths += [Path(folder) / name for name in files]
    return sorted(path for path in paths if path.is_file() and ".venv" not in path.relative_to(ROOT).parts)


def text_of(path):
    """The file as text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(path, text):
    """(line number, reference) for every mention of the outside design document, every
    relative path that leaves the repository from the file's own folder, and every absolute
    path into the folder that holds the repository (a path on one machine)."""
    machine_prefix = str(ROOT.parent).rstrip(os.sep) + os.sep
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if OUTSIDE_DOCUMENT in line:
            found.append((number, OUTSIDE_DOCUMENT))
        for relative in RELATIVE_PATH.findall(line):
            target = os.path.normpath(path.parent / relative)
            if os.path.commonpath([target, str(ROOT)]) != str(ROOT):
                found.append((number, relative))
        if ROOT.parent != Path(ROOT.anchor) and machine_prefix in line:
            found.append((number, machine_prefix + "..."))
    return found


def test_outside_references_are_recognised():
    up = "../"  # the paths are assembled so that this file itself holds none
    configs = ROOT / "experiments" / "configs"
    text = (f"see {OUTSIDE_DOCUMENT} section 2\ntrain: {up}data/train.txt\n"
            f"val: {up * 3}shared/val.txt\nconfig: {ROOT.parent}/other/config.yaml\nplain line\n")
    found = outside_references(configs / "example.yaml", text)
    expected = [1, 3, 4] if ROOT.parent != Path(ROOT.anchor) else [1, 3]
    assert [number for number, _ in found] == expected, found


def test_no_file_refers_outside_the_repository():
    offences = []
    for path in repository_files():
        text = text_of(path)
        if text is not None:
            offences += [f"{path.relative_to(ROOT)}:{number}: {reference}"
                         for number, reference in outside_references(path, text)]
    assert not offences, "references out of the repository:\n" + "\n".join(offences)
