from __future__ import annotations

import argparse

from dse.commands.common import config_from_args, table
from dse.commands.registry import command
from dse.deploy.bench import bench


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder written by `dse export`")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contestant (it compiles for ~40 s)")
    p.add_argument("--no-dense-tvm", action="store_true", help="skip the dense model compiled by TVM (built once "
                   "into <artifact>-dense-tvm/; default: config bench.dense_tvm)")
    p.add_argument("--dense", metavar="FILE", help="dense weights.pt (default: the manifest's dense_checkpoint)")
    p.add_argument("--threads", type=int, metavar="N", help="threads for both PyTorch and TVM (default: config "
                   "bench.threads, 0 = all cores)")
    p.add_argument("--expect-digest", metavar="SHA256", help="refuse the artifact unless its manifest has this "
                   "sha256 (printed by `dse export`): pins the exact artifact a deployment tested")
    p.add_argument("--profile", metavar="FILE.csv", help="profile for the cost model's predictions "
                   "(default: the one the artifact was exported with, else the stored one)")


@command("bench", "the exported model vs the dense model compiled by TVM and in PyTorch (eager, torch.compile), "
         "same inputs, one run", _args)
def run(args: argparse.Namespace):
    cfg = config_from_args(args, *([f"bench.threads={args.threads}"] if args.threads is not None else []))
    result = bench(cfg, args.artifact, torch_compile=False if args.no_compile else None, dense=args.dense,
                   profile=args.profile, dense_tvm=False if args.no_dense_tvm else None,
                   expected_digest=args.expect_digest)
    return {"text": render(result), "json": result}


def render(result: dict) -> str:
    """The text table of a :func:`dse.deploy.bench.bench` result."""
    rows = [{"model": r["model"], "median ms": r["median_ms"], "p90 ms": r["p90_ms"],
             "x eager": r["speedup_vs_eager"], "energy mJ": r["energy_mj"],
             "predicted ms": r["predicted_ms"],
             "pred. error %": r["prediction_error_pct"],
             "at host speed now %": r.get("prediction_error_now_pct")} for r in result["rows"]]
    speed = result.get("host_speed") or {}
    sources = sorted({r["energy_source"] for r in result["rows"]})
    gains = [f"{result[key]:.2f}x vs {name}" for key, name in (
        ("speedup_vs_dense_tvm", "dense (TVM): the reparameterisation's own gain"),
        ("speedup_vs_eager", "dense (PyTorch eager)"), ("speedup_vs_compiled", "dense (torch.compile)"))
        if result.get(key) is not None]
    dense_tvm = result.get("dense_tvm")
    device = result.get("device") or {}
    text = "\n".join([
        table(rows, floatfmt="{:.3f}"),
        "",
        f"ShiftAddViT speed-up: {'; '.join(gains)}",
        f"device: {device.get('name')} ({device.get('slug')})",
        *([f"dense (TVM): the dense checkpoint exported with every layer mult/msa, {dense_tvm['artifact']} "
           f"({'built now' if dense_tvm['built'] else 'reused'})"] if dense_tvm else []),
        f"batch {result['batch']} ({result['inputs']}), {result['repeat']} calls each, interleaved; threads: torch "
        f"{result['threads']['torch']}, TVM {result['threads']['tvm']}; load average {result['load_1m']}",
        f"energy source: {'; '.join(sources)}",
        f"host speed: reference kernel {speed['now_ms']:.4f} ms now"
        + (f" vs {speed['then']['latency_ms']:.4f} ms when the profile was measured: the host runs "
           f"{speed['ratio']:.2f}x the time it did then (the last column: prediction x that ratio vs measured)"
           if speed.get("ratio") else " (the profile has no reference timing: drift unknown)") if speed else "",
        *[f"no prediction for {r['model']}: {r['no_prediction']}" for r in result["rows"] if r.get("no_prediction")],
        f"top-1 agreement with the dense model on this batch: {100 * result['top1_agreement_with_dense']:.1f}%",
        *([f"warning: {result['load_warning']}"] if result.get("load_warning") else []),
    ])
    if result["torch_compile_s"] is not None:
        text += f"\ntorch.compile took {result['torch_compile_s']:.1f} s"
    return text
