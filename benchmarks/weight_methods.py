"""W4A8 with ditq's static policy, the int4 weights rounded each way (``QuantConfig.weight_method``), on the bundled DiT.

    nice python benchmarks/weight_methods.py --out DIR                      # g32 and g128 x rtn / mse / gptq
    python benchmarks/weight_methods.py --out DIR --groups 32 --methods gptq --steps 2 --samples-per-class 1
    nice python benchmarks/weight_methods.py --out DIR --groups 32 128 --methods rtn gptq --group-scales float int

Runs ``ditq demo``'s machinery (same seeds, calibration and metrics: ``ditq.demo.run``) with one extra setting per
(group size, method), the activation policy of the demo's ``-best`` rows (``BEST_POLICY``), and prints the demo
table plus, per setting, the mean weight SQNR of the chosen rounding vs round-to-nearest and, for GPTQ, the mean
estimated layer-output SQNR on the calibration inputs. ``demo.json`` in ``--out`` holds every per-layer report.
"""
from __future__ import annotations

import argparse
import sys
import time
from unittest import mock


def main(argv=None) -> int:
    import torch

    from ditq.demo import run
    from ditq.weight_rounding import WEIGHT_METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for demo.png / demo.json")
    p.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    p.add_argument("--methods", nargs="+", default=list(WEIGHT_METHODS), choices=WEIGHT_METHODS)
    p.add_argument("--group-scales", nargs="+", default=["float"], choices=["float", "int"],
                   help="float group scales (default), integer ones (two-level: QuantConfig.group_scales), or both")
    p.add_argument("--steps", type=int, default=run.DEFAULT_STEPS)
    p.add_argument("--samples-per-class", type=int, default=run.DEFAULT_SAMPLES_PER_CLASS)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    extra = {f"w4a8-g{g}-{m}" + ("-int" if gs == "int" else ""):
             dict(preset="w4a8", group_size=g, weight_method=m, group_scales=gs, **run.BEST_POLICY)
             for g in args.groups for m in args.methods for gs in args.group_scales}
    names = list(extra)
    t0, c0 = time.perf_counter(), time.process_time()
    with mock.patch.dict(run.SETTINGS, extra):  # the demo's own settings, for this run only
        res = run.run_demo(args.out, steps=args.steps, samples_per_class=args.samples_per_class, settings=names,
                           progress=False)
    print(f"wall {time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s, "
          f"{torch.get_num_threads()} thread(s)")

    def mean(layers, key):
        vals = [lr[key] for lr in layers if isinstance(lr.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")

    print(f"{'setting':<16} {'W SQNR':>7} {'W rtn':>7} {'out est':>8} {'out rtn':>8}  (means over the quantized layers, dB)")
    for name in names:
        layers = res["quant_reports"][name]["layers"]
        w = mean(layers, "weight_sqnr")
        w_rtn = mean(layers, "weight_sqnr_rtn") if layers[0].get("weight_sqnr_rtn") is not None else w
        print(f"{name:<16} {w:>7.2f} {w_rtn:>7.2f} {mean(layers, 'layer_output_sqnr'):>8.2f} "
              f"{mean(layers, 'layer_output_sqnr_rtn'):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
