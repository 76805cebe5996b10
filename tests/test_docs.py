"""README.md and docs/: short, every relative link resolves, every poh_tune command parses."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def relative_links(text: str) -> list[str]:
    """Link targets that are neither URLs nor bare anchors, without their #anchor."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#")[0] for t in targets
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def readme_commands() -> list[list[str]]:
    """Every `python -m poh_tune...` line in README.md's code blocks, split, comment dropped."""
    cmds = []
    for block in CODE_BLOCK.findall(README.read_text()):
        for line in block.splitlines():
            if line.strip().startswith("python -m poh_tune"):
                cmds.append(shlex.split(line, comments=True))
    return cmds


def test_readme_is_short_and_starts_with_the_quick_start():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first = CODE_BLOCK.search(text).group(1)
    assert "pip install -e" in first and "launch grid --smoke" in first
    # The README's test command is what CI runs.
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert ci == ["python -m pytest -q"]
    assert re.search(r"^python -m pytest -q(\s+#.*)?$", first, re.M)


def test_link_check_finds_a_broken_link(tmp_path):
    """The checker itself: a missing target is reported, URLs and anchors are not."""
    text = ("[a](docs/metrics.md#how) [b](https://example.org/x) [c](#local) ![d](nope.png) "
            "[e](mailto:x@y)")
    assert relative_links(text) == ["docs/metrics.md", "nope.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files {missing}"


def _help_text(module: str, args: list[str]) -> str:
    """`python -m MODULE ARGS --help`, in this process: its help, and exit status 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*args, "--help"])
    assert e.value.code == 0, (module, args)
    return out.getvalue()


def _dry_run_launch(args: list[str], storage: Path) -> None:
    """What `launch` checks before Ray starts: the flags, the space, its overrides, the
    experiments named; --resume and report need a run, so only their flags are parsed."""
    from poh_tune.cli import build_parser, resolve
    from poh_tune.spaces import grid_variants

    if args[0] == "report":
        build_parser().parse_args(args)
        return
    ns = build_parser().parse_args([*args, "--storage", str(storage)])
    if ns.resume:
        return
    space, _, launch = resolve(ns)
    if ns.command == "grid":
        assert grid_variants(space, launch["experiment_names"])[0]


COMMANDS = readme_commands()


def test_readme_has_commands():
    modules = {c[2] for c in COMMANDS}
    assert {"poh_tune.launch", "poh_tune.train", "poh_tune.bench"} <= modules


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c[2:]))
def test_readme_command_parses(cmd, tmp_path):
    assert cmd[:2] == ["python", "-m"]
    module, args = cmd[2], cmd[3:]
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    help_text = _help_text(module, args)
    for f in flags:  # --help stops argparse before an unknown flag would be an error
        assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text), (f, cmd)
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if module == "poh_tune.launch":
        _dry_run_launch(args, tmp_path)
    elif overrides:
        from poh_tune.config import load_config

        load_config(None, overrides)  # every key=value a TrialConfig key of the right type
