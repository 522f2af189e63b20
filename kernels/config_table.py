"""Tile configurations as data: one small JSON table per kernel and GPU architecture, keyed by M bucket.

A DiT runs a handful of GEMM shapes (K = 1152 / 4608, N = 1152..6912) at whatever M the batch gives
(2..16384). Picking the tile from a table by M bucket means a new batch size never triggers an autotune
in the middle of a generation, and the AOT/SASS tests can compile exactly what ships.

File ``configs/<kernel>_<arch>.json``::

    {"kernel": "w8a8", "arch": "sm90",
     "entries": [{"max_m": 64, "BM": 64, ...}, ..., {"max_m": null, "BM": 128, ...}]}

Entries are sorted by ``max_m`` (inclusive upper bound of the bucket); the last one has ``max_m: null``
and takes every larger M. An entry may carry ``"max_splits"``: the cap on the automatic split-K count in its
bucket (an int >= 1, 1 = never split; absent = ``split_k.MAX_SPLITS``), checked here and read by the
launchers (:mod:`.split_k`). All other keys are the kernel's own (tile sizes, num_warps, num_stages...);
this loader does not interpret them.

Architectures: ``sm80`` (Ampere and Ada: ``mma.sync``), ``sm90`` (Hopper: ``wgmma``), and
``interpreter`` (``TRITON_INTERPRET=1`` on CPU tensors: small tiles, because NumPy runs every program).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ARCHS = ("sm80", "sm90", "interpreter")


class ConfigError(ValueError):
    """A tile table that is missing or malformed."""


def arch_for_capability(major: int, minor: int = 0) -> str:
    """Table name for a CUDA compute capability: 9.x and newer use the Hopper table, 8.x the Ampere one."""
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    raise ConfigError(f"compute capability {major}.{minor} is not supported: the int8 tensor-core kernels "
                      f"need cc 8.0 or newer")


def arch_for_device(device) -> str:
    """Table name for the device a kernel will run on (CPU tensors run under the Triton interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "interpreter"
    return arch_for_capability(*torch.cuda.get_device_capability(device))


def table_path(kernel_name: str, arch: str) -> str:
    return os.path.join(CONFIG_DIR, f"{kernel_name}_{arch}.json")


def validate_table(entries: List[Dict], where: str = "table") -> List[Dict]:
    """Raise :class:`ConfigError` unless ``entries`` is a non-empty list sorted by ``max_m`` ending in null."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'entries' must be a non-empty list")
    prev = 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "max_m" not in e:
            raise ConfigError(f"{where}: entry {i} must be an object with a 'max_m' key")
        last = i == len(entries) - 1
        max_m = e["max_m"]
        if last != (max_m is None):
            raise ConfigError(f"{where}: exactly the last entry must have max_m null (it takes every larger M); "
                              f"entry {i} has max_m {max_m!r}")
        if max_m is not None and (not isinstance(max_m, int) or max_m <= prev):
            raise ConfigError(f"{where}: max_m must be positive integers in increasing order; "
                              f"entry {i} has {max_m!r} after {prev}")
        if max_m is not None:
            prev = max_m
        if "max_splits" in e:
            cap = e["max_splits"]
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ConfigError(f"{where}: entry {i}'s max_splits must be an int >= 1 (the most split-K "
                                  f"programs per tile; 1 never splits), got {cap!r}")
    return entries


@functools.lru_cache(maxsize=None)
def _load(path: str, kernel_name: str, arch: str) -> tuple:
    if not os.path.exists(path):
        raise ConfigError(f"no tile table for kernel {kernel_name!r} on {arch}: {path} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    for key, want in (("kernel", kernel_name), ("arch", arch)):
        if data.get(key) != want:
            raise ConfigError(f"{path}: '{key}' is {data.get(key)!r}, expected {want!r}")
    return tuple(validate_table(data.get("entries"), path))


def load_table(kernel_name: str, arch: str) -> List[Dict]:
    """The entries of ``configs/<kernel_name>_<arch>.json`` (validated, cached; copies, safe to modify)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; tables exist per {ARCHS}")
    return [dict(e) for e in _load(table_path(kernel_name, arch), kernel_name, arch)]


def pick(table: List[Dict], m: int) -> Dict:
    """The entry of the first bucket whose ``max_m`` is >= ``m`` (the null bucket takes the rest)."""
    if m < 0:
        raise ValueError(f"M must be >= 0, got {m}")
    for e in table:
        if e["max_m"] is None or m <= e["max_m"]:
            return e
    raise ConfigError("table has no catch-all entry (max_m null)")  # validate_table makes this unreachable


def table_archs(kernel_name: Optional[str] = None) -> List[str]:
    """The architectures (of :data:`ARCHS`) that have a table file for ``kernel_name`` (any kernel when None),
    read from ``configs/``: what ``describe()`` reports, so the two cannot disagree."""
    found = set()
    for name in os.listdir(CONFIG_DIR):
        stem, ext = os.path.splitext(name)
        kernel, _, arch = stem.rpartition("_")
        if ext == ".json" and arch in ARCHS and (kernel_name is None or kernel == kernel_name):
            found.add(arch)
    return [a for a in ARCHS if a in found]


def gpu_ccs(archs) -> List[int]:
    """``["sm80", "sm90", "interpreter"]`` -> ``[80, 90]``: the compute capabilities among table names."""
    return [int(a[2:]) for a in archs if a.startswith("sm")]


def params(entry: Dict) -> Dict:
    """The entry's kernel parameters: everything but the bucket bound ``max_m``."""
    return {k: v for k, v in entry.items() if k != "max_m"}
