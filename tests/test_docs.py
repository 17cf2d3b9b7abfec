"""The docs cannot rot: every command in README.md and docs/*.md names scripts, configs and flags that
exist and --set keys the config accepts (parsed, not run), every relative link resolves, and the
README's and docs' study figures are the committed study files' own lines."""
import glob
import os
import re
import shlex

import pytest

from conftest import ROOT

PAGES = ["README.md", "CHANGELOG.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_:0-9]*$")  # CKPT, OUT, HOST:29500, C


def text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def commands(page):
    """Every command line of the page's bash blocks (continuations joined, comments and prompts dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text(page), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line.startswith("$ "):
                line = line[2:]
            if line:
                out.append(line)
    return out


def all_commands():
    return [(page, line) for page in PAGES for line in commands(page)]


def test_the_pages_have_commands():
    assert len(all_commands()) > 30


def source_of(script):
    """The script's source and that of the modules beside it it imports (examples share one main)."""
    with open(os.path.join(ROOT, script)) as f:
        src = f.read()
    folder = os.path.dirname(os.path.join(ROOT, script))
    for module in re.findall(r"^\s*from (\w+) import", src, re.M):
        path = os.path.join(folder, f"{module}.py")
        if os.path.isfile(path):
            with open(path) as f:
                src += f.read()
    return src


def need(condition, message):
    if not condition:
        raise AssertionError(message)


def check_command(line):
    """Raise AssertionError naming what in ``line`` does not exist."""
    from alexnet.config import ConfigError, load
    for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
        tokens = shlex.split(part)
        if not tokens:
            continue
        if tokens[0] == "make":
            with open(os.path.join(ROOT, "Makefile")) as f:
                targets = set(re.findall(r"^([a-z][\w-]*):", f.read(), re.M))
            for target in tokens[1:]:
                need("=" in target or target in targets, f"make target {target!r} is not in the Makefile")
            continue
        script = next((t for t in tokens if t.endswith((".py", ".sh"))), None)
        if script is None:
            continue
        need(os.path.isfile(os.path.join(ROOT, script)), f"{script} does not exist")
        src = source_of(script)
        rest = tokens[tokens.index(script) + 1:]
        config = None
        for i, tok in enumerate(rest):
            if tok.startswith("--"):
                flag = tok.split("=", 1)[0]
                need(f'"{flag}"' in src or f"'{flag}'" in src, f"{script} has no flag {flag}")
            if tok.endswith(".yaml") and not PLACEHOLDER.match(tok):
                need(os.path.isfile(os.path.join(ROOT, tok)), f"{tok} does not exist")
                config = config or tok
            if tok.startswith("configs/") and not tok.endswith(".yaml"):
                need(os.path.isdir(os.path.join(ROOT, tok)), f"{tok} is not a config folder")
        sets = [rest[i + 1] for i, tok in enumerate(rest[:-1]) if tok == "--set"]
        for override in sets:
            try:
                load(os.path.join(ROOT, config or "configs/fashion_mnist/g2.yaml"), [override])
            except ConfigError as e:
                if "model.groups" in override and "compare_groups" in script:
                    continue
                raise AssertionError(f"--set {override}: {e}") from None


@pytest.mark.parametrize("page", PAGES)
def test_every_command_names_what_exists(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    problems = []
    for line in commands(page):
        try:
            check_command(line)
        except AssertionError as e:
            problems.append(f"{line!r}: {e}")
    assert not problems, "\n".join(problems)


def test_a_stale_flag_is_caught():
    with pytest.raises(AssertionError, match="has no flag --no-such-flag"):
        check_command("python scripts/model_stats.py --config configs/imagenet/g2.yaml --no-such-flag")
    with pytest.raises(AssertionError, match="optim.lrr"):
        check_command("python train.py --config configs/smoke.yaml --set optim.lrr=0.1")
    with pytest.raises(AssertionError, match="make target"):
        check_command("make no-such-target")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not os.path.exists(os.path.join(base, target.split("#")[0])):
            missing.append(target)
    assert not missing, f"{page}: links to nothing: {missing}"


def table_lines(page, marker):
    """The table right after ``<!-- marker -->`` in a page."""
    found = re.search(rf"<!-- {marker} -->\n((?:\|.*\n)+)", text(page))
    assert found, f"{page} has no <!-- {marker} --> table"
    return found.group(1).strip().splitlines()


@pytest.mark.parametrize("page,marker,source", [
    ("README.md", "study-table", "docs/study/comparison.md"),
    ("docs/study.md", "study-table", "docs/study/comparison.md"),
    ("docs/study.md", "topologies-table", "docs/topologies/comparison.md")])
def test_study_figures_are_the_committed_files(page, marker, source):
    report = text(source)
    for line in table_lines(page, marker):
        assert line in report, f"{page}: {line!r} is not in {source}"


@pytest.mark.parametrize("page,source", [("README.md", "docs/study/comparison.md"),
                                         ("docs/study.md", "docs/study/comparison.md"),
                                         ("docs/study.md", "docs/topologies/comparison.md")])
def test_quoted_verdicts_are_the_reports_own(page, source):
    """A verdict quoted as "..." (from FILE) is a sentence of that report, word for word."""
    report = " ".join(text(source).split())
    quotes = re.findall(rf'"([^"]*)" \(from {re.escape(source)}\)', " ".join(text(page).split()))
    assert quotes, f"{page} quotes nothing from {source}"
    for quote in quotes:
        assert quote in report, f"{page}: {quote!r} is not in {source}"
