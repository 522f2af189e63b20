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
