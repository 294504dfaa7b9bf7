"""The paper's recipes compiled for pods and GPU hosts on this CPU (python -m dwm_jax.compile
in .venv-aot, `make aot`): per-chip memory, whether it fits and with which switches, the
roofline step time and MFU, and the compile time here; then the masking strategies side by
side on one target.

  .venv-aot/bin/python -m benchmarks.pods                         # the whole table
  .venv-aot/bin/python -m benchmarks.pods --targets v5e-64 --recipes m2d
  .venv-aot/bin/python -m benchmarks.pods --skip_recipes          # the strategies only
  .venv-aot/bin/python -m benchmarks.pods --from_json rows.json   # the table of kept reports

Each row starts from bfloat16 compute and FSDP (layers unrolled, so that XLA's cost
analysis counts every layer in the one compilation); when that does not fit, it tries again
with every block rematerialised.
Rows are printed as they finish (Markdown), and kept as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TARGETS = ("v4-32", "v5e-64", "v5e-256", "v5p-128", "v6e-64", "h100:8")
RECIPES = ("m2d", "msm_mae")
STRATEGIES = ("random", "inverse_block", "dispersion", "sgim")
PAPER_BATCH = 2048          # the paper's global batch (80 x 608 input, ViT-B)
SWITCHES = (("bf16, fsdp", ["--config.model.compute_dtype=bfloat16", "--config.fsdp=True"]),
            ("bf16, fsdp, remat", ["--config.model.compute_dtype=bfloat16", "--config.fsdp=True",
                                   "--config.model.remat=full"]))


def compile_one(recipe: str, masker: str, target: str, batch: int, flags: list[str]) -> dict:
    """One run of python -m dwm_jax.compile -> its report (or the error line)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "dwm_jax.compile",
                              f"--config=configs/{recipe}.py:{masker}", f"--topology={target}",
                              "--config.model.size=base", f"--config.batch_size={batch}",
                              f"--json={out}", *flags], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not os.path.exists(out):
            return dict(error=(res.stderr.strip().splitlines() or ["?"])[-1], wall_s=wall)
        report = json.load(open(out))
    report["wall_s"] = wall
    return report


def row(recipe: str, masker: str, target: str, batch: int) -> dict:
    """The first switch set under which the step fits (or the last tried)."""
    for name, flags in SWITCHES:
        report = compile_one(recipe, masker, target, batch, flags)
        report["switches"] = name
        if report.get("step", {}).get("fits"):
            break
    return dict(report, recipe=recipe, masker=masker, topology=target, batch=batch)


def fill_model_flops(r: dict) -> dict:
    """Adds the model FLOPs per chip and the MFU they imply to a report written without
    them (traced here, nothing compiled)."""
    if "error" in r or "model_flops" in r["step"]:
        return r
    from dwm_jax import aot, build, sharding
    from dwm_jax import config as config_lib
    from dwm_jax.train import step as step_lib
    cfg = config_lib.base(r["recipe"], r["masker"])
    cfg.batch_size, cfg.model.size = r["batch"], "base"

    def lower(flat):
        setup = build.make_setup(flat, 1000, flat.total_steps or flat.epochs * 1000)
        return step_lib.step_program(setup, sharding.make_mesh(1)).lower()
    s = r["step"]
    s["model_flops"] = aot.model_flops(cfg, lower) / r["target"]["devices"]
    s["model_mfu"] = s["model_flops"] / (r["target"]["peak_bf16_tflops"] * 1e12) / s["step_s"]
    return r


def markdown(r: dict) -> str:
    if "error" in r:
        return (f"| {r['topology']} | {r['recipe']} | {r['masker']} | {r['batch']} | "
                f"{r['switches']} | {r['error'][:160]} | | | | {r['wall_s']:.0f} s |")
    t, s = r["target"], r["step"]
    gib = 2 ** 30
    per_chip = r["batch"] // t["devices"]
    return (f"| {t['name']} ({t['devices']} x {t['chip']}) | {r['recipe']} | {r['masker']} | "
            f"{r['batch']} ({per_chip} a chip) | {r['switches']} | "
            f"{s['total'] / gib:.1f} / {s['usable'] / gib:.1f} GiB "
            f"{'fits' if s['fits'] else 'does not fit'} | {s['flops'] / 1e12:.2f} "
            f"({s['model_flops'] / 1e12:.2f}) TFLOP, {s['bytes'] / 1e9:.0f} GB | "
            f"{s['step_s'] * 1e3:.0f} ms ({s['bound']}) | {s['model_mfu']:.2f} | "
            f"{s['compile_s']:.0f} s |")


HEADER = ("| target | recipe | masking | global batch | switches | memory per chip | compiled "
          "(model) FLOPs, bytes per chip | roofline step | MFU | compile here |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--batch", type=int, default=PAPER_BATCH)
    p.add_argument("--strategies_on", default="v5e-64",
                   help="the target for the strategies side by side ('' to skip)")
    p.add_argument("--skip_recipes", action="store_true", help="only the strategies")
    p.add_argument("--out", default="", help="keep every report as JSON here")
    p.add_argument("--from_json", default="", help="print the table of reports kept with "
                   "--out (nothing compiled)")
    a = p.parse_args(argv)
    print(HEADER, flush=True)
    if a.from_json:
        for r in json.load(open(a.from_json)):
            print(markdown(fill_model_flops(r)), flush=True)
        return 0
    rows = []
    plan = [] if a.skip_recipes else [(r, "dispersion", t) for t in a.targets.split(",")
                                      for r in a.recipes.split(",")]
    if a.strategies_on:
        plan += [("m2d", m, a.strategies_on) for m in STRATEGIES
                 if ("m2d", m, a.strategies_on) not in plan]
    for recipe, masker, target in plan:
        rows.append(fill_model_flops(row(recipe, masker, target, a.batch)))
        print(markdown(rows[-1]), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
