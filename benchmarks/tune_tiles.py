"""Tile tuning: time every shipped GEMM tile configuration and its nearby alternatives at model shapes, and propose
the tile tables from what was measured.

ditq picks its GEMM tiles from tables by M bucket: ``kernels/configs/{w8a8,w4a8}_<arch>.json`` for Triton and
``csrc/configs/gemm_tiles*.h`` for CUDA. For each kernel family, each bucket of this GPU's table and a few M per
bucket (the bucket bounds and 16 / 64 / 512 / 2048 / 8192), at a few model shapes, this script times

* Triton: the bucket's shipped entry, then its neighbours (BM / BN / BK halved and doubled, num_stages +-1,
  num_warps 4 <-> 8, SWAP_AB flipped, GROUP_M halved and doubled) that the launcher's ``fit_config`` accepts and
  whose tiles fit the device's shared memory, then the shipped entry with split-K forced to 1, 2 and 4 (the
  launcher's ``splits=``; --smoke: 1) and with its automatic count capped at 1, 2, 4 and 8 (the entry's
  ``max_splits``, which a table can hold; --smoke: 1) against its automatic count. A bucket's best tile is among
  the uncapped automatic-count configurations; its best cap is the one whose total beats the automatic count's
  by more than :data:`CAP_MARGIN` (else none);
* CUDA: the automatic choice, then every compiled tile id (mma.sync 0..n-1 and, on sm_90, the Hopper ids 100+)
  with split-K automatic, 1, 2 and 4, and on the Hopper ids 3, 6 and 9 too. A forced count on a Hopper tile splits
  the tiles of the last wave (the full waves before it run whole; under one wave every tile), so past one wave
  (DiT-XL/2 fc1 at M = 512: 132 whole + 12 tails) it times the tail count against the automatic one. From
  those, a bucket's best cap on the automatic count (kSm90TileRules' max_splits) on its best Hopper tile: each
  case's automatic count limited to the cap, timed by the forced count it comes to. A bucket that runs an
  mma.sync tile (every bucket off Hopper; on sm_90 one its Hopper rule hands over) also times the automatic
  count capped at 1, 2, 4, 8 and 16 (kTileRules' max_splits; --smoke: 1), each case's count asked of the build
  (``gemm_auto_splits``) and forced; the best cap is chosen as for Triton.

Every configuration's output is checked against the exact integer reference (``ditq.testing``'s tolerance: the
fp32 epilogue's rounding only) on a sample of rows, after the output was poisoned, before it is timed: a wrong or
failing configuration is recorded as such and never chosen. The shipped configurations are timed first, so a run
cut short by ``--max-seconds`` still compares shipped and best for whatever it reached.

    python benchmarks/tune_tiles.py --max-seconds 240             # a GPU: every family, default shapes
    python benchmarks/tune_tiles.py --families triton-w8a8 cuda-w8a8 --shapes "DiT-XL/2:mlp fc1" 4608x1152
    python benchmarks/tune_tiles.py --write-configs               # also rewrite the Triton tables (see below)
    python benchmarks/tune_tiles.py --smoke                       # CPU: interpreter / cuda-emulated, tiny shapes

Writes tiles.json and tiles.md under --out / $OUT / benchmarks/out. ``--write-configs`` rewrites
``kernels/configs/<kernel>_<arch>.json`` (or the copies in ``--configs-dir``) with the best configuration per
bucket (lowest total time over the bucket's cases, among configurations that ran correctly on all of them), its
best cap as ``"max_splits"`` where one won (an entry's existing cap stays where none did), and a "measured"
record, with a copy in the output folder's configs/, and writes ``gemm_tile_rules.h.txt`` there: proposed rule
arrays for csrc/configs/gemm_tiles*.h (kSm90TileRules and kTileRules, each with its max_splits column), which a
person applies by hand (the CUDA tiles are template arguments: a change needs a rebuild).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import traceback
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCHEMA = "ditq.tune_tiles/1"
FAMILIES = ("triton-w8a8", "triton-w4a8", "cuda-w8a8", "cuda-w4a8")
# The heaviest GEMMs of DiT-XL/2 (PixArt shares its widths) and FLUX.1 (common.py has every model shape)
DEFAULT_SHAPES = ("DiT-XL/2:mlp fc1", "DiT-XL/2:mlp fc2", "FLUX.1:single linear1")
REP_M = (16, 64, 512, 2048, 8192)  # with each bucket's bound; 512 = one image's tokens: must fill the SMs
SMOKE_SHAPES = [("tiny", "ragged", 40, 128)]  # N not a multiple of any tile; K one group of 128
SPLITS = (None, 1, 2, 4)  # None: the binding's automatic split count
SM90_SPLITS = (None, 1, 2, 3, 4, 6, 9)  # the Hopper ids: forced on the last wave, so past a wave the tail count
TRITON_SPLITS = (1, 2, 4)  # forced counts timed against the Triton launcher's automatic one (kernels/split_k.py)
TRITON_CAPS = (1, 2, 4, 8)  # caps on the automatic count (a table entry's max_splits)
SM90_CAPS = (1, 2, 3, 4, 6, 9, 16)  # caps proposed for kSm90TileRules' max_splits (16: kSm90MaxSplits)
MMA_CAPS = (1, 2, 4, 8, 16)  # caps on the mma.sync automatic count, kTileRules' max_splits (16: kMaxSplits)
CAP_MARGIN = 0.03  # a cap is chosen only when its total beats the automatic count's by more than this


# ---- families ---------------------------------------------------------------------------------------------

def cfg_key(cfg: Dict) -> str:
    return json.dumps(cfg, sort_keys=True)


class TritonFamily:
    """One Triton GEMM (``ditq.kernels.w8a8`` / ``w4a8`` at one group size) and its tile table."""

    kind = "triton"

    def __init__(self, torch, device, bits: int, group: Optional[int], configs_dir: str, max_candidates,
                 smoke: bool = False):
        from ditq.kernels import config_table, w4a8, w8a8

        self.torch, self.device, self.bits, self.group = torch, device, bits, group
        self.mod = w8a8 if bits == 8 else w4a8
        self.kernel = self.mod.KERNEL_NAME
        self.name = f"triton-{self.kernel}" + (f"-g{group}" if group else "")
        self.arch = config_table.arch_for_device(device)
        self.path = os.path.join(configs_dir, f"{self.kernel}_{self.arch}.json")
        with open(self.path) as f:
            self.table_file = json.load(f)
        self.table = config_table.validate_table(self.table_file["entries"], self.path)
        self.max_candidates = max_candidates
        self.smem_limit = _smem_limit(torch, device)
        self.splits = TRITON_SPLITS[:1] if smoke else TRITON_SPLITS  # a config's "splits": forced, absent: auto
        self.caps = TRITON_CAPS[:1] if smoke else TRITON_CAPS  # a config's "max_splits": the entry's cap

    def bounds(self) -> List[Optional[int]]:
        return [e["max_m"] for e in self.table]

    def fit(self, cfg: Dict) -> Dict:
        return self.mod.fit_config(cfg) if self.bits == 8 else self.mod.fit_config(cfg, self.group)

    def shipped(self, bucket: int) -> Dict:
        return self.fit({k: v for k, v in self.table[bucket].items() if k != "max_m"})

    def smem_bytes(self, c: Dict) -> int:
        """A bound on the pipeline's shared memory: num_stages buffers of the A tile and the (packed) weight tile."""
        w_bytes = c["BN"] * c["BK"] // (1 if self.bits == 8 else 2)
        return max(1, c["num_stages"]) * (c["BM"] * c["BK"] + w_bytes)

    def candidates(self, bucket: int) -> List[Dict]:
        """The shipped entry's neighbours, most promising first, each fitted and checked to fit the device."""
        base = self.shipped(bucket)
        moves = [("BN", 2), ("BM", 0.5), ("BN", 0.5), ("BM", 2), ("num_stages", +1), ("num_stages", -1),
                 ("num_warps", None), ("BK", 2), ("BK", 0.5), ("SWAP_AB", None), ("GROUP_M", 0.5), ("GROUP_M", 2)]
        out, seen = [], {cfg_key(base)}
        for key, step in moves:
            c = dict(base)
            if key in ("BM", "BN", "BK", "GROUP_M"):
                c[key] = int(c[key] * step)
            elif key == "num_stages":
                c[key] += step
            elif key == "num_warps":
                c[key] = 8 if c[key] == 4 else 4
            else:
                c[key] = not c[key]
            # tl.dot's int8 tiles: at least 16 rows and columns and K = 32
            if not (16 <= c["BM"] <= 256 and 16 <= c["BN"] <= 256 and 32 <= c["BK"] <= 256
                    and 1 <= c["num_stages"] <= 6 and 1 <= c["GROUP_M"] <= 32):
                continue
            try:
                c = self.fit(c)
            except ValueError:  # the launcher refuses it (BK too small for the kernel...)
                continue
            if cfg_key(c) in seen or (self.smem_limit and self.smem_bytes(c) > self.smem_limit):
                continue
            seen.add(cfg_key(c))
            out.append(c)
        return out[:self.max_candidates] + [dict(base, splits=s) for s in self.splits] + self.capped(bucket)

    def capped(self, bucket: int) -> List[Dict]:
        """The shipped tile with its automatic count capped (``max_splits``), and uncapped when it ships a cap."""
        auto = {k: v for k, v in self.shipped(bucket).items() if k != "max_splits"}
        return ([auto] if "max_splits" in self.shipped(bucket) else []) + [dict(auto, max_splits=c)
                                                                            for c in self.caps]

    def prepare(self, shape_data):
        """The weights in this kernel's layout (one per rotating buffer set)."""
        if self.bits == 8:
            return [(w, s) for w, s in shape_data["w8"]]
        return [(self.mod.pack_weight(packed, self.group), s) for packed, _, s in shape_data[f"w4-{self.group}"]]

    def run(self, cfg, weights, act, i, poison=False):
        """The GEMM on buffer set i with tile configuration ``cfg``; ``poison``: into an output filled with NaN."""
        a, a_scale, bias = act[i % len(act)]
        w, w_scale = weights[i % len(weights)]
        bf16 = self.torch.bfloat16
        out = self.torch.full((a.shape[0], w_scale.shape[-1]), float("nan"), dtype=bf16, device=a.device) \
            if poison else None
        tile, splits = {k: v for k, v in cfg.items() if k != "splits"}, cfg.get("splits")
        if self.bits == 8:
            return self.mod.gemm_w8a8(a, a_scale, w, w_scale, bias, bf16, out=out, config=tile, splits=splits)
        return self.mod.gemm_w4a8(a, a_scale, w, w_scale, bias, self.group, bf16, out=out, config=tile,
                                  splits=splits)

    def ctas(self, cfg, m, n, k) -> int:
        tile = {k_: v for k_, v in cfg.items() if k_ != "splits"}  # max_splits stays: the count honours it
        splits = cfg.get("splits") or (self.mod.auto_split_count(tile, m, n, k, self._sms()) if self.bits == 8
                                       else self.mod.auto_split_count(tile, m, n, k, self.group, self._sms()))
        return math.ceil(m / cfg["BM"]) * math.ceil(n / cfg["BN"]) * splits

    def _sms(self) -> int:
        from ditq.kernels import split_k
        return split_k.sm_count(self.device)

    def label(self, c: Dict) -> str:
        return (f"{c['BM']}x{c['BN']}x{c['BK']} w{c['num_warps']} s{c['num_stages']} g{c['GROUP_M']}"
                + (" swap" if c["SWAP_AB"] else "") + (" tma" if c.get("USE_TMA") else "")
                + (f" split {c['splits']}" if "splits" in c else "")
                + (f" cap {c['max_splits']}" if "max_splits" in c else ""))


class CudaFamily:
    """One CUDA GEMM of ditq._C (real on a GPU, cuda-emulated on CPU tensors): tile ids x split-K counts."""

    kind = "cuda"

    def __init__(self, torch, device, bits: int, group: Optional[int], smoke: bool, max_candidates):
        from ditq.backends import cuda_backend as cb

        self.torch, self.device, self.bits, self.group, self.cb = torch, device, bits, group, cb
        self.kernel = f"w{bits}a8"
        self.name = f"cuda-{self.kernel}" + (f"-g{group}" if group else "")
        self.op = getattr(torch.ops.ditq_C, f"gemm_{self.kernel}")
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            self.arch, self.sms = major * 10 + minor, torch.cuda.get_device_properties(device).multi_processor_count
            # sm_90 in the build's list is not enough: a plain sm_90 pass (no "a") holds the Hopper kernels as traps
            self.hopper = bool(torch.ops.ditq_C.gemm_sm90_available())
        else:  # the emulated binding decides as on an H100 (sm_90, 132 SMs), with the mma.sync kernels
            self.arch, self.sms, self.hopper = 90, 132, False
        self.rules, self.sm90_rules = read_tile_rules()
        hopper_ids = []  # 100, 101, ...: as many as this family's Hopper list has
        while self.hopper and self._sm90_info(100 + len(hopper_ids)):
            hopper_ids.append(100 + len(hopper_ids))
        ids = list(range(cb.gemm_tile_count())) + hopper_ids
        self.tile_ids = ids[:2] if smoke else ids
        self.splits = SPLITS[:2] if smoke else SPLITS
        self.sm90_splits = SM90_SPLITS[:2] if smoke else SM90_SPLITS
        self.caps = MMA_CAPS[:1] if smoke else MMA_CAPS  # a config's "max_splits": the mma.sync rule's cap
        self.max_candidates = max_candidates

    def _sm90_info(self, tile):
        try:
            return list(self.torch.ops.ditq_C.gemm_sm90_tile_info(tile, self.bits == 4))
        except (RuntimeError, ValueError):
            return None

    def bounds(self) -> List[Optional[int]]:
        ms = {r[1] for r in self.rules if r[0] == self.arch_row()}
        if self.hopper:
            ms |= {r[0] for r in self.sm90_rules}
        return sorted(m for m in ms if m >= 0) + [None]

    def arch_row(self) -> int:
        """The kTileRules rows this GPU uses: the first arch_min <= arch (rows are listed newest first)."""
        return next(r[0] for r in self.rules if self.arch >= r[0])

    def auto_tile(self, m: int) -> int:
        """The tile the binding picks by itself (mirrors gemm_bindings.h: the Hopper rules first, when built)."""
        w4 = self.bits == 4
        if self.hopper:
            for max_m, t8, t4, _ in self.sm90_rules:
                if max_m < 0 or m <= max_m:
                    if (t4 if w4 else t8) >= 0:
                        return 100 + (t4 if w4 else t8)
                    break
        return self.cb.gemm_pick_tile(self.arch, m, w4)

    def shipped(self, bucket: int) -> Dict:
        return {"tile": None, "splits": None}

    def candidates(self, bucket: int) -> List[Dict]:
        out = []
        for t in self.tile_ids:
            # Hopper ids too (gemm_sm90.cuh splits K), with the tail counts; a count over a case's k units is
            # refused by the binding and recorded as unavailable there
            for s in (self.sm90_splits if t >= 100 else self.splits):
                out.append({"tile": t, "splits": s})
        return out[:self.max_candidates] + self.capped(bucket)

    def capped(self, bucket: int) -> List[Dict]:
        """The bucket's automatic configuration with its count capped (kTileRules' max_splits), when the bucket
        runs an mma.sync tile today (a Hopper tile's cap is timed through its forced tail counts instead)."""
        bound = self.bounds()[bucket]
        if self.auto_tile(1 << 30 if bound is None else bound) >= 100:
            return []
        return [{"tile": None, "splits": None, "max_splits": c} for c in self.caps]

    def mma_splits(self, tile: int, m: int, n: int, k: int, cap: Optional[int] = None) -> int:
        """The automatic split count of mma.sync ``tile`` as the build computes it (gemm_auto_splits): at most
        ``cap``, or None: the cap of the rule of this GPU's arch and M, what a launch does."""
        return int(self.torch.ops.ditq_C.gemm_auto_splits(tile, self.group or 0, m, n, k, self.sms, self.arch,
                                                          -1 if cap is None else cap))

    def prepare(self, shape_data):
        from ditq.backends import cuda_layout

        if self.bits == 8:
            return [(w, s) for w, s in shape_data["w8"]]
        return [cuda_layout.prepare_weight(4, packed, s) for packed, _, s in shape_data[f"w4-{self.group}"]]

    def run(self, cfg, weights, act, i, poison=False):
        """The GEMM on buffer set i with ``cfg`` (tile id / split count, None: automatic). ``poison``: the op
        allocates its output, and the emulated binding fills it with NaN itself; on a GPU, a freed NaN block of
        the output's size is what the caching allocator hands back next, so a configuration that writes nothing
        shows NaN rather than an earlier call's correct result."""
        a, a_scale, bias = act[i % len(act)]
        w, w_scale = weights[i % len(weights)]
        tile = -1 if cfg["tile"] is None else cfg["tile"]
        splits = -1 if cfg["splits"] is None else cfg["splits"]
        if "max_splits" in cfg:  # the automatic tile's count capped: forced to what the capped rule would give
            m, k, n = a.shape[0], a.shape[1], w_scale.shape[-1]
            tile = self.cb.gemm_pick_tile(self.arch, m, self.bits == 4)
            splits = self.mma_splits(tile, m, n, k, cfg["max_splits"])
        if poison and self.device.type == "cuda":
            self.torch.full((a.shape[0], w_scale.shape[-1]), float("nan"), dtype=self.torch.bfloat16,
                            device=a.device)  # allocated and freed at once
        if self.bits == 8:
            return self.op(a, a_scale, w, w_scale, bias, self.torch.bfloat16, tile, splits)
        return self.op(a, a_scale, w, w_scale, bias, self.group, self.torch.bfloat16, tile, splits)

    def tile_shape(self, tile: int):
        if tile >= 100:
            return self._sm90_info(tile)[:3]
        return self.cb.gemm_tile_info(tile)[:3]

    def ctas(self, cfg, m, n, k) -> int:
        tile = self.auto_tile(m) if cfg["tile"] is None else cfg["tile"]
        if cfg["tile"] is None and cfg["splits"] not in (None, 1):  # a forced count with no tile: mma.sync
            tile = self.cb.gemm_pick_tile(self.arch, m, self.bits == 4)
        bm, bn, bk = self.tile_shape(tile)
        ctas = math.ceil(m / bm) * math.ceil(n / bn)
        splits = cfg["splits"]
        if tile >= 100:  # the binding's schedule (configs/gemm_tiles_sm90.h): automatic, capped by M's bucket,
            dp, s = self.sm90_schedule(ctas, math.ceil(k / max(self.group or 0, bk)), m, splits)  # or forced
            return dp + (ctas - dp) * s
        if splits is None:  # the build's auto_splits: at most the rule's cap, or the config's
            splits = self.mma_splits(tile, m, n, k, cfg.get("max_splits"))
        return ctas * splits

    def sm90_schedule(self, tiles: int, units: int, m: int, splits: Optional[int]):
        """(whole tiles, splits) of a Hopper launch: the build's own schedule (gemm_sm90_schedule: automatic, at
        most the max_splits of M's bucket, or a forced count on the last wave)."""
        return tuple(self.torch.ops.ditq_C.gemm_sm90_schedule(tiles, units, self.sms, m,
                                                              -1 if splits is None else splits))

    def sm90_auto_splits(self, tile: int, m: int, n: int, k: int) -> int:
        """The split count of the automatic schedule of Hopper ``tile`` with no cap (kSm90MaxSplits): what a cap
        limits."""
        bm, bn, bk = self.tile_shape(tile)
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        return int(self.torch.ops.ditq_C.gemm_sm90_schedule(tiles, math.ceil(k / max(self.group or 0, bk)),
                                                            self.sms)[1])

    def label(self, c: Dict) -> str:
        t = c["tile"]
        cap = f" cap {c['max_splits']}" if "max_splits" in c else ""
        if t is None and c["splits"] is None:
            return "auto" + cap
        tile = "auto" if t is None else f"{t} ({'x'.join(map(str, self.tile_shape(t)))})"
        return f"tile {tile} split {c['splits'] or 'auto'}" + cap


def read_tile_rules(csrc: Optional[str] = None):
    """(kTileRules rows (arch_min, max_m, w8, w4, max_splits), kSm90TileRules rows (max_m, w8, w4, max_splits))
    from the headers."""
    csrc = csrc or os.path.join(common.REPO, "csrc", "configs")

    def rows(path, name, width):
        text = open(os.path.join(csrc, path)).read()
        body = re.search(name + r"\[\]\s*=\s*\{(.*?)\};", text, re.S).group(1)
        return [tuple(int(x) for x in r.split(",")) for r in re.findall(r"\{([-\d,\s]+)\}", body)
                if len(r.split(",")) == width]
    return rows("gemm_tiles.h", "kTileRules", 5), rows("gemm_tiles_sm90.h", "kSm90TileRules", 4)


def _smem_limit(torch, device) -> Optional[int]:
    if device.type != "cuda":
        return None  # the interpreter has no shared memory
    p = torch.cuda.get_device_properties(device)
    return getattr(p, "shared_memory_per_block_optin", None) or None


def make_families(torch, device, args) -> List:
    fams = []
    from ditq.backends import cuda_backend

    for name in args.families:
        bits = 8 if name.endswith("w8a8") else 4
        groups = [None] if bits == 8 else args.groups
        for g in groups:
            if name.startswith("triton"):
                fams.append(TritonFamily(torch, device, bits, g, args.configs_dir,
                                         args.max_candidates or (2 if args.smoke else None), smoke=args.smoke))
            elif cuda_backend.built() and (device.type == "cpu" or cuda_backend.built_with_cuda()):
                fams.append(CudaFamily(torch, device, bits, g, args.smoke, args.max_candidates))
            else:
                print(f"{name}: skipped, ditq._C is not built for this device", file=sys.stderr)
    return fams


# ---- inputs and the correctness check ----------------------------------------------------------------------

class Data:
    """Random operands per shape (weights) and per (M, K) (activations), a few rotating copies each so that
    timed calls read from memory rather than L2, plus the exact reference of a sample of rows per case."""

    def __init__(self, torch, device, groups, l2_bytes: int, seed: int = 0):
        self.torch, self.device, self.groups, self.l2 = torch, device, groups, l2_bytes
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.weights, self.acts, self.layouts, self.exact = {}, {}, {}, {}

    def sets(self, nbytes: int) -> int:
        return max(1, min(8, math.ceil(2 * self.l2 / nbytes))) if self.l2 else 1

    def shape(self, n, k):
        from ditq.quant import reference as ref

        if (n, k) not in self.weights:
            t, dev, g = self.torch, self.device, self.g
            d = {"w8": [], **{f"w4-{gs}": [] for gs in self.groups}}
            for _ in range(self.sets(n * k)):
                d["w8"].append((t.randint(-127, 128, (n, k), dtype=t.int8, device=dev, generator=g),
                                t.rand(n, device=dev, generator=g) * 1e-2 + 1e-3))
                w_q = t.randint(-8, 8, (n, k), dtype=t.int8, device=dev, generator=g)
                packed = ref.pack_int4(w_q)  # the canonical format each backend's prepare_weight takes
                for gs in self.groups:
                    d[f"w4-{gs}"].append((packed, w_q, t.rand(k // gs, n, device=dev, generator=g) * 1e-2 + 1e-3))
            self.weights[(n, k)] = d
        return self.weights[(n, k)]

    def act(self, m, n, k):
        if (m, k) not in self.acts:
            t = self.torch
            self.acts[(m, k)] = [(t.randint(-127, 128, (m, k), dtype=t.int8, device=self.device, generator=self.g),
                                  t.rand(1, device=self.device, generator=self.g) * 1e-2 + 1e-3)
                                 for _ in range(self.sets(m * k))]
        bias = self.bias(n)
        return [(a, s, bias) for a, s in self.acts[(m, k)]]

    def bias(self, n):
        key = ("bias", n)
        if key not in self.weights:
            self.weights[key] = self.torch.randn(n, device=self.device, generator=self.g).to(self.torch.bfloat16)
        return self.weights[key]

    def layout(self, fam, n, k):
        key = (fam.name, n, k)
        if key not in self.layouts:
            self.layouts[key] = fam.prepare(self.shape(n, k))
        return self.layouts[key]

    def reference(self, fam, m, n, k):
        """The exact reference of common.sample_rows' rows (all columns) for this family and shape, cached."""
        key = (fam.bits, fam.group, m, n, k)
        if key not in self.exact:
            a, a_scale, bias = self.act(m, n, k)[0]
            if fam.bits == 8:
                w_q, w_scale = self.shape(n, k)["w8"][0]
            else:
                _, w_q, w_scale = self.shape(n, k)[f"w4-{fam.group}"][0]
            self.exact[key] = common.exact_rows(self.torch, common.sample_rows(self.torch, m), a, a_scale, w_q,
                                                w_scale, bias, None if fam.bits == 8 else fam.group)
        return self.exact[key]


def check(torch, fam, cfg, data, m, n, k) -> Optional[str]:
    """None if ``cfg`` computes the product (poisoned output, finite everywhere, exact on the sampled rows),
    else why not."""
    y = fam.run(cfg, data.layout(fam, n, k), data.act(m, n, k), 0, poison=True)
    why = common.output_error(torch, y, m, n, data.reference(fam, m, n, k))
    return None if why is None else f"{fam.name} {fam.label(cfg)}: {why}"


# ---- measuring ------------------------------------------------------------------------------------------

class Tuner:
    def __init__(self, torch, device, fams, shapes, args, data):
        self.torch, self.device, self.fams, self.args, self.data = torch, device, fams, args, data
        self.deadline = common.Deadline(args.max_seconds)
        self.cases = {}  # family name -> [(bucket index, M, shape)]
        for fam in fams:
            bounds = fam.bounds()
            if args.m:
                ms = sorted(set(args.m))
            elif args.smoke:
                ms = sorted({b for b in bounds if b} | {max([b for b in bounds if b] or [0]) + 17})
            else:
                ms = sorted(set(REP_M) | {b for b in bounds if b})
            self.cases[fam.name] = [(_bucket(bounds, m), m, s) for m in ms for s in shapes
                                    if fam.bits == 8 or s[3] % fam.group == 0]
        self.results: Dict = {}  # (family, M, N, K) -> {config key: result}
        self.broken: Optional[str] = None

    def measure(self, fam, cfg, m, shape) -> Dict:
        _, _, n, k = shape
        res = self.results.setdefault((fam.name, m, n, k), {})
        key = cfg_key(cfg)
        if key in res:
            return res[key]
        r = res[key] = {"config": cfg, "label": fam.label(cfg)}
        if self.deadline.passed() or self.broken:
            r["status"] = "skipped: " + (self.broken or "time budget (--max-seconds)")
            return r
        try:
            why = check(self.torch, fam, cfg, self.data, m, n, k)
            if why:
                r["status"] = f"wrong: {why}"
                return r
            weights, act = self.data.layout(fam, n, k), self.data.act(m, n, k)
            sets = max(len(weights), len(act))
            t = common.time_calls(lambda i: fam.run(cfg, weights, act, i), self.device, self.args.warmup,
                                  self.args.iters, graph_calls=0 if self.args.smoke else max(sets, 4))
            r.update(status="ok", median_ms=t["median_ms"], timing=t["timing"],
                     sm_fill=fam.ctas(cfg, m, n, k) / self.sms())
        except (common.Stopped, KeyboardInterrupt):
            r["status"] = "skipped: stopped (SIGTERM)"
            raise
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self.device.type == "cuda" and ("illegal" in msg or "CUDA error" in msg):
                # a faulting kernel leaves the CUDA context unusable: every later call would fail too
                self.broken = f"CUDA context unusable after {fam.name} {fam.label(cfg)} ({msg})"
            # an argument the launcher refuses, or a tile too big for this GPU: unavailable, not a kernel error
            unavailable = isinstance(e, (ValueError, TypeError)) or "OutOfResources" in type(e).__name__
            r["status"] = ("unavailable: " if unavailable else "error: ") + msg
            if self.args.verbose:
                traceback.print_exc()
        if self.args.verbose:
            print(f"{fam.name} M={m} {shape[1]} {r['label']}: {r['status']} {common.fmt(r.get('median_ms'))} ms",
                  file=sys.stderr)
        return r

    def sms(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.get_device_properties(self.device).multi_processor_count
        return 132  # as the emulated binding assumes (an H100 SXM)

    def run(self):
        # 1. what ships, everywhere first: a run cut short still says how the shipped tables do
        for fam in self.fams:
            for b, m, shape in self.cases[fam.name]:
                self.measure(fam, fam.shipped(b), m, shape)
        # 2. the alternatives: CUDA first (nothing to compile), then Triton, one candidate of each bucket in
        #    turn, each on every case of its bucket (what a bucket's choice is judged by)
        queues = []
        for fam in sorted(self.fams, key=lambda f: f.kind != "cuda"):
            for b in sorted({c[0] for c in self.cases[fam.name]}):
                queues.append((fam, b, fam.candidates(b)))
        for rank in range(max((len(q[2]) for q in queues), default=0)):
            for fam, b, cands in queues:
                if rank < len(cands):
                    for bb, m, shape in self.cases[fam.name]:
                        if bb == b:
                            self.measure(fam, cands[rank], m, shape)


def _bucket(bounds, m) -> int:
    return next(i for i, b in enumerate(bounds) if b is None or m <= b)


# ---- report ---------------------------------------------------------------------------------------------

def summarize(tuner) -> Dict:
    """One row per case (family, M, shape): shipped and best; one per bucket: totals over the bucket's cases."""
    rows, buckets = [], []
    for fam in tuner.fams:
        bounds = fam.bounds()
        for b in sorted({c[0] for c in tuner.cases[fam.name]}):
            shipped = fam.shipped(b)
            brows = []
            for _, m, (model, layer, n, k) in [c for c in tuner.cases[fam.name] if c[0] == b]:
                res = tuner.results.get((fam.name, m, n, k), {})
                ok = [r for r in res.values() if r.get("status") == "ok"]
                best = min(ok, key=lambda r: r["median_ms"]) if ok else None
                ship = res.get(cfg_key(shipped), {"config": shipped, "label": fam.label(shipped),
                                                  "status": "skipped: time budget (--max-seconds)"})
                brows.append({"family": fam.name, "kernel": fam.kernel, "kind": fam.kind, "group_size": fam.group,
                              "bucket_max_m": bounds[b], "M": m, "model": model, "layer": layer, "N": n, "K": k,
                              "auto_tile": fam.auto_tile(m) if fam.kind == "cuda" else None,
                              "shipped": ship, "best": best,
                              "speedup": (ship["median_ms"] / best["median_ms"]
                                          if best and ship.get("status") == "ok" else None),
                              "candidates": list(res.values())})
            rows += brows
            # a Triton table entry cannot force a split count: the bucket's best tile is among the automatic
            # (uncapped) ones; the cap is chosen apart (best_cap)
            best = _best_total(brows, lambda c: "splits" not in c and c.get("max_splits") == shipped.get("max_splits")
                               if fam.kind == "triton" else True)
            ship_total = _best_total(brows, lambda c: c == shipped)
            auto_best = None if fam.kind == "triton" else _best_total(brows, _rule_config)
            # (the Hopper cap goes on the tile a rule would name: the best with automatic split-K, as proposed; the
            # mma.sync cap on the tile the bucket runs today, as for Triton)
            if fam.kind == "triton":
                caps = triton_cap_totals(fam, brows, shipped)
            else:
                caps = sm90_cap_totals(fam, brows, auto_best[0] if auto_best else None)
                if not caps["cap_totals_ms"] and any("max_splits" in c["config"] for c in brows[0]["candidates"]):
                    caps = mma_cap_totals(fam, brows, shipped)
            buckets.append({"family": fam.name, "kernel": fam.kernel, "kind": fam.kind, "group_size": fam.group,
                            "bucket_max_m": bounds[b], "m_values": sorted({r["M"] for r in brows}),
                            "cases": len(brows), "shipped": shipped, "shipped_label": fam.label(shipped),
                            "shipped_total_ms": ship_total[1] if ship_total else None,
                            "best": best[0] if best else None, "best_label": fam.label(best[0]) if best else None,
                            "best_total_ms": best[1] if best else None,
                            "speedup": ship_total[1] / best[1] if best and ship_total else None,
                            "configs_complete": _best_total(brows, lambda c: True, count=True),
                            "configs_tried": len({cfg_key(c["config"]) for r in brows for c in r["candidates"]}),
                            **caps})
    return {"rows": rows, "buckets": buckets}


def _choose_cap(totals: Dict[int, float], auto_total: Optional[float]) -> Optional[int]:
    """The cap with the lowest total, if it beats the automatic count's total by more than CAP_MARGIN (ties: the
    larger cap, the smaller change); None otherwise."""
    if not totals or auto_total is None:
        return None
    cap = min(sorted(totals, reverse=True), key=lambda c: totals[c])
    return cap if totals[cap] < auto_total * (1 - CAP_MARGIN) else None


def _rule_config(c: Dict) -> bool:
    """A CUDA configuration a tile rule can name: a tile (or the table's) with the automatic split count."""
    return c["splits"] is None and "max_splits" not in c


def triton_cap_totals(fam, brows, shipped) -> Dict:
    """Per cap on the shipped tile's automatic count (the entry's max_splits): its total over the bucket's cases
    (only caps that ran correctly on all of them), the uncapped automatic count's, and the cap chosen (or None)."""
    return {**_shipped_cap_totals(fam, brows, shipped), "cap_kind": "triton"}


def mma_cap_totals(fam, brows, shipped) -> Dict:
    """The mma.sync cap (kTileRules' max_splits) on the bucket's automatic configuration (the tile its rule picks
    today): per cap, the total over the bucket's cases of the automatic count limited to the cap (each case's
    count from the build, forced: ``CudaFamily.capped``), against the automatic count's total at the rule's cap
    today; the cap chosen by :data:`CAP_MARGIN`, or None."""
    out = _shipped_cap_totals(fam, brows, shipped)
    if brows and getattr(fam, "cb", None) is not None:
        tile = fam.cb.gemm_pick_tile(fam.arch, brows[0]["M"], fam.bits == 4)
        out["cap_tile"] = fam.label({"tile": tile, "splits": None})
    return {**out, "cap_kind": "mma"}


def _shipped_cap_totals(fam, brows, shipped) -> Dict:
    auto = {k: v for k, v in shipped.items() if k != "max_splits"}
    auto_total = _best_total(brows, lambda c: c == auto)
    totals = {}
    for cap in fam.caps:
        t = _best_total(brows, lambda c, cap=cap: c == dict(auto, max_splits=cap))
        if t:
            totals[cap] = t[1]
    auto_ms = auto_total[1] if auto_total else None
    best = _choose_cap(totals, auto_ms)
    return {"cap_tile": fam.label(auto), "auto_total_ms": auto_ms, "cap_totals_ms": totals, "best_cap": best,
            "cap_speedup": auto_ms / totals[best] if best else None}


def sm90_cap_totals(fam, brows, best) -> Dict:
    """The Hopper cap (kSm90TileRules' max_splits) on the bucket's best automatic-count configuration's tile (the
    table's own when that is ``auto``), if a Hopper one: per cap, the total over the bucket's cases of
    each case's automatic count limited to the cap, timed by the forced count it comes to (a capped automatic
    schedule is the forced one of that count: the same whole tiles and the same split tail); a case the tile
    does not split counts its automatic time. Only caps whose every case was timed."""
    none = {"cap_tile": None, "auto_total_ms": None, "cap_totals_ms": {}, "best_cap": None, "cap_speedup": None,
            "cap_kind": None}
    if not getattr(fam, "hopper", False) or not brows:
        return none
    tile = best["tile"] if best and best.get("tile") is not None else fam.auto_tile(brows[0]["M"])
    if tile is None or tile < 100:
        return none
    totals, auto_total = {}, 0.0
    for cap in (None,) + SM90_CAPS:
        total = 0.0
        for r in brows:
            s = fam.sm90_auto_splits(tile, r["M"], r["N"], r["K"])  # uncapped
            now = next(q[3] for q in fam.sm90_rules if q[0] < 0 or r["M"] <= q[0])  # the bucket's cap today
            got = min(s, now if cap is None else cap)
            # the automatic configuration's time where the count is today's (min(s, now)); else the forced count
            want = None if got == min(s, now) else got
            res = {cfg_key(c["config"]): c for c in r["candidates"]}.get(cfg_key({"tile": tile, "splits": want}))
            if not res or res.get("status") != "ok":
                total = None
                break
            total += res["median_ms"]
        if cap is None:
            if total is None:
                return none
            auto_total = total
        elif total is not None:
            totals[cap] = total
    chosen = _choose_cap(totals, auto_total)
    return {"cap_tile": fam.label({"tile": tile, "splits": None}), "auto_total_ms": auto_total,
            "cap_totals_ms": totals, "best_cap": chosen,
            "cap_speedup": auto_total / totals[chosen] if chosen else None, "cap_kind": "sm90"}


def markdown(report: Dict) -> str:
    out = [f"## GEMM tile tuning ({'smoke, CPU' if report['smoke'] else report['env'].get('gpu')})", "",
           common.env_markdown(report["env"]), "",
           "Per bucket: total time over the bucket's cases (its M values x shapes) of the shipped configuration and "
           "of the best one that ran correctly on every case.", ""]
    out.append(common.md_table(report["buckets"], ["family", "bucket_max_m", "m_values", "cases", "shipped_label",
                                                  "shipped_total_ms", "best_label", "best_total_ms", "speedup",
                                                  "configs_complete", "configs_tried"],
                               ["family", "max M", "M", "cases", "shipped", "shipped ms", "best", "best ms",
                                "speedup", "complete", "tried"]))
    capped = [dict(family=b["family"], bucket_max_m=b["bucket_max_m"], tile=b["cap_tile"], auto=b["auto_total_ms"],
                   caps=", ".join(f"{c}: {common.fmt(t)}" for c, t in sorted(b["cap_totals_ms"].items(),
                                                                            key=lambda x: int(x[0]))),
                   best_cap=b["best_cap"], speedup=b["cap_speedup"])
              for b in report["buckets"] if b.get("cap_totals_ms")]
    if capped:
        out += ["", f"Split caps per bucket (the tile's automatic split count at most the cap; total ms over the "
                f"bucket's cases; a cap is chosen when it beats the automatic count by more than {CAP_MARGIN:.0%}):",
                "", common.md_table(capped, ["family", "bucket_max_m", "tile", "auto", "caps", "best_cap", "speedup"],
                                    ["family", "max M", "tile", "automatic ms", "cap: ms", "chosen cap",
                                     "speedup"])]
    flat = []
    for r in report["rows"]:
        s, b = r["shipped"], r["best"] or {}
        bad = sum(c.get("status", "").startswith(("wrong", "error")) for c in r["candidates"])
        flat.append(dict(family=r["family"], shape=f"{r['model']} {r['layer']}", N=r["N"], K=r["K"], M=r["M"],
                         shipped=s["label"] + (f" (tile {r['auto_tile']})" if r["auto_tile"] is not None else ""),
                         shipped_status=s["status"], shipped_ms=s.get("median_ms"),
                         shipped_fill=s.get("sm_fill"), best=b.get("label"), best_ms=b.get("median_ms"),
                         speedup=r["speedup"], best_fill=b.get("sm_fill"), wrong=bad, tried=len(r["candidates"])))
    out += ["", "Per case (SM fill = CTAs / SMs):", "",
            common.md_table(flat, ["family", "shape", "N", "K", "M", "shipped", "shipped_status", "shipped_ms",
                                   "shipped_fill", "best", "best_ms", "speedup", "best_fill", "wrong", "tried"],
                            ["family", "shape", "N", "K", "M", "shipped", "status", "shipped ms", "fill",
                             "best", "best ms", "speedup", "best fill", "wrong/error", "tried"])]
    thin = [f for f in flat if f["M"] == 512 and f["best_fill"] is not None and f["best_fill"] < 1]
    if thin:
        out += ["", "M = 512 cases whose best configuration launches fewer CTAs than SMs: " +
                ", ".join(f"{f['family']} {f['shape']} ({f['best_fill']:.2f})" for f in thin)]
    return "\n".join(out) + "\n"


# ---- proposed tables --------------------------------------------------------------------------------------

def write_triton_tables(report: Dict, fams, env: Dict, out_dir: str) -> List[str]:
    """Rewrite each measured Triton table: every bucket whose best complete configuration is not the shipped one
    takes it (keys in the table's order, its by_group kept); a 'measured' record says what, where and how fast.
    A copy goes to ``out_dir``/configs, which comes back from a GPU machine with the report."""
    from ditq.kernels import config_table

    written = []
    for fam in [f for f in fams if f.kind == "triton"]:
        primary = [f for f in fams if f.kind == "triton" and f.kernel == fam.kernel][0]
        if fam is not primary:
            continue  # the table's entries follow the first group size measured; others add by_group below
        data = json.loads(json.dumps(primary.table_file))
        entries, record, changed = data["entries"], [], False
        for i, e in enumerate(entries):
            b = _bucket_row(report, primary.name, e["max_m"])
            if not b:
                continue
            record.append({k: b.get(k) for k in ("bucket_max_m", "m_values", "cases", "shipped_label",
                                                 "shipped_total_ms", "best_label", "best_total_ms", "speedup",
                                                 "auto_total_ms", "cap_totals_ms", "best_cap")})
            if b["best"] and b["best"] != b["shipped"]:  # (the tile candidates carry the entry's own cap)
                entries[i] = {"max_m": e["max_m"], **{k: b["best"].get(k, v) for k, v in e.items()
                                                      if k not in ("max_m", "by_group")}}
                if "by_group" in e:
                    entries[i]["by_group"] = e["by_group"]
                changed = True
            # the caps were timed on the shipped tile: a winning cap goes in only when that tile stays; without
            # one, the entry's own cap (if any) stays as it is
            if b.get("best_cap") and (not b["best"] or b["best"] == b["shipped"]):
                entries[i] = {**{k: v for k, v in entries[i].items() if k != "by_group"},
                              "max_splits": b["best_cap"], **({"by_group": e["by_group"]} if "by_group" in e else {})}
                changed = True
            for other in [f for f in fams if f.kind == "triton" and f.kernel == fam.kernel and f is not primary]:
                # another group size measured: where its best differs from what the entry gives it (BK fitted to
                # its pack block), a by_group override says so; where it agrees, an old override goes
                ob = _bucket_row(report, other.name, e["max_m"])
                if ob and ob["best"] and b["best"]:
                    given = other.fit(dict(b["best"]))
                    diff = {k: v for k, v in ob["best"].items() if given.get(k) != v}
                    groups = entries[i].setdefault("by_group", {})
                    if diff:
                        groups[str(other.group)] = diff
                    else:
                        groups.pop(str(other.group), None)
                    if not groups:
                        del entries[i]["by_group"]
                    changed = True
        if not record:
            continue
        config_table.validate_table(entries, primary.path)
        data["measured"] = {**{k: env.get(k) for k in ("date", "gpu", "driver", "capability", "torch", "triton",
                                                        "cuda", "commit", "command")},
                            "group_sizes": [f.group for f in fams if f.kind == "triton" and f.kernel == fam.kernel
                                            and f.group],
                            "buckets": record}
        if changed and "comment" in data and "re-chosen" not in data["comment"]:
            data["comment"] += (" Tiles re-chosen from timings by benchmarks/tune_tiles.py (see 'measured'); "
                                "figures above describe the tiles before that.")
        os.makedirs(os.path.join(out_dir, "configs"), exist_ok=True)
        for path in (primary.path, os.path.join(out_dir, "configs", os.path.basename(primary.path))):
            with open(path, "w") as f:
                f.write(_table_json(data))
            written.append(path)
    return written


def _bucket_row(report, family, max_m):
    return next((b for b in report["buckets"] if b["family"] == family and b["bucket_max_m"] == max_m), None)


def _table_json(data: Dict) -> str:
    """The tables' own style: header keys, then one entry per line."""
    head = {k: v for k, v in data.items() if k not in ("entries", "measured")}
    lines = ["{" + json.dumps(head)[1:-1] + ","]
    lines.append(' "entries": [')
    lines.append(",\n".join("  " + json.dumps(e) for e in data["entries"]))
    lines.append(" ]" + ("," if "measured" in data else ""))
    if "measured" in data:
        lines.append(' "measured": ' + json.dumps(common._clean(data["measured"])))
    return "\n".join(lines) + "}\n"


def cuda_rules_text(report: Dict, fams, env: Dict) -> Optional[str]:
    """Proposed kSm90TileRules / kTileRules arrays: per bucket, the best configuration with automatic split-K (what
    a rule can say) over the bucket's cases; a fixed split count that did better is noted beside it. The Hopper
    rules' max_splits: the bucket's chosen cap (``sm90_cap_totals``; the smaller when W8 and W4 both chose one, each
    noted), else the cap it has now. The mma.sync rules' max_splits likewise (``mma_cap_totals``), where the
    bucket keeps the tile the cap was timed on; else the cap it has now."""
    cfams = [f for f in fams if f.kind == "cuda"]
    if not cfams:
        return None
    f0 = cfams[0]
    fam_of = {bits: next((f for f in cfams if f.bits == bits), None) for bits in (8, 4)}
    row_arch = f0.arch_row()
    notes, mma_rows, sm90_rows = [], [], []
    for b_max in f0.bounds():
        mm = -1 if b_max is None else b_max
        top = b_max if b_max is not None else 1 << 30
        # what the rules say now for this bucket; a family that was not measured keeps it
        mma = [_current(f0.rules, row_arch, mm, bits) for bits in (8, 4)]
        mma_cap = _current(f0.rules, row_arch, mm, None)
        sm90 = list(next(r[1:] for r in f0.sm90_rules if r[0] < 0 or top <= r[0]))  # w8, w4, max_splits
        caps, mma_caps = [], []
        for j, bits in enumerate((8, 4)):
            fam = fam_of[bits]
            rows = [r for r in report["rows"] if fam and r["family"] == fam.name and r["bucket_max_m"] == b_max]
            if not rows:
                continue
            cur = fam.auto_tile(top)
            best = _best_total(rows, _rule_config)
            anyb = _best_total(rows, lambda c: True)
            tile = cur if best is None or best[0]["tile"] is None else best[0]["tile"]
            if tile >= 100:
                sm90[j] = tile - 100
            else:  # an mma.sync tile: on sm_90 the Hopper rule must hand the bucket over
                mma[j], sm90[j] = tile, -1
            if best:
                where = f"M <= {b_max}" if b_max else "larger M"
                notes.append(f"//   {where}, {fam.name}: {fam.label(best[0])} {best[1]:.4g} ms over "
                             f"{len(rows)} cases (now: tile {cur})" + (
                                 f"; a fixed split did better: {fam.label(anyb[0])} {anyb[1]:.4g} ms"
                                 if anyb and anyb[1] < best[1] else ""))
            b = _bucket_row(report, fam.name, b_max) if "buckets" in report else None
            if b and b.get("cap_totals_ms"):
                where = f"M <= {b_max}" if b_max else "larger M"
                mma_kind = b.get("cap_kind") == "mma"
                notes.append(f"//   {where}, {fam.name} split cap on {b['cap_tile']}: automatic (cap "
                             f"{mma_cap if mma_kind else sm90[2]}) "
                             f"{b['auto_total_ms']:.4g} ms; " + ", ".join(
                                 f"cap {c} {t:.4g} ms" for c, t in sorted(b["cap_totals_ms"].items(),
                                                                          key=lambda x: int(x[0])))
                             + (f" -> cap {b['best_cap']}" if b["best_cap"] else
                                f" -> none beats it by > {CAP_MARGIN:.0%}"))
                if b["best_cap"] and not mma_kind:
                    caps.append(int(b["best_cap"]))
                elif b["best_cap"] and tile == cur:  # timed on today's mma.sync tile, which the bucket keeps
                    mma_caps.append(int(b["best_cap"]))
                elif b["best_cap"]:
                    notes[-1] += f" (not proposed: the bucket changes tile to {tile})"
        if caps:
            sm90[2] = min(caps)
        if mma_caps:
            mma_cap = min(mma_caps)
        mma_rows.append((row_arch, mm, *mma, mma_cap))
        sm90_rows.append((mm, *sm90))
    lines = [f"// Proposed by benchmarks/tune_tiles.py on {env.get('date')}, {env.get('gpu') or 'cuda-emulated (CPU)'}"
             f" (driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit "
             f"{env.get('commit')}): {env.get('command')}",
             "// Apply by hand to csrc/configs/gemm_tiles*.h and rebuild (tiles are template arguments). Buckets "
             "with no complete measurement keep the tile they have now.", "// Measured:"] + notes + [""]
    if f0.hopper:
        lines += ["// csrc/configs/gemm_tiles_sm90.h (-1: that bucket runs the mma.sync tiles below; the last column "
                  "is max_splits, the cap on the automatic split count)",
                  "constexpr Sm90TileRule kSm90TileRules[] = {"]
        lines += ["    {%d, %d, %d, %d}," % r for r in sm90_rows] + ["};", ""]
    lines += [f"// csrc/configs/gemm_tiles.h (the rows of arch {row_arch}; the other rows as they are; the last "
              "column is max_splits, the cap on the automatic split count)",
              "constexpr TileRule kTileRules[] = {"]
    out_rows = [r for r in f0.rules if r[0] > row_arch] + mma_rows + [r for r in f0.rules if r[0] < row_arch]
    lines += ["    {%d, %d, %d, %d, %d}," % r for r in out_rows] + ["};"]
    return "\n".join(lines) + "\n"


def _current(rules, arch, max_m, bits):
    """The tile (``bits`` 8 or 4; None: the max_splits cap) the current rows of ``arch`` give at the top of this
    bucket (-1 = unbounded)."""
    m = max_m if max_m >= 0 else 1 << 30
    r = next(r for r in rules if r[0] == arch and (r[1] < 0 or m <= r[1]))
    return r[4] if bits is None else r[2] if bits == 8 else r[3]


def _best_total(rows, keep, count=False):
    """(config, total ms) with the lowest total over ``rows`` among configs that ran ok on every row (``count``:
    how many did)."""
    totals: Dict[str, list] = {}
    for r in rows:
        for c in r["candidates"]:
            if keep(c["config"]):
                t = totals.setdefault(cfg_key(c["config"]), [c["config"], 0.0, 0])
                if c.get("status") == "ok":
                    t[1] += c["median_ms"]
                    t[2] += 1
    done = [(c, t) for c, t, n in totals.values() if n == len(rows)]
    if count:
        return len(done)
    return min(done, key=lambda x: x[1]) if done else None


# ---- main -----------------------------------------------------------------------------------------------

def parse_shapes(specs) -> List[tuple]:
    """"model:layer" (a row of benchmarks/common.py) or "NxK"."""
    out = []
    for s in specs:
        m = re.fullmatch(r"(\d+)x(\d+)", s)
        if m:
            out.append(("custom", s, int(m.group(1)), int(m.group(2))))
            continue
        hit = [x for x in common.ALL_SHAPES if f"{x[0]}:{x[1]}" == s]
        if not hit:
            raise SystemExit(f"unknown shape {s!r}: use NxK or one of "
                             + ", ".join(f"'{x[0]}:{x[1]}'" for x in common.ALL_SHAPES))
        out.append(hit[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: interpreter tables, cuda-emulated, tiny shapes")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--groups", type=int, nargs="+", default=[128], help="W4A8 group sizes (first: the table's)")
    ap.add_argument("--shapes", nargs="+", help=f"'model:layer' or NxK (default: {', '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--m", type=int, nargs="+", help="M values (default: each bucket's bound and %s)" % (REP_M,))
    ap.add_argument("--max-candidates", type=int, default=None, help="alternatives per bucket (default: all)")
    ap.add_argument("--max-seconds", type=float, default=None, help="budget: later cases become 'skipped'")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--write-configs", action="store_true",
                    help="rewrite the Triton tables with the measured best; write gemm_tile_rules.h.txt")
    ap.add_argument("--configs-dir", help="Triton tables to read and rewrite (default: kernels/configs)")
    ap.add_argument("--out", help="output folder (default $OUT or benchmarks/out)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = common.select_device(args, "interpreter tables, cuda-emulated, tiny shapes")
    import torch
    import ditq  # noqa: F401  (registers torch.ops.ditq.*)
    from ditq.backends import cuda_backend  # noqa: F401  (loads ditq._C when built)

    args.configs_dir = args.configs_dir or os.path.join(common.REPO, "kernels", "configs")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    args.iters = args.iters if args.iters is not None else (1 if args.smoke else 20)
    shapes = SMOKE_SHAPES if args.smoke and not args.shapes else parse_shapes(args.shapes or DEFAULT_SHAPES)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    fams = make_families(torch, device, args)
    tuner = Tuner(torch, device, fams, shapes, args, Data(torch, device, args.groups, l2))

    # gpu_suite.sh stops a stage with SIGTERM: stop there and write what was measured
    previous = signal.getsignal(signal.SIGTERM)
    common.stop_on_sigterm()
    try:
        tuner.run()
    except (common.Stopped, KeyboardInterrupt) as e:
        print(f"stopped ({type(e).__name__}: {e}): writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    env = common.environment()
    report = {"schema": SCHEMA, "smoke": args.smoke, "device": str(device), "env": env,
              "families": [f.name for f in fams], "shapes": [common.shape_dict(*s) for s in shapes],
              "sms": tuner.sms(), **summarize(tuner)}
    d = common.out_dir(args.out)
    written = []
    if args.write_configs:
        written = write_triton_tables(report, fams, env, d)
        text = cuda_rules_text(report, fams, env)
        if text:
            with open(os.path.join(d, "gemm_tile_rules.h.txt"), "w") as f:
                f.write(text)
            written.append(os.path.join(d, "gemm_tile_rules.h.txt"))
    report["written"] = written
    common.write_json(os.path.join(d, "tiles.json"), report)
    with open(os.path.join(d, "tiles.md"), "w") as f:
        f.write(markdown(report))
    print(common.md_table(report["buckets"], ["family", "bucket_max_m", "shipped_label", "shipped_total_ms",
                                              "best_label", "best_total_ms", "speedup"]))
    ok = sum(c.get("status") == "ok" for r in report["rows"] for c in r["candidates"])
    total = sum(len(r["candidates"]) for r in report["rows"])
    print(f"\n{ok}/{total} measurements ok; wrote tiles.json, tiles.md in {d}"
          + (f"; rewrote {', '.join(written)}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
