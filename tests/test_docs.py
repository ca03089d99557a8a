"""Every command the guide shows runs as written: README.md and docs/*.md, code blocks and inline code.

- `python -m stages.X ...` and `python -m metrics.adm ...`: parsed by that module's own argparse parser (its
  main runs up to the parse, then stops), and every `--set key=value` is a param the command reads (the
  stage's params in dvc.yaml; the plan's: the train, sample and evaluate stages');
- `dvc exp run ... -S key=value`: the key is a param of params.yaml;
- `make X`: a target of the Makefile;
- `python benchmarks/X.py --flag`: the script exists and defines the flag;
- an inline `section.key` param name: a key of params.yaml, params-imagenet.yaml or released/params.yaml.
A renamed param, flag, target or script then fails here instead of in a reader's terminal.
"""

import argparse
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_TYPES = {"py", "json", "jsonl", "tsv", "npz", "msgpack", "yaml", "md", "png", "txt", "pt", "pb", "html", "lock"}
SECTIONS = ("seed", "data", "vae", "encode", "train", "sample", "curves", "reference", "evaluate")
PARAMS = [yaml.safe_load((ROOT / p).read_text()) for p in ("params.yaml", "params-imagenet.yaml",
                                                          "released/params.yaml")]


def snippets(page: Path) -> list[str]:
    """Lines of fenced code blocks, and inline code spans, of a Markdown page."""
    text = page.read_text()
    out, fenced = [], re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    for block in fenced:
        out += [line for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


def commands(line: str) -> list[list[str]]:
    """The shell commands of a line, as argument lists, without comments, env assignments and prompts;
    synopsis lines ("[--flag ...]", "A|B") are left out."""
    line = line.split(" #", 1)[0].strip().removeprefix("$ ")
    if not line or "[--" in line or " ..." in line or re.search(r"\w\|\w", line):
        return []
    try:
        words = shlex.split(line)
    except ValueError:
        return []
    out, cmd = [], []
    for w in words + ["&&"]:
        if w in ("&&", ";", "||", "|"):
            while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
                cmd = cmd[1:]
            if cmd:
                out.append(cmd)
            cmd = []
        else:
            cmd.append(w)
    return out


def all_commands():
    for page in PAGES:
        for line in snippets(page):
            for cmd in commands(line):
                yield page.relative_to(ROOT).as_posix(), line, cmd


class Parsed(Exception):
    pass


def parse(module: str, argv: list[str]) -> argparse.Namespace:
    """argv as `python -m <module>` parses it: the module's main runs until its parser has parsed."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    mod = importlib.import_module(module)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            mod.main(argv)
        except Parsed as p:
            return p.args[0]
    raise AssertionError(f"{module}.main returned without parsing its arguments")


def declared(stage: str) -> list[str]:
    from stages.runtime.common import declared_params

    return declared_params(stage, ROOT / "dvc.yaml")


def key_of(assignment: str) -> str:
    return assignment.split("=", 1)[0]


def is_param(key: str) -> bool:
    def has(tree, parts):
        for p in parts:
            if not isinstance(tree, dict) or p not in tree:
                return False
            tree = tree[p]
        return True

    return any(has(p, key.split(".")) for p in PARAMS)


def check_python(cmd: list[str]) -> None:
    module, argv = cmd[2].rstrip(").,;:"), cmd[3:]
    if not module.startswith(("stages.", "metrics.")) or "<" in module:
        return
    if not argv:  # the command named, not run: it exists
        assert callable(importlib.import_module(module).main)
        return
    args = parse(module, argv)
    sets = [key_of(s) for s in getattr(args, "set", None) or []]
    stage = module.split(".")[-1]
    reads = (declared("train") + declared("sample") + declared("evaluate") if stage == "plan"
             else declared(stage) if stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] else [])
    for key in sets:
        if stage != "sweep":  # the sweep passes its -S to every experiment: any param
            assert any(key == k or key.startswith(k + ".") for k in reads), f"--set {key}: not a param {module} reads"
        assert is_param(key), f"--set {key}: not in params.yaml"


def check(cmd: list[str]) -> None:
    exe = Path(cmd[0]).name
    if exe.startswith("python") and len(cmd) > 2 and cmd[1] == "-m":
        if cmd[2] == "dvc":
            return check(["dvc", *cmd[3:]])
        return check_python(cmd)
    if exe.startswith("python") and len(cmd) > 1 and cmd[1].startswith("benchmarks/"):
        script = ROOT / cmd[1]
        assert script.is_file(), f"{cmd[1]}: no such script"
        source = script.read_text()
        for flag in (a.split("=", 1)[0] for a in cmd[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{cmd[1]}: no flag {flag}"
    elif exe == "make" and len(cmd) > 1:
        targets = re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M)
        for t in (w for w in cmd[1:] if "=" not in w):
            assert t in targets, f"make {t}: no such target (the Makefile has {targets})"
    elif exe == "dvc" and len(cmd) > 2 and cmd[1:3] == ["exp", "run"]:
        for i, w in enumerate(cmd):
            if w in ("-S", "--set-param") and i + 1 < len(cmd):
                key = key_of(cmd[i + 1]).split(":")[-1]  # params-imagenet.yaml:train.steps
                assert is_param(key), f"dvc exp run -S {key}: not a param"


CASES = sorted({(page, line, tuple(cmd)) for page, line, cmd in all_commands()
                if Path(cmd[0]).name.startswith(("python", "make", "dvc"))})


@pytest.mark.parametrize("page, line, cmd", CASES, ids=[f"{p}: {' '.join(c)[:60]}" for p, _, c in CASES])
def test_every_command_runs_as_written(page, line, cmd):
    check(list(cmd))


def test_every_param_named_in_the_guide_exists():
    missing = []
    for page in PAGES:
        for span in snippets(page):
            for key in re.findall(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z_0-9]+)+)(?![\w(/-])", span):
                if key.rsplit(".", 1)[1] in FILE_TYPES:  # train.py, curves.json: a file, not a param
                    continue
                if not is_param(key.rstrip(".")):
                    missing.append(f"{page.relative_to(ROOT)}: {key}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_the_guide_has_commands_to_check():
    assert len(CASES) > 30 and any(c[2] == "stages.train" for _, _, c in CASES if len(c) > 2)


def test_the_readme_is_a_guide_a_newcomer_reads_in_five_minutes():
    """README.md at most 250 lines; no prose line of README or docs/ over 120 characters (code blocks and
    table rows may be longer)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    long = []
    for page in PAGES:
        fenced = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            fenced ^= line.startswith("```")
            if len(line) > 120 and not fenced and not line.startswith("|") and not line.startswith("```"):
                long.append(f"{page.relative_to(ROOT)}:{n}: {len(line)} characters")
    assert not long, "\n".join(long)
