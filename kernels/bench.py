"""Benchmark the TVM primitives against PyTorch's dense fp32 matmul on ViT layer shapes.

    python -m kernels.bench [--trials N] [--shapes deit|digits|all] [--filter TEXT] [--json]

For every (primitive, layer shape) it measures, side by side in one process and interleaved
round by round (the machine may be shared, so only ratios measured together mean much): the TVM
default schedule, the TVM tuned schedule when the target's tuning database has a record (``--trials
N`` tunes kernels that have none, with budget N), and PyTorch fp32 ``torch.matmul`` with 2 threads
for the same ``(b, m, k, n)`` (``x @ wᵀ`` for the linear primitives, a batched matmul for ``bmm``
and ``matadd``). Times are medians over rounds of per-round medians, in milliseconds. On a shared 2-core machine PyTorch's
2-thread OpenMP is often stalled by other processes, so a 1-thread PyTorch column is shown too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kernels import primitives, schedules, targets, tuning
from kernels.build import build
from kernels.compiled import CompiledKernel, aligned_empty, compile_primfunc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchShape:
    primitive: str
    label: str
    b: int
    m: int
    k: int
    n: int

    @property
    def key(self) -> str:
        return f"{self.primitive}/{self.label}"


def _vit_shapes(
    tag: str, batch: int, tokens: int, dim: int, heads: int, mlp: int, nbits: int = 16
) -> list[BenchShape]:
    """Linear, attention-product and additive-attention shapes of one ViT block at ``batch``."""
    rows = batch * tokens
    head_dim = dim // heads
    bh = batch * heads
    linear = {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, mlp), "fc2": (mlp, dim)}
    out = [
        BenchShape(p, f"{tag}.{name}", 1, rows, k, n)
        for p in ("matmul", "matshift", "matshift_decode")
        for name, (k, n) in linear.items()
    ]
    out += [
        BenchShape("bmm", f"{tag}.q@kT", bh, tokens, head_dim, tokens),
        BenchShape("bmm", f"{tag}.attn@v", bh, tokens, tokens, head_dim),
        # additive attention on binary codes: KᵀV reduces over tokens, Q(KV) over code bits
        BenchShape("matadd", f"{tag}.KTV", bh, nbits, tokens, head_dim),
        BenchShape("matadd", f"{tag}.Q(KV)", bh, tokens, nbits, head_dim),
    ]
    return out


SHAPE_SETS: dict[str, Callable[[], list[BenchShape]]] = {
    # DeiT-Tiny at 224 px, batch 8: 197 tokens, dim 192, 3 heads, MLP 768.
    "deit": lambda: _vit_shapes("deit", batch=8, tokens=197, dim=192, heads=3, mlp=768),
    # The embedded ViT: 32×32 images, 4×4 patches → 64 + cls = 65 tokens, dim 96, 3 heads, MLP 384.
    "digits": lambda: _vit_shapes("digits", batch=8, tokens=65, dim=96, heads=3, mlp=384),
}


def shapes_for(which: str) -> list[BenchShape]:
    if which == "all":
        return [s for name in SHAPE_SETS for s in SHAPE_SETS[name]()]
    return SHAPE_SETS[which]()


def _torch_dense(shape: BenchShape) -> Callable[[], Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    b, m, k, n = shape.b, shape.m, shape.k, shape.n
    if shape.primitive in ("bmm", "matadd"):
        x, y = torch.randn(b, m, k, generator=g), torch.randn(b, k, n, generator=g)
        return lambda: torch.matmul(x, y)
    x, w = torch.randn(b, m, k, generator=g), torch.randn(n, k, generator=g)
    return lambda: torch.matmul(x, w.t())


def _tvm_call(kernel: Any, arrays: Sequence[np.ndarray]) -> Callable[[], Any]:

    args = kernel.check_args(tuple(arrays))
    out = aligned_empty(kernel.out_shape, kernel.out_dtype)
    fn = kernel._function()
    return lambda: fn(*args, out)


def race(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    min_round_s: float = 0.05,
    setup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """Interleaved timing: each round times every function for >= ``min_round_s``; median of rounds.

    ``setup[name]`` runs (untimed) before each of ``name``'s rounds, e.g. to set a thread count.
    """
    setup = setup or {}
    for name, f in fns.items():  # warm-up
        setup.get(name, lambda: None)()
        f()
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            setup.get(name, lambda: None)()
            f()
            times = []
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
                if time.perf_counter() - start >= min_round_s and len(times) >= 3:
                    break
            per_round[name].append(float(np.median(times)) * 1e3)
    return {
        name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for name, v in per_round.items()
    }


def bench_one(
    shape: BenchShape, target: str, trials: int, rounds: int, tuning_dir: str | None, threads: int = 2
) -> dict[str, Any]:
    import torch


    kernel = build(
        shape.primitive,
        b=shape.b,
        m=shape.m,
        k=shape.k,
        n=shape.n,
        target=target,
        trials=trials,
        tuning_dir=tuning_dir,
    )
    default = kernel if kernel.schedule == "default" else build_default(shape, target)
    tuned = kernel if kernel.schedule == "tuned" else tuning.tuned_kernel(default, tuning_dir)
    arrays = primitives.random_inputs(shape.primitive, shape.b, shape.m, shape.k, shape.n, seed=0)
    ref = primitives.reference(shape.primitive, *arrays)
    dense = _torch_dense(shape)
    fns = {"torch": dense, "torch_1t": dense, "default": _tvm_call(default, arrays)}
    setup = {"torch": lambda: torch.set_num_threads(threads), "torch_1t": lambda: torch.set_num_threads(1)}
    for name, kern in (("default", default), ("tuned", tuned)):
        if kern is None:
            continue
        out = kern(*arrays)
        if not np.allclose(out, ref, rtol=1e-4, atol=1e-3 * np.sqrt(shape.k)):
            raise AssertionError(f"{shape.key}: TVM {name} kernel disagrees with the reference")
        fns[name] = _tvm_call(kern, arrays)
    res = race(fns, rounds, setup=setup)
    torch.set_num_threads(threads)
    row: dict[str, Any] = {
        "primitive": shape.primitive,
        "layer": shape.label,
        "b": shape.b,
        "m": shape.m,
        "k": shape.k,
        "n": shape.n,
        "torch_ms": res["torch"]["median_ms"],
        "torch_1t_ms": res["torch_1t"]["median_ms"],
        "torch_min_ms": res["torch"]["min_ms"],
        "default_min_ms": res["default"]["min_ms"],
        "default_ms": res["default"]["median_ms"],
        "tuned_ms": res["tuned"]["median_ms"] if "tuned" in res else None,
        "tuned_trials": tuned.tuned_trials if tuned is not None else 0,
        "chosen": kernel.schedule,
    }
    row["default_vs_torch"] = row["default_ms"] / row["torch_ms"]
    row["tuned_vs_torch"] = row["tuned_ms"] / row["torch_ms"] if row["tuned_ms"] is not None else None
    row["best_vs_torch"] = min(v for v in (row["default_vs_torch"], row["tuned_vs_torch"]) if v is not None)
    best_ms = min(v for v in (row["default_ms"], row["tuned_ms"]) if v is not None)
    row["best_vs_torch_1t"] = best_ms / row["torch_1t_ms"]
    return row


def build_default(shape: BenchShape, target: str) -> Any:
    """The default-schedule kernel even where a tuned record won (for the side-by-side column)."""

    tgt = targets.resolve_target(target)
    dtype = primitives.get(shape.primitive).default_dtype
    func = schedules.default_primfunc(shape.primitive, shape.b, shape.m, shape.k, shape.n, dtype, tgt)
    return CompiledKernel(
        shape.primitive,
        (shape.b, shape.m, shape.k, shape.n),
        dtype,
        tgt,
        compile_primfunc(func, tgt),
        func,
        "default",
        0,
    )


def format_table(rows: list[dict[str, Any]], threads: int = 2) -> str:
    head = (
        f"{'primitive':16s} {'layer':14s} {'b':>3s} {'m':>5s} {'k':>4s} {'n':>4s} "
        f"{'torch' + str(threads) + 't':>8s} {'torch1t':>8s} {'default':>8s} {'tuned':>8s} {'trials':>6s} "
        f"{'def/t':>6s} {'tun/t':>6s} {'best/1t':>7s}"
    )
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r["primitive"] != last:
            lines.append("")
        last = r["primitive"]
        tuned = f"{r['tuned_ms']:8.3f}" if r["tuned_ms"] is not None else f"{'-':>8s}"
        tratio = f"{r['tuned_vs_torch']:6.2f}" if r["tuned_vs_torch"] is not None else f"{'-':>6s}"
        lines.append(
            f"{r['primitive']:16s} {r['layer']:14s} {r['b']:3d} {r['m']:5d} {r['k']:4d} {r['n']:4d} "
            f"{r['torch_ms']:8.3f} {r['torch_1t_ms']:8.3f} {r['default_ms']:8.3f} {tuned} {r['tuned_trials']:6d} "
            f"{r['default_vs_torch']:6.2f} {tratio} {r['best_vs_torch_1t']:7.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trials", type=int, default=0, help="MetaSchedule budget for kernels without a tuning record"
    )
    parser.add_argument("--shapes", choices=["deit", "digits", "all"], default="all")
    parser.add_argument(
        "--filter", default="", help="only primitive/layer keys containing this text (comma = or)"
    )
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--tuning-dir", default=None)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (and TVM's, unless "
                        "TVM_NUM_THREADS is set)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    import torch

    torch.set_num_threads(args.threads)
    # Same thread count on both sides. Left alone, TVM 0.27 halves hardware_concurrency() on x86 (it
    # assumes hyper-threads), so on a 2-vCPU machine every TVM kernel would run on one thread.
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    wanted = [f for f in args.filter.split(",") if f]
    shapes = [s for s in shapes_for(args.shapes) if not wanted or any(w in s.key for w in wanted)]
    rows = []
    for shape in shapes:
        rows.append(bench_one(shape, args.target, args.trials, args.rounds, args.tuning_dir, args.threads))
        if not args.json:
            print(f"measured {shape.key}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"times in ms, median of {args.rounds} interleaved rounds; torch = fp32 torch.matmul with "
            f"{args.threads} threads (torch1t: 1 thread); ratios are TVM / torch ({args.threads} threads), "
            "best/1t = the faster TVM schedule / torch 1 thread"
        )
        print(format_table(rows, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
