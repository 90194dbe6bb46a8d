"""The docs tell the truth: every `pickscore` flag that README.md and docs/*.md show exists on that very
command, docs/cli.md documents every flag of every command, local links resolve, the README stays
short, and the README's quickstarts run as written (with the tiny random-weights model standing in for
PickScore's weights: the only substitution, besides the images, which are generated)."""

from __future__ import annotations

import argparse
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"
README_MAX_LINES = 200


def doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


# ---- reading markdown ----------------------------------------------------------------------------
@dataclass
class Block:
    """A fenced code block: its info string, body, line number, and the `<!-- ... -->` marker right above it."""

    lang: str
    body: str
    line: int
    marker: str | None


MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")


def fenced_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening.group(2), i
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = MARKER.match(lines[j].strip()) if j >= 0 else None
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(opening.group(3).lower(), "\n".join(body), start + 1, marker.group(1) if marker else None))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\s*\2\s*$", "", text, flags=re.M | re.S)


def joined_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", body).splitlines()


def without_substitutions(line: str) -> str:
    """The line with each shell command substitution `$(...)` replaced by a placeholder word (its quotes,
    semicolons and flags are another program's)."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 0, i + 1
            while j < len(line):
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                if depth == 0:
                    break
                j += 1
            out.append("SUBSTITUTION")
            i = j + 1
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def pickscore_segments(line: str) -> list[str]:
    """The `pickscore ...` commands on one shell line, each without its comment: split at && and ;, and at a
    pipe into another program (a ` | ` followed by a word; ` | --model M` is a usage synopsis, kept)."""
    line = re.sub(r"(^|\s)#.*$", "", without_substitutions(line))
    parts = re.split(r"&&|;|\s\|\s+(?=[A-Za-z./])", line)
    found = []
    for part in parts:
        m = re.match(r"^\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\S*/)?pickscore(?=\s|$)(.*)$", part)
        if m:
            found.append(m.group(1))
    return found


def tokens(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError:
        return args.split()


FLAG = re.compile(r"^[\[(|]*(--?[A-Za-z][\w-]*)")


# ---- the real parser -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from pickscore_runtime.cli import build_parser

    return build_parser()


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:  # noqa: SLF001 - argparse keeps its subparsers here; reading it in a test is fine
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {o for action in p._actions for o in action.option_strings}  # noqa: SLF001


def leaf_parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command a user can run, by its words: () is `pickscore` itself, ("engine", "build") ..."""
    out = {path: p}
    for name, sub in subcommands(p).items():
        out.update(leaf_parsers(sub, (*path, name)))
    return out


def check_command(root: argparse.ArgumentParser, args: str) -> list[str]:
    """What is wrong with one documented `pickscore ARGS`: an unknown command, or a flag its parser lacks."""
    p, path, problems = root, [], []
    for token in tokens(args):
        flag = FLAG.match(token)
        if flag:
            if flag.group(1) not in option_strings(p):
                problems.append(f"`pickscore {' '.join(path)}` has no {flag.group(1)}")
            continue
        subs = subcommands(p)
        if subs and not path or (subs and token in subs):
            if token not in subs:
                if re.fullmatch(r"[a-z][\w-]*", token):  # a placeholder (COMMAND, <cmd>) is not a claim
                    problems.append(f"`pickscore {' '.join(path)}` has no command {token!r}")
                break
            p, path = subs[token], [*path, token]
    return problems


def documented_commands(path: Path) -> list[tuple[int, str]]:
    """(line, ARGS) for every `pickscore ARGS` in a fenced block, and in inline code in the prose."""
    text = path.read_text()
    found = []
    for block in fenced_blocks(text):
        for k, line in enumerate(joined_lines(block.body)):
            found += [(block.line + k + 1, seg) for seg in pickscore_segments(line)]
    for m in re.finditer(r"`pickscore(\s[^`\n]*)?`", prose(text)):
        found.append((0, m.group(1) or ""))
    return found


def command_path(words: list[str]) -> tuple[str, ...]:
    """The command that words name: subcommands as far as they go (`cache stats` is `cache` with its
    positional action; an unknown word is kept, for the test to report)."""
    p, path = parser(), []
    for word in words:
        subs = subcommands(p)
        if not subs:
            break
        path.append(word)
        if word not in subs:
            break
        p = subs[word]
    return tuple(path)


def cli_doc_sections() -> list[tuple[tuple[tuple[str, ...], ...], str]]:
    """docs/cli.md cut at its headings: (the commands a heading names, e.g. ((), ) for `pickscore` or
    (("score",), ("serve",)), the section's text). A heading naming no command inherits its parent's."""
    sections, stack = [], []  # stack: (level, commands)
    current: list[str] = []

    def close() -> None:
        if current:
            sections.append((stack[-1][1] if stack else (), "\n".join(current)))

    for line in CLI_DOC.read_text().splitlines():
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            close()
            current = []
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            named = tuple(command_path(m.split()) for m in re.findall(r"`pickscore((?: [a-z][\w-]*)*)`", heading.group(2)))
            if named:
                stack.append((level, named))
            elif level <= 2:
                stack.clear()
        current.append(line)
    close()
    return [(commands, text) for commands, text in sections if commands]


def table_flags(text: str) -> list[str]:
    """The flags in the first column of the section's markdown tables."""
    flags = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|?\s*$", line):
            first = line.split("|")[1]
            for span in re.findall(r"`([^`]*)`", first):
                flags += [m.group(1) for t in span.split() if (m := FLAG.match(t.rstrip(",")))]
    return flags


# ---- (a) every documented flag exists ------------------------------------------------------------
@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_and_flag_exists(doc):
    root = parser()
    commands = documented_commands(doc)
    problems = [f"{doc.name}:{line}: {problem}" for line, args in commands for problem in check_command(root, args)]
    assert not problems, "\n".join(problems)


def test_cli_doc_flag_tables_name_real_flags():
    leaves = leaf_parsers(parser())
    sections = cli_doc_sections()
    assert sections, "docs/cli.md has no sections naming a `pickscore ...` command"
    problems = []
    for commands, text in sections:
        for command in commands:
            assert command in leaves, f"docs/cli.md documents `pickscore {' '.join(command)}`, which does not exist"
            have = option_strings(leaves[command])
            problems += [f"`pickscore {' '.join(command)}` has no {flag} (docs/cli.md table)"
                         for flag in table_flags(text) if flag not in have]
    assert not problems, "\n".join(problems)


def test_cli_doc_documents_every_flag_of_every_command():
    """The other way round: nothing a command takes is missing from its section of docs/cli.md. Flags every
    command shares with `pickscore` itself (-v, -q) are documented once, in its section."""
    root = parser()
    common = option_strings(root) | {"-h", "--help"}
    mentioned: dict[tuple[str, ...], set[str]] = {}
    for commands, text in cli_doc_sections():
        for command in commands:
            mentioned.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    missing = []
    for command, p in leaf_parsers(root).items():
        if subcommands(p):  # `pickscore engine` only leads to its actions
            continue
        wanted = option_strings(p) - ({"-h", "--help"} if not command else common)
        lacking = sorted(o for o in wanted if o.startswith("--") and o not in mentioned.get(command, set()))
        missing += [f"`pickscore {' '.join(command)}` {o}" for o in lacking]
    assert not missing, "docs/cli.md does not document:\n" + "\n".join(missing)


def test_the_doc_checker_catches_what_it_should():
    root = parser()
    assert check_command(root, " score --artifacts D --prompt x a.png") == []
    assert check_command(root, " score --no-such-flag") == ["`pickscore score` has no --no-such-flag"]
    assert check_command(root, " serve --input x") == ["`pickscore serve` has no --input"]
    assert check_command(root, " engine build --max-batch 8") == []
    assert check_command(root, " engine list --max-batch 8") == ["`pickscore engine list` has no --max-batch"]
    assert check_command(root, " frobnicate --x") != []
    assert pickscore_segments("pip install x && pickscore score --json | jq .  # a comment --bogus") == [" score --json"]
    assert pickscore_segments("pickscore score --artifacts DIR | --model M") == [" score --artifacts DIR | --model M"]
    assert pickscore_segments("""pickscore export --model "$(python -c 'import x; print(x.f())')" --out D""") == \
        [' export --model "SUBSTITUTION" --out D']
    assert table_flags("| `--batch-size N`, `--max-batch N` | x |\n|---|---|\n| `-q`, `--quiet` | y |") == \
        ["--batch-size", "--max-batch", "-q", "--quiet"]


# ---- links and length ----------------------------------------------------------------------------
@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_local_links_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
        if re.match(r"^[a-z]+:|^#", target):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)} links to missing files: {broken}"


REPO_PATH = re.compile(r"^(?:\.ci|benchmarks|docs|export|models|runtime|tests)/[^\s<>]*?(?:/|\.(?:py|md|json|jsonl|sh|log|png|toml))$")


def expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand_braces(path[:m.start()] + alt + path[m.end():])]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_docs_exist(doc):
    """A file of this repository named in code (`benchmarks/regate.py`, `tests/test_gpu.py`) is there, so
    that moved or renamed files do not leave stale pointers behind."""
    missing = []
    for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
        first = span.split()[0] if span.split() else ""
        if not REPO_PATH.match(first):
            continue
        for path in expand_braces(first):
            if not any(REPO.glob(path.rstrip("/"))):
                missing.append(path)
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {sorted(set(missing))}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES} (details go to docs/)"


# ---- (b) the README's quickstarts run as written --------------------------------------------------
QUICKSTARTS = {"rank", "rank-python", "file", "rl-python"}
IMAGE_PATH = re.compile(r"(?<![\w/.-])((?:[\w-]+/)+[\w.-]+\.(?:png|jpe?g|webp))\b")


def write_image(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (384 + 32 * seed, 512, 3), dtype=np.uint8)).save(path)


def on_tiny_artifacts(args: list[str], artifacts: Path) -> list[str]:
    """`pickscore score ...` as written, with the tiny artifacts in place of the default model."""
    assert args[0] == "score", f"a quickstart runs `pickscore {args[0]}`; only score is substituted"
    rest, i = [], 1
    while i < len(args):
        if args[i] in ("--model", "--revision"):
            i += 2
            continue
        if args[i] != "--random-init":
            rest.append(args[i])
        i += 1
    return ["score", "--artifacts", str(artifacts), *rest]


def example_after(blocks: list[Block], index: int) -> str | None:
    """The example output shown after quickstart block `index`: the next text block before another quickstart."""
    for block in blocks[index + 1:]:
        if block.marker and block.marker.startswith("quickstart"):
            return None
        if block.lang in ("text", ""):
            return block.body
    return None


def assert_output_like(output: str, example: str | None, where: str) -> None:
    """The output has the example's shape: as many lines, and the lines without numbers verbatim."""
    if example is None or not output.strip():
        return
    got = [line.rstrip() for line in output.strip().splitlines()]
    want = [re.sub(r"\s+\(tiny random-weights model.*\)\s*$", "", line).rstrip() for line in example.strip().splitlines()]
    assert len(got) == len(want), f"{where}: printed {len(got)} lines, the README shows {len(want)}:\n{output}"
    for line in want:
        if not re.search(r"\d", line):
            assert line in got, f"{where}: the README shows {line!r}; the output was:\n{output}"


@pytest.mark.integration
def test_readme_quickstarts_run_as_written(tmp_path, tiny_artifacts, monkeypatch, capsys):
    from pickscore_runtime import PickScorer, RandomWeightsWarning

    blocks = fenced_blocks(README.read_text())
    marked = [(i, b) for i, b in enumerate(blocks) if b.marker and b.marker.startswith("quickstart")]
    names = {b.marker.split(":", 1)[1].strip() for _, b in marked if b.marker.startswith("quickstart:")}
    assert QUICKSTARTS <= names, f"README quickstarts missing: {QUICKSTARTS - names}"
    monkeypatch.chdir(tmp_path)

    files = {b.marker.split(":", 1)[1].strip(): b.body for _, b in marked if b.marker.startswith("quickstart-file:")}
    for name, body in files.items():
        (tmp_path / name).write_text(body + "\n")
    named = sorted({p for _, b in marked for p in IMAGE_PATH.findall(b.body)})
    for seed, name in enumerate(named):
        write_image(tmp_path / name, seed)

    for index, block in marked:
        name = block.marker.split(":", 1)[1].strip()
        where = f"README.md:{block.line} ({name})"
        if block.marker.startswith("quickstart-file:"):
            continue
        if block.lang in ("bash", "sh", "shell", "console"):
            for line in joined_lines(block.body):
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                if not line:
                    continue
                words = shlex.split(line)
                assert words[0] == "pickscore", f"{where}: quickstart lines are pickscore commands, got {line!r}"
                args = on_tiny_artifacts(words[1:], tiny_artifacts)
                for arg in words[1:]:  # a folder argument names the images put into it above
                    if arg.endswith("/") and not arg.startswith("-"):
                        assert any(p.startswith(arg) for p in named), f"{where}: nothing puts images into {arg}"
                run = run_cli(*args, cwd=tmp_path, timeout=300)
                assert run.returncode == 0, f"{where}: `{line}` exited {run.returncode}\n{run.stdout}\n{run.stderr}"
                assert "Traceback" not in run.stderr, run.stderr
                check_cli_run(words[1:], run, tmp_path, where)
                assert_output_like(run.stdout, example_after(blocks, index), where)
        elif block.lang == "python":
            code = block.body.replace("PickScorer.from_pretrained(", f"PickScorer.load(r{str(tiny_artifacts)!r}, ")
            assert code != block.body, f"{where}: a Python quickstart opens the model with PickScorer.from_pretrained"
            namespace: dict = {"__name__": "__quickstart__"}
            capsys.readouterr()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own example
            for value in namespace.values():
                if isinstance(value, PickScorer):
                    value.close()
            assert_output_like(capsys.readouterr().out, example_after(blocks, index), where)
        else:
            pytest.fail(f"{where}: a quickstart block must be bash or python, not {block.lang!r}")


def check_cli_run(args: list[str], run, cwd: Path, where: str) -> None:
    """What each kind of quickstart command promises, beyond exiting 0."""
    if "--prompt" in args:
        images = [str(p.relative_to(cwd)) for a in args if a.endswith("/") for p in sorted((cwd / a).rglob("*"))
                  if p.is_file()]
        images += [a for a in args if IMAGE_PATH.fullmatch(a)]
        assert images, where
        for image in images:
            assert image in run.stdout, f"{where}: {image} is not in the ranking:\n{run.stdout}"
    if "--output" in args:
        out = cwd / args[args.index("--output") + 1]
        assert out.is_file(), f"{where}: no {out.name} written"
        inputs = cwd / args[args.index("--input") + 1]
        n_in = len(inputs.read_text().strip().splitlines()) - 1
        if out.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(out)
            assert table.num_rows == n_in, f"{where}: {table.num_rows} output rows for {n_in} input rows"
            assert table.column("error").null_count == n_in, f"{where}: errors in {table.to_pylist()}"
        if "--resume" in args:
            assert "resuming" in run.stderr, f"{where}: --resume did not resume:\n{run.stderr}"
