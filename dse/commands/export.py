from __future__ import annotations

import argparse
from pathlib import Path

from dse.commands.common import config_from_args
from dse.commands.registry import command
from dse.cost.sources import energy_text
from dse.deploy.export import export, no_prediction_reason


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE_OR_DIR",
                   help="fine-tuned weights.pt (or its folder; a resolved_config.yaml there is the default config)")
    p.add_argument("--target", metavar="TARGET",
                   help="cpu | cuda | cuda:sm_NN | a JSON target dict (default: config export.target)")
    p.add_argument("--assignment", metavar="FILE.yaml",
                   help="assignment for a dense checkpoint (exported without fine-tuning), or MoE capacities")
    p.add_argument("--profile", metavar="FILE.csv", help="profile for the shift-kernel choice and the prediction "
                   "(default: config export.profile, else the stored profile for this device and target)")
    p.add_argument("--no-cuda", action="store_true", help="skip the compile-only CUDA companion artifact")


def _config(args: argparse.Namespace):
    if args.config is None:
        folder = Path(args.checkpoint)
        folder = folder if folder.is_dir() else folder.parent
        stage_cfg = folder / "resolved_config.yaml"
        if stage_cfg.is_file():
            args = argparse.Namespace(**{**vars(args), "config": str(stage_cfg)})
    return config_from_args(args)


@command("export", "compile the ShiftAddViT for a target into an artifact folder (model.so, weights.npz, "
         "assignment.yaml, manifest.yaml)", _args)
def run(args: argparse.Namespace):
    cfg = _config(args)
    out = Path(args.out) if args.out else Path(cfg.out) / "export"
    summary = export(cfg, args.checkpoint, out, target=args.target, assignment=args.assignment,
                     profile=args.profile or cfg.export.profile, cuda_arch=not args.no_cuda)
    lines = [f"artifact {summary['folder']} ({summary['target']}), kernels in the built library: "
             f"{', '.join(summary['kernels']) or 'none'}; compile pipeline: {summary['compile_pipeline']}"
             + (" (TVM's default: the project's failed, see the manifest's library.fallback_reason)"
                if summary["compile_pipeline"] == "tvm-default" else ""),
             f"manifest sha256 {summary['manifest_sha256']} (pin it: dse bench --expect-digest <it>)"]
    if summary["run_on_device"]:
        lines.append(f"val top-1 compiled {summary['compiled_val_acc']:.2f}% vs PyTorch {summary['pytorch_val_acc']:.2f}% "
                     f"(top-1 agreement {100 * summary['top1_agreement']:.2f}%, max relative logit error "
                     f"{summary['max_rel_logit_err']:.2e}); latency {summary['latency_ms']:.2f} ms per batch")
    else:
        lines.append(f"compile-only (not run here); PyTorch val top-1 {summary['pytorch_val_acc']:.2f}%")
    if summary.get("load_warning"):
        lines.append(f"warning: {summary['load_warning']}")
    pred = summary.get("prediction") or {}
    if pred.get("available"):
        lines.append(f"cost model: {pred['latency_ms']:.2f} ms, {energy_text(pred['energy_mj'], '.3f')} per batch "
                     f"(costs {pred.get('source', 'unstated')}; energy: {pred.get('energy_source', 'unstated')})")
    elif pred:
        lines.append(f"cost model: no prediction ({no_prediction_reason(pred)})")
    moe = summary.get("moe")
    if moe and moe.get("cost"):
        c = moe["cost"]
        lines.append(f"MoE capacity routing: val top-1 {c['val_acc_capacity_routing']:.2f}% vs top-1 routing "
                     f"{c['val_acc_top1_routing']:.2f}% ({c['delta_points']:+.2f} points)")
    if summary.get("kernels_missing"):
        lines.append(f"warning: the built library lacks {len(summary['kernels_missing'])} kernel(s) the graph calls: "
                     f"{', '.join(summary['kernels_missing'][:4])}")
    if summary.get("cuda"):
        lines.append(f"CUDA artifact (compile-only, not run): {summary['cuda']['folder']} ({summary['cuda']['target']}, "
                     f"compile pipeline {summary['cuda']['compile_pipeline']})")
    return {"text": "\n".join(lines), "json": summary}
