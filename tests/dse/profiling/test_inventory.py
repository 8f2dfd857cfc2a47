"""Layer inventory: shapes against hand arithmetic for vit_digits, tiny DeiTs and a PVTv2."""

from __future__ import annotations

import json

import pytest

import models
from dse.profiling.inventory import (
    ATTENTION_PRODUCTS,
    LINEAR_PRIMITIVES,
    build_inventory,
    compact_names,
)
from dse.profiling.nonprim import check_shape
from models.ops import kernel_ops


def _by_name(inv):
    return {(it.name, it.kind): it for it in inv.items}


def test_vit_digits_shapes_match_hand_computed():
    # 32x32 input, 4x4 patches -> 64 patches + 1 class token = 65 tokens; dim 96, 3 heads of 32, MLP 384.
    inv = build_inventory(models.create("vit_digits"), batch=8, name="vit_digits")
    B, N, C, H, d, nb = 8, 65, 96, 3, 32, 16
    T = B * N
    assert inv.input_size == (3, 32, 32)
    items = _by_name(inv)
    expected_linears = {"attn.qkv": (1, T, C, 3 * C), "attn.proj": (1, T, C, C), "mlp.fc1": (1, T, C, 4 * C),
                        "mlp.fc2": (1, T, 4 * C, C)}
    for i in range(4):
        for suffix, shape in expected_linears.items():
            it = items[(f"blocks.{i}.{suffix}", "linear")]
            assert it.shape == shape
            assert it.primitives == LINEAR_PRIMITIVES
        products = {"scores": (B * H, N, d, N), "context": (B * H, N, N, d),
                    "kv": (B * H, 2 * nb, N, d + 1), "qkv_out": (B * H, N, 2 * nb, d + 1)}
        for pname, shape in products.items():
            it = items[(f"blocks.{i}.attn.{pname}", "product")]
            assert it.shape == shape, pname
            assert it.layer == f"blocks.{i}.attn"
        assert items[(f"blocks.{i}.attn.scores", "product")].choice == "msa"
        assert items[(f"blocks.{i}.attn.kv", "product")].primitives == ("matadd",)
        assert items[(f"blocks.{i}.attn.softmax", "nonprim")].shape == (B * H, N, N, N)
        assert items[(f"blocks.{i}.attn.hash_k", "nonprim")].shape == (B * H, N, d, 2 * nb)
        assert items[(f"blocks.{i}.mlp.act", "nonprim")].shape == (1, T, 4 * C, 4 * C)
        assert items[(f"blocks.{i}.mlp.fc1.router", "nonprim")].shape == (1, T, C, 2)
        assert items[(f"blocks.{i}.mlp.fc1.router", "nonprim")].choice == "moe"
        assert items[(f"blocks.{i}.attn.qkv.requant", "nonprim")].choice == "shift"
        assert items[(f"blocks.{i}.residual2", "nonprim")].shape == (1, T, C, C)
    assert len(inv.linears()) == 16
    assert len(inv.products("msa")) == len(inv.products("hamming")) == 8
    assert items[("patch_embed.proj", "nonprim")].shape == (1, B * 64, 3 * 4 * 4, C)
    assert items[("head", "nonprim")].shape == (1, B, C, 10)
    assert items[("norm", "nonprim")].shape == (1, T, C, C)
    # four unique Linear shapes x three primitives, four unique attention products
    groups = inv.shape_groups(("linear", "product"))
    assert len([g for g in groups if g.kind == "linear"]) == 12
    assert {(g.primitive, g.shape) for g in groups if g.kind == "product"} == {
        ("bmm", (24, 65, 32, 65)), ("bmm", (24, 65, 65, 32)), ("matadd", (24, 32, 65, 33)),
        ("matadd", (24, 65, 32, 33))}
    qkv = next(g for g in groups if g.primitive == "matmul" and g.shape == (1, T, C, 3 * C))
    assert qkv.names == tuple(f"blocks.{i}.attn.qkv" for i in range(4))
    for it in inv.nonprim():  # every non-primitive shape is valid for its op
        check_shape(it.op, it.shape)


@pytest.mark.parametrize("name, prefix", [("deit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_tiny_deit_tokens_come_from_the_forward_pass(name, prefix):
    model = models.create(name, img_size=64, depth=2, num_classes=10)
    inv = build_inventory(model, batch=2)
    B, C, H, d = 2, 192, 3, 64
    N = (64 // 16) ** 2 + prefix  # class (and distillation) tokens counted by the hooks
    items = _by_name(inv)
    assert inv.input_size == (3, 64, 64)
    assert items[("blocks.1.attn.qkv", "linear")].shape == (1, B * N, C, 3 * C)
    assert items[("blocks.0.mlp.fc2", "linear")].shape == (1, B * N, 4 * C, C)
    assert items[("blocks.0.attn.scores", "product")].shape == (B * H, N, d, N)
    assert items[("blocks.0.attn.context", "product")].shape == (B * H, N, N, d)
    assert items[("blocks.0.attn.qkv_out", "product")].shape == (B * H, N, 32, d + 1)
    assert items[("blocks.0.attn.split_heads", "nonprim")].shape == (B, N, 3 * C, 3 * H)
    heads = [it for it in inv.nonprim() if it.op == "head"]
    assert len(heads) == prefix  # the distilled model has head and head_dist
    assert inv.attention["blocks.0.attn"].tokens == N


def test_pvt_v2_stages_and_spatial_reduction():
    inv = build_inventory(models.create("pvt_v2_b0", num_classes=10), batch=2, input_size=(3, 64, 64))
    items = _by_name(inv)
    # stage s: 64/4/2^s tokens per side; keys reduced by sr = 8, 4, 2, 1 -> 2x2 keys everywhere
    side = {0: 16, 1: 8, 2: 4, 3: 2}
    dims, heads = {0: 32, 1: 64, 2: 160, 3: 256}, {0: 1, 1: 2, 2: 5, 3: 8}
    mlp_ratio = {0: 8, 1: 8, 2: 4, 3: 4}  # timm pvt_v2_b0
    for s in range(4):
        N, C, H = side[s] ** 2, dims[s], heads[s]
        d = C // H
        attn = f"stages.{s}.blocks.0.attn"
        assert inv.attention[attn].tokens == N
        assert inv.attention[attn].key_tokens == 4
        assert items[(f"{attn}.q", "linear")].shape == (1, 2 * N, C, C)
        assert items[(f"{attn}.kv", "linear")].shape == (1, 2 * 4, C, 2 * C)
        assert items[(f"{attn}.scores", "product")].shape == (2 * H, N, d, 4)
        assert items[(f"{attn}.sdpa", "nonprim")].shape == (2 * H, N, d, 4)  # timm's PVT attention is fused too
        assert items[(f"{attn}.kv", "product")].shape == (2 * H, 32, 4, d + 1)
        assert items[(f"stages.{s}.blocks.0.mlp.dwconv", "nonprim")].shape == (2, N, mlp_ratio[s] * C, 9)
    assert items[("stages.0.blocks.0.attn.sr", "nonprim")].shape == (1, 2 * 4, 32 * 8 * 8, 32)
    assert items[("patch_embed.proj", "nonprim")].shape == (1, 2 * 256, 3 * 7 * 7, 32)


def test_reparameterised_model_has_the_same_inventory():
    dense = models.create("vit_digits", depth=2)
    sam = models.reparameterize(dense, models.Assignment.uniform(dense, attention="hamming", linear="moe"))
    a = build_inventory(dense, batch=2)
    with kernel_ops("off"):  # PyTorch references: sizing needs no compiled kernels
        b = build_inventory(sam, batch=2)
    assert [(it.name, it.kind, it.shape, it.choice, it.backend) for it in a.items if it.kind != "framework"] == \
           [(it.name, it.kind, it.shape, it.choice, it.backend) for it in b.items if it.kind != "framework"]
    assert a.attention == b.attention  # a Hamming attention keeps the fused flag of the softmax one it replaced
    # eager overhead is the model's own: the MoE experts and gates are more modules to call
    assert a.of_kind("framework")[0].m < b.of_kind("framework")[0].m


def test_framework_item_counts_module_calls_and_probes_an_empty_batch():
    import torch

    model = models.create("vit_digits", depth=2)
    inv = build_inventory(model, batch=4)
    (item,) = inv.of_kind("framework")
    calls = []  # an independent count: forward hooks on a real batch
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()]
    with torch.no_grad():
        model(torch.randn(3, *inv.input_size))
    for h in handles:
        h.remove()
    assert (item.b, item.m, item.k, item.n, item.choice) == (1, len(calls), 1, 1, None)
    assert inv.eager_probe().shape == (0, 10)  # the same model, on no images


def test_fused_attention_runs_as_one_sdpa_in_eager_pytorch_only(unfused):
    """timm's Attention with ``fused_attn`` runs F.scaled_dot_product_attention: eager PyTorch's msa is one sdpa
    call, the compiled model's the two products and the softmax; with ``fused_attn`` off both run the latter."""
    B, N, H, d = 2, 65, 3, 32
    fused = build_inventory(models.create("vit_digits", depth=1), batch=B)
    msa = {it.op: (it.shape, it.backend) for it in fused.items if it.choice == "msa"}
    assert msa == {"scores": ((B * H, N, d, N), "tvm"), "context": ((B * H, N, N, d), "tvm"),
                   "softmax": ((B * H, N, N, N), "tvm"), "sdpa": ((B * H, N, d, N), "torch")}
    assert fused.attention["blocks.0.attn"].fused
    plain = build_inventory(unfused(models.create("vit_digits", depth=1)), batch=B)
    msa = {it.op: (it.shape, it.backend) for it in plain.items if it.choice == "msa"}
    assert msa == {"scores": ((B * H, N, d, N), None), "context": ((B * H, N, N, d), None),
                   "softmax": ((B * H, N, N, N), None)}
    assert not plain.attention["blocks.0.attn"].fused
    # the work both backends share is the same
    assert [it for it in fused.items if it.choice != "msa" and it.kind != "framework"] == \
           [it for it in plain.items if it.choice != "msa" and it.kind != "framework"]
    (group,) = [g for g in fused.shape_groups(("nonprim",)) if g.primitive == "sdpa"]
    assert group.backends == ("torch",)


def test_both_attention_choices_listed_and_json_round_trips():
    inv = build_inventory(models.create("vit_digits", depth=1), batch=1)
    for choice, prods in ATTENTION_PRODUCTS.items():
        assert [it.op for it in inv.products(choice)] == [p for p, _ in prods]
    data = json.loads(json.dumps(inv.to_dict()))
    assert data["batch"] == 1 and len(data["items"]) == len(inv.items)
    assert {tuple(s["names"]) for s in data["shapes"]} >= {("blocks.0.attn.qkv",)}


def test_infer_input_size_and_compact_names():
    assert models.input_size(models.create("vit_digits")) == (3, 32, 32)
    assert compact_names(["blocks.0.a", "blocks.1.a", "blocks.2.a", "norm"]) == "norm, blocks.{0-2}.a"
    assert compact_names(["blocks.0.a", "blocks.2.a"]) == "blocks.{0,2}.a"
