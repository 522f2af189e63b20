"""The README's two set-up commands are the ones that run: CI runs the test command verbatim."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    ci = _read(".ci", "run")
    m = re.search(r"^TEST_COMMAND='(.*)'$", ci, flags=re.M)
    assert m, "TEST_COMMAND not found in .ci/run"
    assert 'eval "$TEST_COMMAND"' in ci
    assert m.group(1) in _bash_blocks(_read("README.md"))


def test_readme_commands_install_what_they_use():
    blocks = _bash_blocks(_read("README.md"))
    main = next(b for b in blocks if "ditq demo" in b)
    tests = next(b for b in blocks if "pytest" in b)
    setup = _read("setup.py")
    for extra in re.findall(r'-e "\.\[(\w+)\]"', main + tests):
        assert f'"{extra}":' in setup, f"setup.py has no extra {extra!r}"
    assert "pytest" in re.search(r'"test": \[(.*?)\]', setup, flags=re.S).group(1)
    assert '"accelerate"' in setup  # diffusers warns on every load without it


def test_readme_default_skip_list_is_the_code_s():
    """The README's default skip list names the exact fnmatch patterns ditq applies (a user copies them into
    ``skip`` / ``include``)."""
    from ditq.convert import DEFAULT_SKIP
    text = _read("README.md")
    sentence = re.search(r"\*\*Default skip list\.\*\* (All `nn\.Linear` layers are quantized except .*?)\.\n",
                         text, flags=re.S)
    assert sentence, "the README's default skip list sentence moved"
    named = set(re.findall(r"`([^`]+)`", sentence.group(1))) - {"nn.Linear"}
    assert named == set(DEFAULT_SKIP)


def test_readme_command_lines_parse():
    """Every command the README shows (the "Command line" block and the demo in the set-up command) is one the
    parser accepts, flags and choices included."""
    import shlex
    from ditq.cli import build_parser
    text = _read("README.md")
    block = re.search(r"## Command line\n\n```\n(.*?)```", text, flags=re.S).group(1)
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    lines.append(next(b for b in _bash_blocks(text) if "ditq demo" in b).split("&& ")[-1])
    parser = build_parser()
    assert len(lines) == 5
    for line in lines:
        argv = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", line))  # optional parts included
        assert argv[0] == "ditq", line
        args = parser.parse_args(argv[1:])
        assert args.command == argv[1]
