import copy

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import ModelError
from models.moe import (
    MoELinear,
    equilibrium_share,
    moe_balance_loss,
    moe_layers,
    reset_routing_stats,
    routing_shares,
)
from models.shift import ShiftLinear


def make(in_f=16, out_f=8, **kwargs):
    return MoELinear.from_linear(nn.Linear(in_f, out_f), layer_name="test.fc", **kwargs)


def routed(layer, x):
    """Independent top-1 routing: argmax of the router's softmax (ties to Mult)."""
    p = torch.softmax(x @ layer.router.weight.t() + layer.router.bias, dim=-1)
    return p, p[:, 0] >= p[:, 1]


@pytest.mark.parametrize("gate", ["straight_through", "prob"])
def test_output_is_the_gated_chosen_expert_and_router_gets_gradient(gate):
    layer = make(gate=gate)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1)  # a split with tokens on both experts
    x = torch.randn(64, 16)
    p, to_mult = routed(layer, x)
    assert 0 < int(to_mult.sum()) < 64
    chosen = torch.where(to_mult[:, None], layer.mult(x), layer.shift(x))
    g = torch.where(to_mult, p[:, 0], p[:, 1])[:, None]
    y = layer.train()(x)
    expected = chosen * g if gate == "prob" else chosen
    torch.testing.assert_close(y, expected)
    (y * torch.randn_like(y)).sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.mult.weight.grad.abs().sum() > 0 and layer.shift.weight.grad.abs().sum() > 0


def test_experts_start_from_the_dense_weights():
    dense = nn.Linear(16, 8)
    layer = MoELinear.from_linear(dense)
    assert torch.equal(layer.mult.weight, dense.weight) and torch.equal(layer.mult.bias, dense.bias)
    assert torch.equal(layer.shift.quantized_weight(), ShiftLinear.from_linear(dense).quantized_weight())


def test_balance_loss_formula():
    layer = make()
    layer.set_expert_costs(mult=3.0, shift=1.0)
    x = torch.randn(50, 16)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1)
    layer.train()(x)
    p, to_mult = routed(layer, x)
    c = np.array([3.0, 1.0])
    imp = c * p.detach().sum(0).numpy()
    load = c * np.array([to_mult.sum().item(), (~to_mult).sum().item()])
    expected = imp.var(ddof=1) / imp.mean() ** 2 + load.var(ddof=1) / load.mean() ** 2
    assert layer.balance_loss().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("costs", "share"), [((3.0, 1.0), 0.25), ((1.0, 1.0), 0.5), ((1.0, 3.0), 0.75)])
def test_balance_loss_alone_splits_tokens_in_inverse_cost_ratio(costs, share):
    """Tolerance: the Mult share ends within 0.05 of c_shift / (c_mult + c_shift) after 200 Adam steps."""
    layer = make(out_f=1)  # the experts do not enter the loss; keep them cheap
    layer.set_expert_costs(mult=costs[0], shift=costs[1])
    x = torch.randn(1024, 16)
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    layer.train()
    for _ in range(200):
        layer(x)
        loss = layer.balance_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.reset_routing_stats()
    layer(x)
    assert layer.share_to_mult() == pytest.approx(share, abs=0.05)
    layer.eval()(torch.randn(2048, 16))  # unseen tokens of the same distribution
    assert layer.share_to_mult(cumulative=False) == pytest.approx(share, abs=0.07)


def test_equilibrium_share_balances_cost_weighted_load():
    for mult, shift in [(1.0, 3.0), (4.0, 1.0), (2.0, 2.0)]:
        share = equilibrium_share({"mult": mult, "shift": shift})
        # the balance loss's cv^2 of c * counts is zero iff c_mult * n_mult == c_shift * n_shift
        assert mult * share == pytest.approx(shift * (1 - share))


def test_balance_loss_needs_costs_and_statistics():
    layer = make()
    layer.train()(torch.randn(4, 16))
    with pytest.raises(ModelError, match="no cost model: pass costs= to reparameterize"):
        layer.balance_loss()
    fresh = make()
    fresh.set_expert_costs(mult=2.0, shift=1.0)
    with pytest.raises(ModelError, match="routing statistics"):
        fresh.balance_loss()
    for bad in (0.0, -1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(ModelError, match="positive finite"):
            layer.set_expert_costs(mult=bad, shift=1.0)


def hand_routed_layer(gate="straight_through"):
    layer = MoELinear(4, 3, gate=gate)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # logit_mult - logit_shift = x0, so p_mult = sigmoid(x0)
        layer.router.bias.zero_()
        layer.shift.weight.copy_(torch.randn(3, 4))  # experts clearly different
    x0 = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.5])
    x = torch.cat([x0[:, None], torch.randn(5, 3)], dim=1)  # [5, 4]
    return layer, x


@pytest.mark.parametrize(("cap", "to_mult"), [
    (0.4, [0, 2]),  # round(2.0): the two most Mult-inclined tokens, x0 = 2.0 and 0.3
    (0.5, [0, 2, 3]),  # round(2.5) half up = 3
    (0.0, []),
    (1.0, [0, 1, 2, 3, 4]),
])
def test_capacity_mode_matches_hand_computed_routing(cap, to_mult):
    layer, x = hand_routed_layer()
    layer.set_capacity(cap)
    layer.eval()
    with torch.no_grad():
        expected = torch.stack([layer.mult(x[i]) if i in to_mult else layer.shift(x[i][None])[0]
                                for i in range(5)])
        out = layer(x[None])  # [1, 5, 4] -> [1, 5, 3]
    torch.testing.assert_close(out[0], expected)
    assert layer.last_counts.tolist() == [len(to_mult), 5 - len(to_mult)]


def test_capacity_mode_with_prob_gate_scales_by_the_assigned_expert():
    layer, x = hand_routed_layer(gate="prob")
    layer.set_capacity(0.4)
    p_mult = torch.sigmoid(x[:, 0])
    with torch.no_grad():
        expected = torch.stack([layer.mult(x[i]) * p_mult[i] if i in (0, 2) else
                                layer.shift(x[i][None])[0] * (1 - p_mult[i]) for i in range(5)])
        out = layer.eval()(x)
    torch.testing.assert_close(out, expected)


def test_capacity_is_ignored_in_training_and_validated():
    layer, x = hand_routed_layer()
    layer.set_capacity(0.0)
    layer.train()(x)
    assert layer.last_counts.tolist() == [3, 2]  # top-1: x0 >= 0 goes to Mult
    with pytest.raises(ModelError, match=r"\[0, 1\]"):
        layer.set_capacity(1.5)


def test_capacity_mode_exports_without_data_dependent_shapes():
    layer, x = hand_routed_layer()
    layer.set_capacity(0.4)
    layer.eval()
    before = layer.token_counts.clone()
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("nonzero" in t for t in targets)
    assert torch.equal(layer.token_counts, before + torch.tensor([2, 3]))  # only the eager call counted


def test_bookkeeping_and_model_helpers():
    model = nn.Sequential(make(), nn.GELU(), MoELinear.from_linear(nn.Linear(8, 8), layer_name="b"))
    with torch.no_grad():
        for m in model:
            if isinstance(m, MoELinear):
                m.router.weight.normal_(0, 1)
                m.set_expert_costs(mult=2.0, shift=1.0)
    x1, x2 = torch.randn(30, 16), torch.randn(20, 16)
    model.train()
    model(x1)
    model(x2)
    first = model[0]
    _, m1 = routed(first, x1)
    _, m2 = routed(first, x2)
    assert first.token_counts.tolist() == [int(m1.sum() + m2.sum()), int((~m1).sum() + (~m2).sum())]
    assert first.last_counts.tolist() == [int(m2.sum()), int((~m2).sum())]
    shares = routing_shares(model)
    assert list(shares) == ["0", "2"]
    assert shares["0"] == pytest.approx(float(m1.sum() + m2.sum()) / 50)
    total = moe_balance_loss(model)
    assert total.item() == pytest.approx(sum(m.balance_loss().item() for _, m in moe_layers(model)))
    copy.deepcopy(model)  # the stored loss statistics must not break copying
    reset_routing_stats(model)
    assert first.token_counts.sum() == 0
    assert moe_balance_loss(nn.Linear(2, 2)).item() == 0.0


def test_op_counts_follow_the_share_and_the_gate():
    layer = make(gate="prob")  # in 16, out 8: the prob gate multiplies every output by g
    nnz = int((layer.shift.quantized_weight() != 0).sum())
    counts = layer.op_counts(10, mult_share=0.3)  # 3 tokens multiply, 7 shift
    assert counts["mul"] == 10 * 16 * 2 + 3 * 16 * 8 + 10 * 8  # router, Mult expert, gate
    assert counts["shift"] == 7 * (nnz + 16 + 8)
    with pytest.raises(ModelError, match="no routing share"):
        layer.op_counts(10)  # nothing measured yet

