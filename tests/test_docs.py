"""The docs against the code, read live (no model is built): every flag of each command is mentioned on its docs page,
every flag the docs give a command exists in that command's parser, README's links resolve, README stays a few
screens, and its quick start runs the tests the way CI does.

Which command a `--flag` in the docs belongs to: the command named last before it on the same line (a code line
ending in a backslash carries its command to the next line), else the page's own command (training.md: train, ...),
else any of ours. Flags after an outside tool (deepspeed, torchrun, sbatch, a bench/ script, ...) are not checked.
"""
import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _module_at(path: Path):
    """Import a launch/ script by path (launch/ is not a package); its main() is not run."""
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    pass


def _parser_built_in_main(module) -> argparse.ArgumentParser:
    """The parser a script builds inside main(): stopped at parse_args, before it does anything."""
    if hasattr(module, "build_parser"):
        return module.build_parser()
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def stop(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    argparse.ArgumentParser.parse_args = stop
    try:
        module.main([])
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    assert "parser" in seen, f"{module.__file__}: main() built no argparse parser"
    return seen["parser"]


def _train_parser():
    from clora_ds.arguments import build_parser

    return build_parser()


def _convert_parser():
    from clora_ds.export.convert import build_parser

    return build_parser()


# command -> (its parser, the docs page that must mention every flag)
COMMANDS = {
    "train": (_train_parser, "training.md"),
    "evaluate": (lambda: _module_at(ROOT / "launch" / "evaluate.py").build_parser(), "evaluation.md"),
    "convert": (_convert_parser, "conversion.md"),
    "prepare_assets": (lambda: _parser_built_in_main(_module_at(ROOT / "launch" / "prepare_assets.py")), "evaluation.md"),
}
# a docs file's name (or word) -> the command whose flags follow it; None: an outside tool, its flags not checked
SCRIPT_COMMANDS = {"train.py": "train", "train.sbatch": "train", "sweep.sbatch": "train", "quickstart.sh": "train",
                   "evaluate.py": "evaluate", "eval.sbatch": "evaluate", "convert_to_peft.py": "convert",
                   "clora-ds-convert": "convert", "prepare_assets.py": "prepare_assets"}
OUTSIDE_TOOLS = ("deepspeed", "torchrun", "sbatch", "srun", "scontrol", "pytest", "lm_eval", "pip", "apt-get", "apptainer")
PAGE_COMMAND = {"training.md": "train", "data.md": "train", "evaluation.md": "evaluate", "conversion.md": "convert"}
ANY = "any"
_NO_CARRY = object()

FLAG = r"(?<![\w-])--[A-Za-z][\w-]*"
TOKEN = re.compile(rf"(?P<flag>{FLAG})|(?P<script>[\w./-]*\.(?:py|sh|sbatch)\b|(?<![\w-])clora-ds-convert\b)"
                   rf"|(?P<tool>(?<![\w./-])(?:{'|'.join(map(re.escape, OUTSIDE_TOOLS))})(?![\w.-]))")


@pytest.fixture(scope="module")
def parsers():
    return {name: build() for name, (build, _) in COMMANDS.items()}


def _options(parser) -> set:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def _documentable(parser) -> list:
    """The canonical spelling of every flag a user may pass (HfArgumentParser adds dashed aliases; --help and
    suppressed flags are left out)."""
    flags = []
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flags.append(f"--{action.dest}" if f"--{action.dest}" in longs else longs[0])
    return flags


def _pages() -> list:
    return [README] + sorted(DOCS.glob("*.md"))


def _flags_by_command(path: Path):
    """(line number, flag, command or ANY or None) for every `--flag` written in a docs page."""
    default = PAGE_COMMAND.get(path.name, ANY)
    carried = _NO_CARRY
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        command = default if carried is _NO_CARRY else carried
        for m in TOKEN.finditer(line):
            if m.group("flag"):
                yield lineno, m.group("flag"), command
            elif m.group("script"):
                command = SCRIPT_COMMANDS.get(Path(m.group("script")).name)
            else:
                command = None
        carried = command if line.rstrip().endswith("\\") else _NO_CARRY


def test_every_flag_of_every_command_is_on_its_docs_page(parsers):
    missing = []
    for name, (_, page) in COMMANDS.items():
        text = (DOCS / page).read_text()
        written = set(re.findall(FLAG, text))
        missing += [f"{flag} ({name}) is not in docs/{page}" for flag in _documentable(parsers[name]) if flag not in written]
    assert not missing, "flags the docs never mention (add a line from its --help text):\n  " + "\n  ".join(missing)


def test_every_flag_the_docs_give_a_command_exists(parsers):
    options = {name: _options(p) for name, p in parsers.items()}
    ours = set().union(*options.values())
    wrong = []
    for path in _pages():
        for lineno, flag, command in _flags_by_command(path):
            if command is None:
                continue
            known = ours if command == ANY else options[command]
            if flag.split("=")[0] not in known:
                who = "any clora_ds command" if command == ANY else command
                wrong.append(f"{path.relative_to(ROOT)}:{lineno}: {flag} is not a flag of {who}")
    assert not wrong, "flags written in the docs that the parsers do not have:\n  " + "\n  ".join(wrong)


def test_the_reader_of_the_docs_attributes_flags_to_their_command(tmp_path):
    """The checker itself: a flag of another command, a continued command line and an outside tool."""
    page = tmp_path / "training.md"
    page.write_text("`--seed` and `convert_to_peft.py --merge`\n"
                    "    deepspeed --num_gpus 2 launch/evaluate.py --task_file x \\\n"
                    "        --limit 3\n"
                    "`sbatch --array=0-2` then `--packing`\n")
    assert list(_flags_by_command(page)) == [
        (1, "--seed", "train"), (1, "--merge", "convert"), (2, "--num_gpus", None), (2, "--task_file", "evaluate"),
        (3, "--limit", "evaluate"), (4, "--array", None), (4, "--packing", None)]


def _anchors(path: Path) -> set:
    """The #fragments GitHub makes of a page's headings: lower case, punctuation but - and _ dropped, spaces -> -."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves_and_readme_links_every_docs_page():
    broken = []
    for path in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            linked = path.parent / file if file else path
            if not linked.exists() or (fragment and linked.suffix == ".md" and fragment not in _anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n  " + "\n  ".join(broken)
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text()))
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages and linked == pages, f"README links {sorted(linked - pages)} that are not pages; pages it does not " \
                                      f"link: {sorted(pages - linked)}"


def test_readme_stays_a_few_screens_and_its_test_command_is_what_ci_runs():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; keep it under 250 and move reference material to docs/"
    ci = re.search(r"^bash launch/quickstart\.sh test.*$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert ci, ".ci/run no longer runs the quick start's test command"
    assert any(line.strip().startswith(ci.group(0).strip() + " ") or line.strip() == ci.group(0).strip()
               for line in lines), f"README's quick start must show CI's test command: {ci.group(0)}"


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "prepare_assets.py"])  # convert's parser is built above
def test_help_works(script):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=child_env())
    assert proc.returncode == 0 and "--" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]
