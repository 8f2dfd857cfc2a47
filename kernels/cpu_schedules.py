"""Hand-written CPU (llvm) schedules, each on an equivalent compute formulation of its primitive.

The canonical definitions in ``kernels.primitives`` read weights as ``w[n, k]``; vector code wants
the opposite, so each kernel here first packs its weights at run time (an ``O(n·k)`` stage, small
next to the ``O(b·m·n·k)`` reduction) and then runs a register-blocked micro-kernel:

- **GEMMs** (matmul, bmm, matshift_decode): weights packed to ``wp[n/NB, k, NB]`` (bmm's ``y[b, k, n]``
  is read in place when ``NB`` divides ``n``); a tile of ``MR``
  rows × ``NB`` columns accumulates in vector registers (``MR·NB/lanes`` of them) while ``k`` runs;
  rows of ``x`` are broadcast, a row of ``wp`` is a contiguous vector load: one FMA per vector.
  matshift_decode decodes ``sign·2^-shift`` inside the packing stage.
- **matshift** vectorises over *rows* instead, so that each weight is a scalar: with
  ``-(x >> s) == (~x >> s) + 1`` (arithmetic shift commutes with bitwise not) every term is
  ``src >> s`` where ``src`` is ``x``, ``~x`` or ``0`` picked per weight by its sign, plus one per
  negative weight, added once per output column (``cneg[n]``). The per-tile table
  ``xpm[k, 4, rows] = (x, ~x, 0, 0)`` (four rows so that ``& 3`` bounds the index for compute_at)
  makes the choice a scalar index, so the inner loop is a vector load, one per-lane arithmetic
  shift and one add: no select, no multiply, no negate. Results are exact and identical to
  ``Σ_k sign·(x >> shift)`` modulo 2^32.
- **matadd** vectorises over ``n`` (rows of ``v`` are contiguous) and accumulates
  ``select(bit, v, -0.0)``, which LLVM turns into masked adds.

Tile sizes follow the register file (``_gemm_tile``: 16 accumulators of 32 AVX-512 registers, 8 of 16
AVX2 ones); they were compared by measurement on this project's 2-core AVX-512 machine, which is shared
and noisy, so treat them as sensible defaults rather than optima. The GEMMs reduce over whole tiles
(rows and columns padded, see :func:`_packed_gemm`) and write back only the valid part, so no predicate
sits inside the reduction; their time therefore follows the padded work (:func:`tiled_shape`, used by
the cost model). When the weights outgrow a core's L2, row tiles are grouped into blocks that reuse each
weight panel while it is cached (:func:`_row_block_tiles`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from kernels.primitives import decode_pow2
from kernels.targets import host_l2_caches, vector_lanes

if TYPE_CHECKING:
    import tvm
    from tvm import te


CpuScheduleFn = Callable[[int, int, int, int, str, "tvm.target.Target"], "tvm.tirx.PrimFunc"]
CPU_SCHEDULES: dict[str, CpuScheduleFn] = {}  # primitive -> its hand schedule, filled below


def register_cpu_schedule(name: str) -> Callable[[CpuScheduleFn], CpuScheduleFn]:
    def deco(fn: CpuScheduleFn) -> CpuScheduleFn:
        CPU_SCHEDULES[name] = fn
        return fn

    return deco


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class GemmTile:
    mr: int  # rows per register tile
    nv: int  # vectors per row of the tile (NB = nv·lanes columns)


def _gemm_tile(lanes: int, n: int, m: int) -> GemmTile:
    """The register tile for ``m`` rows and ``n`` columns: up to 16 accumulators on AVX-512 (of 32
    registers), 8 on AVX2.

    Columns: prefer the widest tile that divides ``n`` (no padding); else the one that pads least. Rows:
    the most that fit the accumulators, unless down to 3/4 of that pads ``m`` by over 1/16 less (65
    attention rows: 13 per tile rather than 16, which computes 80; 30% faster). A smaller tile reuses each
    loaded vector less: 3 rows x 4 vectors ran 4-11% slower than 4 x 4 at the same work, and 2 x 4 up
    to 40% slower, so small savings are not worth it.
    """
    budget = 16 if lanes >= 16 else 8
    options = [nv for nv in (4, 2, 1) if nv * lanes <= max(n, lanes)] or [1]
    exact = [nv for nv in options if n % (nv * lanes) == 0]
    nv = exact[0] if exact else min(options, key=lambda v: (_ceil_div(n, v * lanes) * v * lanes, -v))
    rows = max(1, budget // nv)
    mr = min(range(rows, _ceil_div(3 * rows, 4) - 1, -1), key=lambda r: (_ceil_div(m, r) * r, -r))
    if (_ceil_div(m, rows) * rows - _ceil_div(m, mr) * mr) * 16 <= m:
        mr = rows
    return GemmTile(mr=mr, nv=nv)


def _pack_weights(n: int, k: int, nb: int, fn, dtype: str = "float32", name: str = "wpack") -> te.Tensor:
    """``wp[n/NB, k, NB] = fn(j, r)``, zero-padded past ``n``."""
    from tvm import te, tirx

    no = _ceil_div(n, nb)

    def body(jo, r, ji):
        j = jo * nb + ji
        jc = tirx.min(j, n - 1)  # keep the padded lanes' loads in bounds
        return tirx.Select(j < n, fn(jc, r), tirx.const(0, dtype))  # both sides safe: a vector select

    return te.compute((no, k, nb), body, name=name)


def _packed_gemm(shape: tuple[int, int, int, int], tile: GemmTile, lanes: int, a_fn, w_fn, combine,
                 name: str) -> te.Tensor:
    """``out[b,i,j] = Σ_r combine(a_fn(b,i,r), w_fn(b, j/NB, r, j%NB))``.

    The reduction runs over whole register tiles: ``m`` and ``n`` padded to multiples of ``MR`` and ``NB``,
    rows past ``m`` reading row ``m-1`` again (a clamped, always-valid load) and columns past ``n`` the
    zero-padded weights. The tile lives in registers and a second stage writes its valid part to ``out``,
    so the only predicate is in that write-back, outside the reduction: a row predicate inside the
    ``k`` loop made LLVM's code for some ragged ``m`` run at half speed (e.g. 1637x240x156 at 99 GMAC/s
    against 188 for m=1378 on 2 cores), and a column predicate inside the vectorised loop makes TVM
    scalarise it.
    """
    from tvm import te, tirx

    b, m, k, n = shape
    nb = tile.nv * lanes
    m_pad, n_pad = _ceil_div(m, tile.mr) * tile.mr, _ceil_div(n, nb) * nb
    r = te.reduce_axis((0, k), name="k")

    def row(i):
        return i if m_pad == m else tirx.min(i, m - 1)

    acc = te.compute(
        (b, m_pad, n_pad),
        lambda bi, i, j: te.sum(combine(a_fn(bi, row(i), r), w_fn(bi, j // nb, r, j % nb)), axis=r),
        name=name + "_acc",
    )
    return te.compute((b, m, n), lambda bi, i, j: acc[bi, i, j], name=name)


_ROW_BLOCK_BYTES = 256 << 10  # a row block's slice of x (MC x k), kept in L2 next to a weight panel


def _l2_per_core() -> int:
    """The smallest L2 of this machine's cores (sysfs), 1 MiB where it cannot be read."""

    return min(host_l2_caches(), default=1 << 20)


def _row_block_tiles(m_tiles: int, mr: int, k: int, n_pad: int, elem_bytes: int = 4) -> int:
    """Row tiles per L2 block: 1 (none) while the weights fit in one core's L2; else as many as fit
    ``_ROW_BLOCK_BYTES`` of ``x``, leaving at least 4 blocks to share among the threads.

    Without blocking every row tile streams all the weights; once they outgrow L2 that is from L3, and
    the GEMM halves its speed (1576x768x768, 2.4 MB of weights on a 2 MiB L2: 86 GMAC/s, 155 blocked;
    blocking weights that fit cost 5-15%, e.g. 1293x741x402 at 191 vs 163 GMAC/s)."""
    if k * n_pad * elem_bytes <= _l2_per_core():
        return 1
    fit = max(1, _ROW_BLOCK_BYTES // (mr * k * elem_bytes))
    return max(1, min(fit, _ceil_div(m_tiles, 4)))


def _schedule_gemm(func: tvm.tirx.PrimFunc, name: str, packs: list[str], tile: GemmTile, lanes: int,
                   shape: tuple[int, int, int, int]):
    """Register-blocked schedule of a :func:`_packed_gemm` (plus its packing stages): loops
    ``b, row block, column tile, row tile in block, k, MR rows, NB columns (vector)``."""
    from tvm import s_tir

    _, m, k, n = shape
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(name + "_acc")
    b, i, j, r = sch.get_loops(blk)
    nb = tile.nv * lanes
    m_tiles = _ceil_div(m, tile.mr)
    io, ii = sch.split(i, [None, tile.mr])
    jo, ji = sch.split(j, [None, nb])
    block = _row_block_tiles(m_tiles, tile.mr, k, _ceil_div(n, nb) * nb)
    if block > 1:
        ib, it = sch.split(io, [None, block])
        sch.reorder(b, ib, jo, it, r, ii, ji)
        outer, tile_loop = ib, it
    else:
        sch.reorder(b, io, jo, r, ii, ji)
        outer, tile_loop = io, jo
    sch.set_scope(blk, 0, "local")  # the MR x NB tile: compacted to registers
    out = sch.get_sblock(name)
    sch.reverse_compute_at(out, tile_loop)
    wi, wj = sch.get_loops(out)[-2:]
    sch.unroll(wi)
    if n % nb == 0:
        sch.vectorize(wj)
    else:
        sch.unroll(wj)  # ragged columns: predicated scalar stores (a vector one would be scalarised anyway)
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.parallel(sch.fuse(b, outer))
    sch.decompose_reduction(blk, r)
    for pack in packs:
        p = sch.get_sblock(pack)
        loops = sch.get_loops(p)
        sch.parallel(sch.fuse(*loops[:-2]))
        sch.vectorize(loops[-1])
    return sch.mod["main"]


def _mac(a, w):
    return a * w


def _weight_pack(name: str, n: int, k: int, nb: int, dtype: str) -> tuple[list[te.Tensor], te.Tensor]:
    """The weight placeholders of ``matmul`` (``w``) or ``matshift_decode`` (``shift``, ``sign``) and their
    fp32 packing ``wp[n/NB, k, NB]`` (:func:`_pack_weights`); matshift_decode decodes ``sign·2^-shift`` there."""
    from tvm import te


    if name == "matmul":
        w = te.placeholder((n, k), dtype, name="w")
        return [w], _pack_weights(n, k, nb, fn=lambda j, r: w[j, r].astype("float32"))
    shift = te.placeholder((n, k), "int8", name="shift")
    sign = te.placeholder((n, k), "int8", name="sign")
    return [shift, sign], _pack_weights(n, k, nb, fn=lambda j, r: decode_pow2(shift[j, r], sign[j, r], "float32"))


def _weight_gemm_cpu(name: str, b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target
                     ) -> tvm.tirx.PrimFunc:
    """``matmul``/``matshift_decode`` in one function: the weights packed on every call, then the GEMM."""
    from tvm import te

    lanes = vector_lanes(target, 4)
    tile = _gemm_tile(lanes, n, m)
    nb = tile.nv * lanes
    x = te.placeholder((b, m, k), dtype, name="x")
    weights, wp = _weight_pack(name, n, k, nb, dtype)
    out = _packed_gemm(
        (b, m, k, n),
        tile,
        lanes,
        lambda bi, i, r: x[bi, i, r].astype("float32"),
        lambda bi, jo, r, ji: wp[jo, r, ji],
        _mac,
        name,
    )
    return _schedule_gemm(te.create_prim_func([x, *weights, out]), name, ["wpack"], tile, lanes, (b, m, k, n))


def _column_tiles(t: te.Tensor, nb: int, dtype: str, name: str) -> tuple[Callable, list[str]]:
    """How the GEMM reads an operand ``t[b, k, n]`` (bmm's ``y``, matadd's ``v``) as ``(b, j/NB, k, j%NB)``
    in ``dtype``: in place when its rows are whole column tiles already, else through a zero-padded copy
    ``name[b, n/NB, k, NB]`` (returned in the list of packing stages to schedule)."""
    from tvm import te, tirx

    b, k, n = (int(v) for v in t.shape)
    if n % nb == 0 and t.dtype == dtype:  # rows of t are contiguous along n: read them in place
        return (lambda bi, jo, r, ji: t[bi, r, jo * nb + ji]), []

    def pack(bi, jo, r, ji):
        j = jo * nb + ji
        return tirx.Select(j < n, t[bi, r, tirx.min(j, n - 1)].astype(dtype), tirx.const(0, dtype))

    packed = te.compute((b, _ceil_div(n, nb), k, nb), pack, name=name)
    return (lambda bi, jo, r, ji: packed[bi, jo, r, ji]), [name]


@register_cpu_schedule("matmul")
def matmul_cpu(b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    return _weight_gemm_cpu("matmul", b, m, k, n, dtype, target)


@register_cpu_schedule("bmm")
def bmm_cpu(b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    from tvm import te

    lanes = vector_lanes(target, 4)
    tile = _gemm_tile(lanes, n, m)
    nb = tile.nv * lanes
    x = te.placeholder((b, m, k), dtype, name="x")
    y = te.placeholder((b, k, n), dtype, name="y")
    y_fn, packs = _column_tiles(y, nb, "float32", "ypack")
    out = _packed_gemm(
        (b, m, k, n),
        tile,
        lanes,
        lambda bi, i, r: x[bi, i, r].astype("float32"),
        y_fn,
        _mac,
        "bmm",
    )
    return _schedule_gemm(te.create_prim_func([x, y, out]), "bmm", packs, tile, lanes, (b, m, k, n))


@register_cpu_schedule("matshift_decode")
def matshift_decode_cpu(
    b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target
) -> tvm.tirx.PrimFunc:
    return _weight_gemm_cpu("matshift_decode", b, m, k, n, dtype, target)


@register_cpu_schedule("matadd")
def matadd_cpu(b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    from tvm import te, tirx

    lanes = vector_lanes(target, 4)
    tile = _gemm_tile(lanes, n, m)
    nb = tile.nv * lanes
    mask = te.placeholder((b, k, m), "uint8", name="mask")
    v = te.placeholder((b, k, n), dtype, name="v")
    v_fn, packs = _column_tiles(v, nb, dtype, "vpack")
    neg_zero = tirx.const(-0.0, dtype)  # additive identity: lets LLVM emit masked adds
    out = _packed_gemm(
        (b, m, k, n),
        tile,
        lanes,
        lambda bi, i, r: mask[bi, r, i],
        v_fn,
        lambda bit, val: tirx.Select(bit != 0, val, neg_zero),
        "matadd",
    )
    return _schedule_gemm(te.create_prim_func([mask, v, out]), "matadd", packs, tile, lanes, (b, m, k, n))


def _matshift_tile(lanes: int) -> tuple[int, int]:
    """(rows, columns) of matshift's register tile: two vectors of rows x 8 columns (16 accumulators;
    6 columns, 12 accumulators, with 16 AVX2 registers)."""
    return 2 * lanes, 8 if lanes >= 16 else 6


@register_cpu_schedule("matshift")
def matshift_cpu(b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """Rows in vector lanes, weights as scalars; see the module doc for the ``xpm`` table."""
    from tvm import s_tir, te, tirx

    lanes = vector_lanes(target, 4)
    mt, nb = _matshift_tile(lanes)
    m_pad, n_pad = _ceil_div(m, mt) * mt, _ceil_div(n, nb) * nb
    zero, one = tirx.const(0, "int32"), tirx.const(1, "int32")
    x = te.placeholder((b, m, k), "int32", name="x")
    shift = te.placeholder((n, k), "int8", name="shift")
    sign = te.placeholder((n, k), "int8", name="sign")

    def xpm_body(bi, r, src, i):  # src 0: x, 1: ~x, 2 and 3: 0; rows past m are 0
        v = x[bi, tirx.min(i, m - 1), r]
        return tirx.if_then_else(i < m, tirx.Select(src == 0, v, tirx.Select(src == 1, ~v, zero)), zero)

    xpm = te.compute((b, k, 4, m_pad), xpm_body, name="xpm")

    def src_body(jo, r, ji):  # which xpm row a weight reads; padded columns read zeros
        j = jo * nb + ji
        sg = sign[tirx.min(j, n - 1), r]
        row = tirx.Select(sg > 0, zero, tirx.Select(sg < 0, one, tirx.const(2, "int32")))
        return tirx.if_then_else(j < n, row, tirx.const(2, "int32"))

    wsrc = te.compute((n_pad // nb, k, nb), src_body, name="wsrc")
    wsh = te.compute(
        (n_pad // nb, k, nb),
        lambda jo, r, ji: tirx.min(shift[tirx.min(jo * nb + ji, n - 1), r].astype("int32"), 31),
        name="wsh",
    )
    # shift_lanes[s, l] = s: reading the shift count as a vector (not a splat) makes LLVM emit a
    # per-lane shift (vpsravd, 1 uop) instead of a shift by xmm count (2 uops on AVX-512 cores).
    shift_lanes = te.compute((32, mt), lambda sv, lane: sv, name="shift_lanes")
    rc = te.reduce_axis((0, k), name="kc")
    j_c = lambda j: tirx.min(j, n - 1)  # noqa: E731
    cneg = te.compute(
        (n_pad,),
        lambda j: te.sum(tirx.Select(tirx.all(j < n, sign[j_c(j), rc] < 0), one, zero), axis=rc),
        name="cneg",
    )
    # Reduction slot 0 adds cneg[j] (the +1 of each negated term); slots 1..k the shifted rows.
    # TE ignores a reduction's init value, hence the extra slot, peeled off by loop_partition.
    r = te.reduce_axis((0, k + 1), name="k")

    def acc_body(bi, j, i):
        rr = tirx.max(r - 1, 0)
        row = wsrc[j // nb, rr, j % nb] & 3  # the mask bounds the data-dependent index for compute_at
        term = xpm[bi, rr, row, i] >> shift_lanes[wsh[j // nb, rr, j % nb], i % mt]
        return te.sum(tirx.Select(r == 0, cneg[j], term), axis=r)

    acc = te.compute((b, n_pad, m_pad), acc_body, name="acc")
    out = te.compute((b, m, n), lambda bi, i, j: acc[bi, j, i], name="matshift")
    func = te.create_prim_func([x, shift, sign, out])

    sch = s_tir.Schedule(func)
    a_blk = sch.get_sblock("acc")
    bl, jl, il, rl = sch.get_loops(a_blk)
    io, ii = sch.split(il, [None, mt])
    jo, ji = sch.split(jl, [None, nb])
    sch.reorder(bl, io, jo, rl, ji, ii)
    sch.set_scope(a_blk, 0, "local")
    o_blk = sch.get_sblock("matshift")
    sch.reverse_compute_at(o_blk, jo)
    sch.unroll(sch.get_loops(o_blk)[-1])
    sch.compute_at(sch.get_sblock("xpm"), io)
    sch.vectorize(sch.get_loops(sch.get_sblock("xpm"))[-1])
    sch.unroll(ji)
    sch.vectorize(ii)
    sch.parallel(sch.fuse(bl, io))
    sch.decompose_reduction(a_blk, rl)
    sch.loop_partition(rl, [1, None])
    for name in ("wsrc", "wsh", "shift_lanes"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(loops[0])
        sch.vectorize(loops[-1])
    sch.parallel(sch.get_loops(sch.get_sblock("cneg"))[0])
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------------
# The work a kernel really does


def _tiling(name: str, b: int, m: int, k: int, n: int, lanes: int) -> tuple[int, int, int, int, int]:
    """``(b, m_pad, k, n_pad, steps)`` of the CPU kernel of ``name``: :func:`tiled_shape` and :func:`tile_steps`
    from one tile choice."""
    if name == "matshift":
        mt, nb = _matshift_tile(lanes)
    else:
        tile = _gemm_tile(lanes, n, m)
        mt, nb = tile.mr, tile.nv * lanes
    m_pad, n_pad = _ceil_div(m, mt) * mt, _ceil_div(n, nb) * nb
    # matshift steps once per row tile, k and column; the GEMMs once per row, k and column tile
    steps = b * (m_pad // mt) * k * n_pad if name == "matshift" else b * m_pad * k * (n_pad // nb)
    return b, m_pad, k, n_pad, steps


def tiled_shape(name: str, b: int, m: int, k: int, n: int, lanes: int) -> tuple[int, int, int, int]:
    """``(b, m_pad, k, n_pad)``: the shape the CPU kernel of ``name`` computes with ``lanes``-wide vectors.

    Every kernel here reduces over whole register tiles (rows and columns padded up to the tile), so its
    time follows the padded work, not ``b·m·k·n``: e.g. 24x49x58x24 ``bmm`` pads n=24 to 32 and does a
    third more work than it returns. The cost model's regression uses this (``dse.cost.regression``).
    """
    return _tiling(name, b, m, k, n, lanes)[:4]


def tile_steps(name: str, b: int, m: int, k: int, n: int, lanes: int) -> int:
    """Iterations of the kernel's innermost tile step: per row, ``k`` and column tile for the GEMMs (each
    broadcasts one ``x`` value, or for ``matadd`` loads and tests one mask byte, then updates NB columns),
    per row tile, ``k`` and column for ``matshift`` (one scalar weight on a vector of rows). Their cost is
    what makes narrow tiles dearer than their MACs say: ``matadd`` at n=33 (16-wide tiles) runs ~60
    GMAC/s, at n=64 ~85 on this project's machine."""
    return _tiling(name, b, m, k, n, lanes)[4]


TileFn = Callable[[str, int, int, int, int], tuple[int, int, int, int, int]]


def tile_padding(target: tvm.target.Target) -> TileFn | None:
    """``(name, b, m, k, n) -> (b, m_pad, k, n_pad, steps)`` for the kernels compiled for CPU ``target``
    (:func:`tiled_shape`, :func:`tile_steps`; other names pass through with 0 steps); None for other
    targets (their schedules are tuned)."""
    if target.kind.name != "llvm":
        return None
    lanes = vector_lanes(target, 4)

    def pad(name: str, b: int, m: int, k: int, n: int) -> tuple[int, int, int, int, int]:
        return _tiling(name, b, m, k, n, lanes) if name in CPU_SCHEDULES else (b, m, k, n, 0)

    return pad


# ---------------------------------------------------------------------------------------------------
# Pre-packed GEMMs: the weight packing as its own PrimFunc, run once on constant weights


PREPACKABLE = ("matmul", "matshift_decode")


@dataclasses.dataclass(frozen=True)
class PrepackedGemm:
    """A CPU ``matmul``/``matshift_decode`` split in two: ``pack`` turns the weights (``w[n, k]``, or the
    int8 ``shift``/``sign`` pair, decoded) into ``wp[n/NB, k, NB]``, and ``gemm`` is the register-blocked
    GEMM of ``x[b, m, k]`` with ``wp``. The exporter computes ``pack`` once, when the model loads
    (``relax.transform.LiftTransformParams``), so a forward runs only ``gemm``; both kernels in one function
    re-pack the weights on every call, which measured 15-25% of the call for the embedded model's layers
    (e.g. 127 vs 96 us for 520x384x96 on 2 cores). Same arithmetic: packing only moves (and decodes,
    exactly) the weights."""

    pack: tvm.tirx.PrimFunc
    gemm: tvm.tirx.PrimFunc
    packed_shape: tuple[int, int, int]


def prepacked_gemm(name: str, b: int, m: int, k: int, n: int, target: tvm.target.Target) -> PrepackedGemm:
    """The two PrimFuncs of :class:`PrepackedGemm` for ``name`` at ``(b, m, k, n)`` (float32, CPU)."""
    from tvm import s_tir, te

    if name not in PREPACKABLE:
        raise ValueError(f"{name} has no pre-packed form; one of {', '.join(PREPACKABLE)}")
    lanes = vector_lanes(target, 4)
    tile = _gemm_tile(lanes, n, m)
    nb = tile.nv * lanes
    packed_shape = (_ceil_div(n, nb), k, nb)
    weights, wp = _weight_pack(name, n, k, nb, "float32")
    sch = s_tir.Schedule(te.create_prim_func([*weights, wp]))
    loops = sch.get_loops(sch.get_sblock("wpack"))
    sch.parallel(loops[0])
    sch.vectorize(loops[-1])
    pack = sch.mod["main"]

    x = te.placeholder((b, m, k), "float32", name="x")
    wp_in = te.placeholder(packed_shape, "float32", name="wp")
    out = _packed_gemm((b, m, k, n), tile, lanes, lambda bi, i, r: x[bi, i, r], lambda bi, jo, r, ji: wp_in[jo, r, ji],
                       _mac, name)
    gemm = _schedule_gemm(te.create_prim_func([x, wp_in, out]), name, [], tile, lanes, (b, m, k, n))
    return PrepackedGemm(pack, gemm, packed_shape)
