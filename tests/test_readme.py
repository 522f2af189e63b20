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
    sentence = re.search(r"\*\*Default skip list\.\*\* (All `nn\.Linear` layers .*?are quantized except .*?)\.\n",
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


DOCS = ("README.md", os.path.join("csrc", "README.md"), os.path.join("ditq", "demo", "MODEL_CARD.md"),
        os.path.join("benchmarks", "PAPER_FIGURES.md"))


def _repo_files():
    """The repository's files and folders, relative with "/" (hidden folders, build outputs and caches left out)."""
    files, dirs = set(), set()
    for top, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in ("build", "__pycache__", "out")]
        rel = os.path.relpath(top, ROOT)
        if rel != ".":
            dirs.add(rel.replace(os.sep, "/"))
        files.update((name if rel == "." else f"{rel}/{name}").replace(os.sep, "/") for name in names)
    return files, dirs


def test_docs_name_files_that_exist():
    """Every file or folder the docs name in backticks exists: relative to the repository, to the doc's folder,
    or (a bare file name) somewhere in the tree. A renamed or deleted file shows up here, not in a reader's
    shell."""
    files, dirs = _repo_files()
    names = {f.rsplit("/", 1)[-1] for f in files}
    outputs = ("demo_out/",)  # what the README's commands write (and ".cuh" alone is an extension, not a file)
    examples = {"k.cuh"}  # a file name inside an example report
    missing = []
    for doc in DOCS:
        here = os.path.dirname(doc).replace(os.sep, "/")
        for span in re.findall(r"`([^`\n]+)`", _read(doc)):
            for tok in re.findall(r"[\w.*<>/-]+", span):
                if not re.search(r"\.(py|h|cuh|cu|cpp|json|md|sh|png|safetensors)$|\w/$", tok) or \
                        any(c in tok for c in "<>*") or tok.startswith(outputs + (".",)) or tok in examples:
                    continue
                path = tok.rstrip("/")
                local = f"{here}/{path}" if here else path
                if not ({path, local} & (files | dirs) or ("/" not in path and path in names)):
                    missing.append(f"{doc}: {tok}")
    assert not missing, missing


def test_readme_demo_rows_are_the_code_s():
    """The set-up command's demo settings are the default rows (what the README says ``ditq demo --out demo_out``
    runs), and ``--settings all`` gives the nine rows the README and the model card count."""
    from ditq.demo.run import DEFAULT_SETTINGS, SETTINGS
    main = next(b for b in _bash_blocks(_read("README.md")) if "ditq demo" in b)
    asked = re.search(r"--settings ((?:[\w-]+ ?)+)$", main).group(1).split()
    assert ["fp32"] + asked == list(DEFAULT_SETTINGS)
    assert "(nine rows;" in _read("README.md") and len(SETTINGS) == 9


def test_split_caps_the_docs_state_are_the_build_s():
    """csrc/README.md states the shipped split-K caps (one value in every rule of both tables, until a GPU's timings
    set a column: then this fails until the text says so) and the caps tune_tiles.py times; the Triton launcher's
    default cap is the CUDA one."""
    from ditq.kernels import split_k
    tiles = _read("csrc", "configs", "gemm_tiles.h")
    sm90 = _read("csrc", "configs", "gemm_tiles_sm90.h")
    k_max = int(re.search(r"constexpr int kMaxSplits = (\d+);", tiles).group(1))
    k_sm90 = int(re.search(r"constexpr int kSm90MaxSplits = (\d+);", sm90).group(1))
    rows = re.search(r"kTileRules\[\] = \{(.*?)\};", tiles, flags=re.S).group(1)
    caps = {int(c) for c in re.findall(r"\{\d+, -?\d+, \d+, \d+, (\d+)\}", rows)}
    rows90 = re.search(r"kSm90TileRules\[\] = \{(.*?)\};", sm90, flags=re.S).group(1)
    caps |= {int(c) for c in re.findall(r"\{-?\d+, -?\d+, -?\d+, (\d+)\}", rows90)}
    text = " ".join(_read("csrc", "README.md").split())
    assert k_max == k_sm90 == split_k.MAX_SPLITS and caps == {k_max}, (k_max, k_sm90, caps)
    assert f"it is {k_max} (`kMaxSplits`) everywhere" in text and f"({k_sm90} everywhere" in text
    mma_caps = re.search(r"^MMA_CAPS = \(([\d, ]+)\)", _read("benchmarks", "tune_tiles.py"), flags=re.M).group(1)
    *head, last = mma_caps.split(", ")
    assert f"capped at {', '.join(head)} and {last} on the buckets" in text, mma_caps


def test_no_planning_references():
    """Code, comments and docs stand on their own: no pointer to a planning document or a tracker issue."""
    pattern = re.compile(r"\bBRIEF\b|§|\bissue #?\d+\b|\bthe issue's\b|(?<![\w&/#'\"])#\d+\b")
    files, _ = _repo_files()
    hits = []
    for path in sorted(files):
        if not re.search(r"\.(py|md|h|cuh|cu|cpp|sh|toml)$", path) or path == "tests/test_readme.py":
            continue  # (this file spells the patterns out)
        with open(os.path.join(ROOT, path), errors="replace") as f:
            text = f.read()
        if any(s in text for s in ("BRIEF", "§", "issue", "#")) and pattern.search(text):  # cheap tests first
            hits += [f"{path}:{n}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines(), 1)
                     if pattern.search(line)]
    assert not hits, hits


def test_readme_timestep_projection_op_counts():
    """The README's "6 ops instead of 15 (integer timesteps ...; 5 instead of 14 for float ones)", counted with a
    dispatch mode over diffusers' ``Timesteps`` before and after ``fuse_timesteps``; the values stay the same."""
    import torch
    from diffusers.models.embeddings import Timesteps
    from torch.utils._python_dispatch import TorchDispatchMode

    from ditq.blocks import fuse_timesteps

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(module, t):
        with torch.no_grad(), Count() as c:
            y = module(t)
        return c.n, y

    counted = []
    for t in (torch.tensor([999, 500]), torch.tensor([999.0, 37.5])):
        holder = torch.nn.Module()
        holder.proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        n_before, before = ops(holder.proj, t)
        assert fuse_timesteps(holder) == 1
        n_after, after = ops(holder.proj, t)
        assert torch.equal(after, before)
        counted.append(f"{n_after} instead of {n_before}")
    text = " ".join(_read("README.md").split())
    assert f"values in {counted[0].replace('instead', 'ops instead')} (integer timesteps" in text, counted
    assert f"{counted[1]} for float ones" in text, counted
