import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from models import ops
from models.assignment import Assignment
from models.errors import ModelError
from models.hamming import HammingAttention, PvtHammingAttention, fit_hamming
from models.moe import MoELinear, moe_balance_loss, moe_layers, reset_routing_stats, routing_shares
from models.reparam import apply_costs, reparameterize
from models.shift import ShiftLinear


def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)


def pvt_b0():
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10)


MODELS = {"vit_digits": 32, "deit_tiny": 32, "pvt_v2_b0": 64}  # name -> input size


@pytest.fixture
def builders(vit_digits):
    """name -> function building that dense model."""
    return {"vit_digits": vit_digits, "deit_tiny": deit_tiny, "pvt_v2_b0": pvt_b0}


def mixed(model):
    """Hamming on every other attention; Linears cycle mult -> shift -> moe."""
    layers = Assignment.layers(model)
    att = [n for n, c in layers.items() if "hamming" in c]
    lin = [n for n, c in layers.items() if "moe" in c]
    return Assignment(attention={n: "hamming" for n in att[::2]},
                      linear={n: ("mult", "shift", "moe")[i % 3] for i, n in enumerate(lin)})


ASSIGNMENTS = {
    "hamming_moe": lambda m: Assignment.uniform(m, attention="hamming", linear="moe"),
    "msa_shift": lambda m: Assignment.uniform(m, attention="msa", linear="shift"),
    "mixed": mixed,
}


class ConstantCosts:
    """A cost model in the shape of the Protocol: prices by layer name."""

    def __init__(self):
        self.asked = []

    def moe_expert_costs(self, layer_name):
        self.asked.append(layer_name)
        return {"mult": 3.0, "shift": 1.0}


@pytest.mark.parametrize("assignment_name", list(ASSIGNMENTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_forward_and_backward_after_reparameterisation(model_name, assignment_name, builders):
    build, size = builders[model_name], MODELS[model_name]
    dense = build()
    assignment = ASSIGNMENTS[assignment_name](dense)
    costs = ConstantCosts()
    model = reparameterize(dense, assignment, costs=costs)
    for name, choice in assignment.linear.items():
        kind = {"mult": nn.Linear, "shift": ShiftLinear, "moe": MoELinear}[choice]
        assert isinstance(model.get_submodule(name), kind)
    for name, choice in assignment.attention.items():
        assert isinstance(model.get_submodule(name), HammingAttention) == (choice == "hamming")
    assert sorted(costs.asked) == sorted(n for n, c in assignment.linear.items() if c == "moe")
    x = torch.randn(2, 3, size, size)
    fit_hamming(model, x)
    model.train()
    reset_routing_stats(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda _m, inp, name=name: seen.__setitem__(name, inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for name, layer in moe_layers(model)]
    logits = model(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, torch.tensor([1, 2])) + 0.01 * moe_balance_loss(model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for _, layer in moe_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0
    shares = routing_shares(model)
    # independently: each layer's share is the fraction of its input tokens whose router prefers Mult
    for name, layer in moe_layers(model):
        p = torch.softmax(seen[name] @ layer.router.weight.t() + layer.router.bias, dim=-1)
        assert shares[name] == pytest.approx((p[:, 0] >= p[:, 1]).double().mean().item())
    with ops.kernel_ops("off"):
        assert torch.isfinite(model.eval()(x)).all()


def test_dense_model_is_left_untouched_and_all_dense_assignment_is_identity(vit_digits):
    dense = vit_digits(depth=2)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = reparameterize(dense, Assignment.uniform(dense, attention="hamming", linear="moe"))
    assert model is not dense
    assert type(dense.blocks[0].attn).__name__ == "Attention" and isinstance(dense.blocks[0].mlp.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    same = reparameterize(dense, Assignment.uniform(dense)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same(x), dense.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("model_name", ["vit_digits", "pvt_v2_b0"])
def test_state_dict_reloads_into_a_fresh_reparameterisation(model_name, tmp_path, builders):
    build, size = builders[model_name], MODELS[model_name]
    dense = build()
    assignment = Assignment.uniform(dense, attention="hamming", linear="moe")
    model = reparameterize(dense, assignment, costs=ConstantCosts())
    x = torch.randn(2, 3, size, size)
    fit_hamming(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # one step: every tensor moves off its init
    model.train()
    (model(x).square().mean() + moe_balance_loss(model)).backward()
    opt.step()
    torch.save(model.state_dict(), tmp_path / "sam.pt")

    torch.manual_seed(123)  # another dense init and other hash seeds
    fresh = reparameterize(build(), assignment, seed=7)
    attn = next(m for m in fresh.modules() if isinstance(m, HammingAttention))
    assert not bool(attn.fitted)
    fresh.load_state_dict(torch.load(tmp_path / "sam.pt", weights_only=True))
    assert all(bool(m.fitted) for m in fresh.modules() if isinstance(m, HammingAttention))
    model.eval()
    fresh.eval()
    # both inference paths: PyTorch reference and the custom ops (their backend is slow on PVT's widths)
    for mode in ("off", "auto") if model_name == "vit_digits" else ("off",):
        with ops.kernel_ops(mode):
            torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_pvt_hamming_keeps_spatial_reduction():
    dense = pvt_b0()
    model = reparameterize(dense, Assignment.uniform(dense, attention="hamming"))
    first, last = model.get_submodule("stages.0.blocks.0.attn"), model.get_submodule("stages.3.blocks.0.attn")
    assert isinstance(first, PvtHammingAttention) and first.sr is not None and first.alpha is None
    assert last.sr is None and last.alpha is not None
    assert set(dense.state_dict()) <= set(model.state_dict())  # dense keys keep their names


def test_costs_sources_and_errors(vit_digits):
    dense = vit_digits(depth=1)
    a = Assignment(linear={"blocks.0.mlp.fc1": "moe", "blocks.0.mlp.fc2": "moe"})
    mapping = {"blocks.0.mlp.fc1": {"mult": 2.0, "shift": 1.0}, "blocks.0.mlp.fc2": {"mult": 5, "shift": 4}}
    model = reparameterize(dense, a, costs=mapping)
    assert model.blocks[0].mlp.fc2.expert_costs.tolist() == [5.0, 4.0]
    with pytest.raises(ModelError, match=r"no entry for MoE layer 'blocks\.0\.mlp\.fc2'"):
        reparameterize(dense, a, costs={"blocks.0.mlp.fc1": {"mult": 2.0, "shift": 1.0}})
    with pytest.raises(ModelError, match="exactly the keys mult and shift"):
        reparameterize(dense, a, costs={n: {"mult": 1.0} for n in mapping})
    with pytest.raises(ModelError, match="moe_expert_costs"):
        reparameterize(dense, a, costs=[1.0, 2.0])
    inference_only = reparameterize(dense, a)
    inference_only.train()(torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelError, match="no cost model: pass costs= to reparameterize"):
        moe_balance_loss(inference_only)
    assert apply_costs(inference_only, mapping) == 2
    assert moe_balance_loss(inference_only).item() >= 0


def test_capacity_from_the_assignment_and_hash_seeds_are_reproducible(vit_digits):
    dense = vit_digits(depth=1)
    a = Assignment(attention={"blocks.0.attn": "hamming"}, linear={"blocks.0.mlp.fc1": "moe"},
                   capacity={"blocks.0.mlp.fc1": 0.25})
    m1, m2 = reparameterize(dense, a), reparameterize(dense, a)
    assert m1.blocks[0].mlp.fc1.mult_capacity == 0.25
    assert torch.equal(m1.blocks[0].attn.projection, m2.blocks[0].attn.projection)
    assert not torch.equal(m1.blocks[0].attn.projection, reparameterize(dense, a, seed=1).blocks[0].attn.projection)


def test_reparameterising_a_converted_model(vit_digits):
    dense = vit_digits(depth=1)
    a = Assignment.uniform(dense, attention="hamming", linear="shift")
    model = reparameterize(dense, a)
    again = reparameterize(model, a)  # idempotent
    assert isinstance(again.blocks[0].mlp.fc1, ShiftLinear)
    with pytest.raises(ModelError, match="cannot become 'moe'"):
        reparameterize(model, Assignment.uniform(dense, attention="hamming", linear="moe"))
    with pytest.raises(ModelError, match="cannot become 'msa'"):
        reparameterize(model, Assignment.uniform(dense, attention="msa", linear="shift"))
    with pytest.raises(ModelError, match="models.Assignment"):
        reparameterize(dense, {"attention": {}})


def test_checkpoint_bytes_are_loadable_with_weights_only(vit_digits):
    dense = vit_digits(depth=1)
    model = reparameterize(dense, Assignment.uniform(dense, attention="hamming", linear="moe"))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "blocks.0.attn.projection" in state and "blocks.0.mlp.fc1.router.weight" in state
    assert "blocks.0.mlp.fc1.expert_costs" not in state  # costs belong to the target, not the weights
