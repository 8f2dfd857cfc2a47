"""Layer inventory: every Linear, attention product and piece of non-primitive work a model runs, with
the kernel shape ``(b, m, k, n)`` of each call at a given input size and batch.

Token counts come from one forward pass of a zero batch with hooks, not from a formula, so whatever
the model really does (class and distillation tokens, PVT stages and their spatial reduction) is
what the inventory lists.

Shape convention (the profile's and the cost model's): a Linear on ``[B, N, C_in] -> C_out`` is ``(b=1, m=B·N, k=C_in,
n=C_out)``. Attention products batch over heads, ``b = B·H`` (H heads of width d, N queries, Nk keys,
``nb`` Hamming bits), and both choices are listed because the search picks between them:

============  ==========  ==========================  =======================================
choice        product     (b, m, k, n)                operands
============  ==========  ==========================  =======================================
msa           scores      bmm (B·H, N, d, Nk)         q[b, N, d], kᵀ[b, d, Nk]
msa           context     bmm (B·H, N, Nk, d)         attn[b, N, Nk], v[b, Nk, d]
hamming       kv          matadd (B·H, 2nb, Nk, d+1)  mask c_ext(K)[b, Nk, 2nb], v [V, 1][b, Nk, d+1]
hamming       qkv_out     matadd (B·H, N, 2nb, d+1)   mask c_ext(Q)ᵀ[b, 2nb, N], v KV[b, 2nb, d+1]
============  ==========  ==========================  =======================================

(models/hamming.py: each code is used with its complement, 2·nb columns, and a ones column is
appended to V so that the normaliser comes out of the same two products.)

Eager PyTorch does not always run what the compiled model runs: timm's ``Attention`` with ``fused_attn`` set
(the default on PyTorch 2) computes msa as one ``F.scaled_dot_product_attention``, which on CPU never stores
the N×Nk scores. For such an attention the msa products and softmax are marked ``backend="tvm"`` and an
``sdpa`` item (:mod:`dse.profiling.nonprim`) marked ``backend="torch"`` stands for them in eager PyTorch.

Non-primitive work (norms, GELU, softmax, residual adds, head reshapes, hashing, MoE router and
dispatch, patch embedding, head) is listed per occurrence with the op names and shapes of
:mod:`dse.profiling.nonprim`. Each :class:`WorkItem` says which assignment layer and choice it belongs to
(``layer``/``choice``; ``choice=None`` means it runs whatever the assignment), so a cost model can
add up exactly the work of one assignment. One ``framework`` item stands for eager PyTorch's own time
in the forward (:mod:`dse.profiling.eager`), which only the PyTorch baseline pays.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import models
from dse.checkpoints import build_dense
from dse.errors import ModelError
from dse.profiling import eager
from dse.profiling.store import BACKENDS
from models.assignment import layer_kinds

log = logging.getLogger(__name__)

LINEAR_PRIMITIVES = ("matmul", "matshift", "matshift_decode")
# choice -> (product name, primitive), in execution order
ATTENTION_PRODUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "msa": (("scores", "bmm"), ("context", "bmm")),
    "hamming": (("kv", "matadd"), ("qkv_out", "matadd")),
}
# The PyTorch (dense) baseline of each primitive: what the dense model runs for that shape.
TORCH_BASELINE = {"matmul": "matmul", "matshift": "matmul", "matshift_decode": "matmul", "bmm": "bmm",
                  "matadd": "matadd"}
KINDS = ("linear", "product", "nonprim", "framework")
_SKIPPED_LEAVES = ("Dropout", "Identity", "DropPath")


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One call of the model at the inventory's batch.

    ``kind``: ``linear`` (a decision Linear: its primitive depends on the choice), ``product`` (an
    attention product of one attention choice), ``nonprim`` (an op of :mod:`dse.profiling.nonprim`), ``framework``
    (eager PyTorch's own time in a forward, :mod:`dse.profiling.eager`; priced on the torch backend only).
    ``op``: ``linear``; the product name (``scores`` ...); or the non-primitive op name.
    ``primitives``: the profile primitives that can implement it.
    ``layer``/``choice``: the assignment layer whose choice decides whether this runs, and the choice it
    runs under (``None``: always). ``block``: ``blocks.3`` / ``stages.1.blocks.0``, None for model-level
    work (patch embedding, final norm, head). ``backend``: the only backend that runs it (``tvm``: the compiled
    model, ``torch``: eager PyTorch), ``None`` for both.
    """

    name: str
    kind: str
    op: str
    primitives: tuple[str, ...]
    b: int
    m: int
    k: int
    n: int
    layer: str | None = None
    choice: str | None = None
    block: str | None = None
    backend: str | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.m, self.k, self.n)

    @property
    def backends(self) -> tuple[str, ...]:
        return BACKENDS if self.backend is None else (self.backend,)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["primitives"] = list(self.primitives)
        return d


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
    """What the attention of one layer looks like at this input size."""

    name: str
    heads: int
    head_dim: int
    tokens: int  # queries per image
    key_tokens: int  # keys per image (fewer than tokens under PVT's spatial reduction)
    nbits: int
    fused: bool = False  # eager PyTorch runs msa as one F.scaled_dot_product_attention (timm's fused_attn)


@dataclasses.dataclass(frozen=True)
class ShapeGroup:
    """One unique ``(primitive, b, m, k, n)`` and the work items that run at it."""

    primitive: str
    kind: str
    b: int
    m: int
    k: int
    n: int
    names: tuple[str, ...]
    choices: tuple[str, ...]  # the choices under which any of them runs ("" for always)
    backends: tuple[str, ...] = BACKENDS  # the backends on which any of them runs

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.m, self.k, self.n)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["names"], d["choices"], d["backends"] = list(self.names), list(self.choices), list(self.backends)
        return d


@dataclasses.dataclass
class Inventory:
    model: str
    input_size: tuple[int, int, int]  # (C, H, W) of one image
    batch: int
    nbits: int
    items: list[WorkItem]
    attention: dict[str, AttentionInfo]
    # runs the model on an empty batch (dse.profiling.eager): how the profiler times the ``framework`` item
    eager_probe: Callable[[], Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def of_kind(self, kind: str) -> list[WorkItem]:
        return [it for it in self.items if it.kind == kind]

    def linears(self) -> list[WorkItem]:
        return self.of_kind("linear")

    def products(self, choice: str | None = None) -> list[WorkItem]:
        return [it for it in self.of_kind("product") if choice is None or it.choice == choice]

    def nonprim(self) -> list[WorkItem]:
        return self.of_kind("nonprim")

    def shape_groups(self, kinds: Iterable[str] = KINDS) -> list[ShapeGroup]:
        """Unique ``(primitive, b, m, k, n)`` over the items of ``kinds``, first-seen order."""
        kinds = tuple(kinds)
        groups: dict[tuple, list[WorkItem]] = defaultdict(list)
        for it in self.items:
            if it.kind in kinds:
                for prim in it.primitives:
                    groups[(prim, it.kind, *it.shape)].append(it)
        out = []
        for (prim, kind, b, m, k, n), members in groups.items():
            choices = tuple(dict.fromkeys(it.choice or "" for it in members))
            backends = tuple(bk for bk in BACKENDS if any(bk in it.backends for it in members))
            out.append(ShapeGroup(prim, kind, b, m, k, n, tuple(it.name for it in members), choices, backends))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "batch": self.batch,
            "nbits": self.nbits,
            "attention": {k: dataclasses.asdict(v) for k, v in self.attention.items()},
            "items": [it.as_dict() for it in self.items],
            "shapes": [g.as_dict() for g in self.shape_groups()],
        }


# ---------------------------------------------------------------------------------------------------
# building


@dataclasses.dataclass
class _Seen:
    order: int  # when the module's first call started (a counter over all call starts and ends)
    end: int = -1  # when it returned
    inp: tuple[int, ...] | None = None
    out: tuple[int, ...] | None = None


def _trace(model: nn.Module, batch: int, input_size: tuple[int, int, int]) -> dict[str, _Seen]:
    """Input/output shapes of every module's first call on a zero batch, and when it started and ended."""
    seen: dict[str, _Seen] = {}
    handles = []
    clock = iter(range(1 << 62))

    def shape_of(value: Any) -> tuple[int, ...] | None:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
            return tuple(value[0].shape)
        return None

    def pre_hook(name: str):
        def fn(module, args):
            if name not in seen:
                seen[name] = _Seen(next(clock), inp=shape_of(args[0]) if args else None)
        return fn

    def hook(name: str):
        def fn(module, args, output):
            rec = seen[name]
            if rec.end < 0:
                rec.end, rec.out = next(clock), shape_of(output)
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            model(torch.zeros(batch, *input_size, device=device))
    except Exception as exc:
        raise ModelError(f"a forward pass of {type(model).__name__} on a zero batch of {batch}x"
                         f"{'x'.join(map(str, input_size))} failed ({type(exc).__name__}: {exc}); "
                         "check the model's input size") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def _block_of(name: str) -> str | None:
    """The transformer block a module belongs to (``blocks.3``, ``stages.1.blocks.0``), if any."""
    match = re.match(r"^((?:stages\.\d+\.)?blocks\.\d+)(?:\.|$)", name)
    return match.group(1) if match else None


class _InventoryBuilder:
    """Collects the work items of one traced model, each with its call order; one method per kind of work."""

    def __init__(self, model: nn.Module, kinds: dict[str, str], seen: dict[str, _Seen], nbits: int):
        self.model = model
        self.kinds = kinds
        self.seen = seen
        self.nbits = nbits
        self.modules = dict(model.named_modules())
        self.items: list[tuple[float, WorkItem]] = []  # (call order, item)
        self.attention: dict[str, AttentionInfo] = {}

    def add(self, order: float, **kw: Any) -> None:
        self.items.append((order, WorkItem(**kw)))

    def need(self, name: str) -> _Seen:
        rec = self.seen.get(name)
        if rec is None or rec.inp is None:
            raise ModelError(f"layer '{name}' did not run in a forward pass; cannot size it")
        return rec

    def ordered(self) -> list[WorkItem]:
        return [it for _, it in sorted(self.items, key=lambda pair: pair[0])]

    def add_linears(self) -> None:
        """Decision Linears, with their bias and the extra work of their shift and MoE forms."""
        for lname, kind in self.kinds.items():
            if kind != "linear":
                continue
            rec, mod = self.need(lname), self.modules[lname]
            m, k, n = _rows(rec.inp), int(mod.in_features), int(mod.out_features)
            blk, o = _block_of(lname), rec.order
            add = self.add
            add(o, name=lname, kind="linear", op="linear", primitives=LINEAR_PRIMITIVES, b=1, m=m, k=k, n=n,
                layer=lname, block=blk)
            bias = getattr(mod, "bias", None)
            if bias is None and hasattr(mod, "mult"):  # MoELinear
                bias = getattr(mod.mult, "bias", None)
            if bias is not None:
                add(o + 0.1, name=f"{lname}.bias", kind="nonprim", op="bias", primitives=("bias",), b=1, m=m, k=n,
                    n=n, layer=lname, block=blk)
            add(o + 0.2, name=f"{lname}.requant", kind="nonprim", op="requant", primitives=("requant",), b=1, m=m,
                k=k, n=n, layer=lname, choice="shift", block=blk)
            add(o + 0.3, name=f"{lname}.quantize", kind="nonprim", op="quantize", primitives=("quantize",), b=1,
                m=m, k=k, n=k, layer=lname, choice="shift", block=blk)
            add(o - 0.2, name=f"{lname}.router", kind="nonprim", op="router", primitives=("router",), b=1, m=m,
                k=k, n=2, layer=lname, choice="moe", block=blk)
            add(o - 0.1, name=f"{lname}.dispatch", kind="nonprim", op="dispatch", primitives=("dispatch",), b=1,
                m=m, k=k, n=n, layer=lname, choice="moe", block=blk)

    def add_attentions(self) -> None:
        """Attention: the products of both choices and the work around them."""
        for aname, kind in self.kinds.items():
            if kind == "attention":
                self._add_attention(aname)

    def _add_attention(self, aname: str) -> None:
        rec, mod = self.need(aname), self.modules[aname]
        B, N = int(rec.inp[0]), int(rec.inp[1])
        H, d = int(mod.num_heads), int(mod.head_dim)
        kv = self.seen.get(f"{aname}.kv")
        Nk = int(kv.inp[1]) if kv is not None and kv.inp is not None and "kv" in self.modules[aname]._modules else N
        # timm's Attention (ViT and PVT) in eager PyTorch; a Hamming attention keeps the flag of the one it replaced
        fused = bool(getattr(mod, "fused_attn", getattr(mod, "msa_fused_attn", False)))
        self.attention[aname] = AttentionInfo(aname, H, d, N, Nk, self.nbits, fused)
        msa_backend = "tvm" if fused else None  # fused: eager PyTorch runs the sdpa item below instead
        blk, BH, c2 = _block_of(aname), B * H, 2 * self.nbits
        # the attention core runs between the input projections and the output projection
        proj = self.seen.get(f"{aname}.proj")
        o = (proj.order if proj is not None else rec.end) - 1.0
        products = {
            "scores": (BH, N, d, Nk), "context": (BH, N, Nk, d),
            "kv": (BH, c2, Nk, d + 1), "qkv_out": (BH, N, c2, d + 1),
        }
        for choice, prods in ATTENTION_PRODUCTS.items():
            for i, (pname, prim) in enumerate(prods):
                b, m, k, n = products[pname]
                at = o + (0.3 if choice == "msa" else 0.2) + 0.02 * i
                self.add(at, name=f"{aname}.{pname}", kind="product", op=pname, primitives=(prim,),
                         b=b, m=m, k=k, n=n, layer=aname, choice=choice, block=blk,
                         backend=msa_backend if choice == "msa" else None)

        def nonprim(suffix: str, op: str, shape: tuple[int, int, int, int], choice: str | None, at: float,
                    backend: str | None = None) -> None:
            self.add(at, name=f"{aname}.{suffix}", kind="nonprim", op=op, primitives=(op,), b=shape[0],
                     m=shape[1], k=shape[2], n=shape[3], layer=aname, choice=choice, block=blk, backend=backend)

        if "qkv" in mod._modules:  # ViT: one fused projection, [B, N, 3·H·d] -> 3 x [B, H, N, d]
            nonprim("split_heads", "split_heads", (B, N, 3 * H * d, 3 * H), None, o + 0.05)
        else:  # PVT: q from the tokens, k/v from the (spatially reduced) key tokens
            nonprim("split_heads_q", "split_heads", (B, N, H * d, H), None, o + 0.05)
            nonprim("split_heads_kv", "split_heads", (B, Nk, 2 * H * d, 2 * H), None, o + 0.06)
        nonprim("softmax", "softmax", (BH, N, Nk, Nk), "msa", o + 0.31, msa_backend)
        if fused:
            nonprim("sdpa", "sdpa", (BH, N, d, Nk), "msa", o + 0.3, "torch")
        nonprim("hash_q", "hash", (BH, N, d, c2), "hamming", o + 0.1)
        nonprim("hash_k", "hash", (BH, Nk, d, c2), "hamming", o + 0.11)
        nonprim("mix", "hamming_mix", (BH, N, d + 1, d), "hamming", o + 0.25)
        nonprim("merge_heads", "merge_heads", (B, N, H * d, H), None, o + 0.7)

    def add_residuals(self) -> None:
        """Residual adds: two per transformer block, at the block's token shape."""
        blocks = dict.fromkeys(b for b in (_block_of(a) for a, kd in self.kinds.items() if kd == "attention") if b)
        for blk in blocks:
            rec = self.need(blk)
            m, c = _rows(rec.inp), int(rec.inp[-1])
            after_attn = self.seen[f"{blk}.attn"].end if f"{blk}.attn" in self.seen else rec.end
            for i, at in ((1, after_attn + 0.5), (2, rec.end - 0.5)):
                self.add(at, name=f"{blk}.residual{i}", kind="nonprim", op="residual", primitives=("residual",),
                         b=1, m=m, k=c, n=c, block=blk)

    def add_pos_embed(self) -> None:
        """The position embedding, added to the tokens the first block sees."""
        if isinstance(getattr(self.model, "pos_embed", None), nn.Parameter) and "blocks.0" in self.seen:
            rec = self.need("blocks.0")
            self.add(rec.order - 0.5, name="pos_embed", kind="nonprim", op="pos_embed", primitives=("pos_embed",),
                     b=int(rec.inp[0]), m=int(rec.inp[1]), k=int(rec.inp[2]), n=int(rec.inp[2]))

    def add_leaves(self) -> None:
        """The remaining leaves: norms, activations, convs, the head."""
        linear_names = [n for n, kd in self.kinds.items() if kd == "linear"]
        unknown: set[str] = set()
        for lname, rec in self.seen.items():
            mod = self.modules[lname]
            inside_linear = any(lname.startswith(f"{ln}.") for ln in linear_names)  # experts, router of a MoE
            if mod._modules or lname in self.kinds or inside_linear or rec.inp is None:
                continue
            if not self._add_leaf(lname, mod, rec):
                tname = type(mod).__name__
                if not any(s in tname for s in _SKIPPED_LEAVES):
                    unknown.add(tname)
        if unknown:
            log.info("not profiled (no non-primitive op for them): %s", ", ".join(sorted(unknown)))

    def _add_leaf(self, lname: str, mod: nn.Module, rec: _Seen) -> bool:
        """Add the work item of one leaf module; False for a module no non-primitive op describes."""
        blk = _block_of(lname)
        if isinstance(mod, nn.LayerNorm):
            c = int(rec.inp[-1])
            self.add(rec.order, name=lname, kind="nonprim", op="layernorm", primitives=("layernorm",), b=1,
                     m=_rows(rec.inp), k=c, n=c, block=blk)
        elif isinstance(mod, nn.GELU):
            c = int(rec.inp[-1])
            self.add(rec.order, name=lname, kind="nonprim", op="gelu", primitives=("gelu",), b=1, m=_rows(rec.inp),
                     k=c, n=c, block=blk)
        elif isinstance(mod, nn.Conv2d) and rec.out is not None:
            kh, kw = mod.kernel_size
            cin, cout = int(mod.in_channels), int(mod.out_channels)
            B, _, ho, wo = rec.out
            if mod.groups == cin and cin == cout and cin > 1:
                self.add(rec.order, name=lname, kind="nonprim", op="dwconv", primitives=("dwconv",), b=int(B),
                         m=int(rec.inp[2] * rec.inp[3]), k=cin, n=kh * kw, block=blk)
            else:
                op = "embed" if ("patch_embed" in lname or "downsample" in lname) else "conv"
                self.add(rec.order, name=lname, kind="nonprim", op=op, primitives=(op,), b=1, m=int(B * ho * wo),
                         k=cin // mod.groups * kh * kw, n=cout, block=blk)
        elif isinstance(mod, nn.Linear):
            self.add(rec.order, name=lname, kind="nonprim", op="head", primitives=("head",), b=1,
                     m=_rows(rec.inp), k=int(mod.in_features), n=int(mod.out_features), block=blk)
        else:
            return False
        return True

    def add_framework(self, input_size: tuple[int, int, int], name: str | None) -> Any:
        """The eager framework item (PyTorch's own time in the forward); returns the empty-batch probe, or
        None for a model whose forward rejects an empty batch (then priced without its eager overhead)."""
        probe = eager.empty_batch_forward(self.model, input_size)
        try:
            calls = eager.count_module_calls(self.model, probe)
        except Exception as exc:  # a model that cannot run an empty batch: priced without its eager overhead
            log.info("no eager framework row for %s (its forward rejects an empty batch: %s)",
                     name or type(self.model).__name__, exc)
            return None
        self.add(math.inf, name=eager.FRAMEWORK, kind="framework", op=eager.FRAMEWORK,
                 primitives=(eager.FRAMEWORK,), b=1, m=calls, k=1, n=1)
        return probe


def build_inventory(model: nn.Module, *, batch: int, input_size: tuple[int, int, int] | None = None,
                    nbits: int = 16, name: str | None = None) -> Inventory:
    """The inventory of ``model`` (a timm ViT/DeiT or PVTv2, dense or reparameterised) for ``batch``
    images of ``input_size`` (default: what the model was built for), Hamming codes of ``nbits``."""
    if batch < 1:
        raise ModelError(f"batch must be >= 1, got {batch}")
    if nbits < 1:
        raise ModelError(f"nbits must be >= 1, got {nbits}")
    kinds = layer_kinds(model)
    input_size = tuple(int(v) for v in (input_size or models.input_size(model)))
    builder = _InventoryBuilder(model, kinds, _trace(model, batch, input_size), nbits)
    builder.add_linears()
    builder.add_attentions()
    builder.add_residuals()
    builder.add_pos_embed()
    builder.add_leaves()
    probe = builder.add_framework(input_size, name)
    return Inventory(name or type(model).__name__, input_size, batch, nbits, builder.ordered(), builder.attention,
                     probe)


def inventory_for_config(cfg: Any, *, batch: int | None = None, nbits: int | None = None) -> Inventory:
    """The inventory of the config's dense model (``dse.training.pretrain.build_dense``) at ``cfg.profile.batch``."""
    model = build_dense(cfg)
    return build_inventory(model, batch=batch or cfg.profile.batch, nbits=nbits or cfg.finetune.nbits,
                           name=cfg.model.name)


# ---------------------------------------------------------------------------------------------------
# presentation


def compact_names(names: Iterable[str]) -> str:
    """``blocks.0.attn.qkv, blocks.1.attn.qkv, ...`` -> ``blocks.{0-3}.attn.qkv`` (per template)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    plain: list[str] = []
    for name in names:
        parts = name.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        if not idx:
            plain.append(name)
            continue
        i = idx[-1]
        groups[(".".join(parts[:i]), ".".join(parts[i + 1:]))].append(int(parts[i]))
    out = list(dict.fromkeys(plain))
    for (head, tail), nums in groups.items():
        nums = sorted(set(nums))
        if len(nums) == 1:
            text = str(nums[0])
        elif nums == list(range(nums[0], nums[-1] + 1)):
            text = f"{{{nums[0]}-{nums[-1]}}}"
        else:
            text = "{" + ",".join(map(str, nums)) + "}"
        out.append(".".join(p for p in (head, text, tail) if p))
    return ", ".join(out)
