import io

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.pvt_v2 import Attention as PvtAttention

from models import ops
from models.errors import ModelError
from models.hamming import HammingAttention, PvtHammingAttention, fit_hamming


def dense_reference(x, qkv_w, qkv_b, proj_w, proj_b, projection, key_center, alpha, beta, heads):
    """The attention formula with plain matmuls: bits as signs of projections (a sign needs no L2 norm),
    similarity as a count of equal bits, row-normalised weights mixed with the mean and the own token."""
    B, N, C = x.shape
    d = C // heads
    qkv = (x @ qkv_w.t() + qkv_b).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, d]
    bq = (q @ projection) > 0  # [B, H, N, nb]
    bk = ((k - key_center[:, None, :]) @ projection) > 0
    sim = (bq[:, :, :, None, :] == bk[:, :, None, :, :]).sum(-1).double()  # [B, H, N, N] matching bits
    rows = sim / sim.sum(-1, keepdim=True)
    a = alpha.double().view(1, heads, 1, 1)
    b = beta.double().view(1, heads, 1, 1)
    weights = (1 - a) / N + b * (rows - 1.0 / N) + a * torch.eye(N, dtype=torch.float64)
    out = (weights @ v.double()).float().transpose(1, 2).reshape(B, N, C)
    return out @ proj_w.t() + proj_b


def make(dim=48, heads=3, nbits=16, seed=3):
    attn = Attention(dim, num_heads=heads, qkv_bias=True)
    return attn, HammingAttention.from_timm(attn, nbits=nbits, seed=seed)


def reference_of(ham, x):
    return dense_reference(x, ham.qkv.weight, ham.qkv.bias, ham.proj.weight, ham.proj.bias, ham.projection,
                           ham.key_center, ham.alpha, ham.beta, ham.num_heads)


def test_codes_are_binary_and_hashing_state_is_buffers():
    _, ham = make()
    q = torch.randn(2, 3, 10, 16)
    codes = ham.codes(q)
    assert codes.shape == (2, 3, 10, 16)
    assert set(codes.unique().tolist()) <= {0.0, 1.0}
    state = ham.state_dict()
    for name in ("projection", "key_center", "fitted"):
        assert name in state
    assert "projection" in dict(ham.named_buffers()) and "projection" not in dict(ham.named_parameters())


@pytest.mark.parametrize("nbits", [8, 16, 40])
def test_matches_dense_reference_train_and_eval(nbits, op_registered):
    _, ham = make(nbits=nbits)
    x = torch.randn(2, 11, 48)
    ham.fit_hashing(x)  # non-trivial key centre, projection, alpha and beta
    assert bool(ham.fitted)
    assert ham.key_center.abs().sum() > 0
    with torch.no_grad():
        ham.alpha.copy_(torch.tensor([0.3, -0.2, 0.1]))
        ham.beta.copy_(torch.tensor([2.0, 5.0, 0.5]))
        expected = reference_of(ham, x)
    torch.testing.assert_close(ham.train()(x), expected, atol=2e-5, rtol=1e-4)
    with ops.kernel_ops("off"):
        torch.testing.assert_close(ham.eval()(x), expected, atol=2e-5, rtol=1e-4)
    if op_registered("matadd"):
        with ops.kernel_ops("on"):
            torch.testing.assert_close(ham.eval()(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # compiles two TVM kernels
def test_eval_through_tvm_matadd_matches_reference(op_registered):
    if not op_registered("matadd"):
        pytest.skip("kernels.torch_ops has no matadd op")
    from kernels.torch_ops import use_tvm

    _, ham = make(dim=16, heads=1, nbits=8)
    x = torch.randn(1, 5, 16)
    expected = reference_of(ham, x).detach()
    with ops.kernel_ops("on"), use_tvm(True):
        torch.testing.assert_close(ham.eval()(x), expected, atol=2e-5, rtol=1e-4)


def test_straight_through_gradient_reaches_query_projection():
    _, ham = make()
    x = torch.randn(2, 9, 48)
    ham.train()(x).square().sum().backward()
    # q enters the output only through its binary code, so a gradient here is the STE's
    q_rows = ham.qkv.weight.grad[: ham.attn_dim]
    assert q_rows.abs().sum() > 0
    assert ham.alpha.grad.abs().sum() > 0 and ham.beta.grad.abs().sum() > 0


def test_state_dict_round_trip_keeps_hashing_state():
    _, ham = make(seed=1)
    x = torch.randn(2, 9, 48)
    ham.fit_hashing(x)
    buf = io.BytesIO()
    torch.save(ham.state_dict(), buf)
    _, fresh = make(seed=99)  # other weights and another random projection
    assert not torch.equal(fresh.projection, ham.projection)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert bool(fresh.fitted)
    with ops.kernel_ops("off"):
        torch.testing.assert_close(fresh.eval()(x), ham.eval()(x), atol=0, rtol=0)


def test_fit_projection_is_orthonormal_and_mixing_is_least_squares():
    _, ham = make(dim=64, heads=2, nbits=16)
    q, k, v = torch.randn(3, 2, 20, 32), torch.randn(3, 2, 20, 32) + 0.5, torch.randn(3, 2, 20, 32)
    ham.eval()
    ham._fit(q, k, v, True)
    torch.testing.assert_close(ham.key_center, k.mean(dim=(0, 2)))
    gram = ham.projection.transpose(1, 2) @ ham.projection  # [H, nb, nb]
    torch.testing.assert_close(gram, torch.eye(16).expand(2, 16, 16), atol=1e-5, rtol=0)
    target = F.scaled_dot_product_attention(q, k, v)

    def error(alpha, beta):
        with torch.no_grad():
            ham.alpha.copy_(alpha)
            ham.beta.copy_(beta)
            return (ham.attend(q, k, v, True) - target).square().sum(dim=(0, 2, 3))  # per head

    alpha0, beta0 = ham.alpha.detach().clone(), ham.beta.detach().clone()
    best = error(alpha0, beta0)
    for da, db in [(0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)]:
        assert torch.all(error(alpha0 + da, beta0 + db) >= best)


def test_fit_hamming_fits_every_layer_of_a_model(vit_digits):
    from models.assignment import Assignment
    from models.reparam import reparameterize

    model = reparameterize(vit_digits(depth=2), Assignment.uniform(vit_digits(depth=2), attention="hamming"))
    layers = [m for m in model.modules() if isinstance(m, HammingAttention)]
    assert not any(bool(m.fitted) for m in layers)
    model.train()
    assert fit_hamming(model, torch.randn(4, 3, 32, 32)) == 2
    assert all(bool(m.fitted) for m in layers)
    assert model.training  # mode restored


def test_pvt_attention_with_spatial_reduction_matches_reference():
    attn = PvtAttention(32, num_heads=2, sr_ratio=2, qkv_bias=True)
    ham = PvtHammingAttention.from_timm(attn, nbits=8, seed=5)
    assert ham.alpha is None  # keys are reduced tokens: no own-token term
    x = torch.randn(2, 16, 32)
    ham.fit_hashing(x, [4, 4])
    with torch.no_grad():
        ham.beta.copy_(torch.tensor([3.0, 0.7]))
        B, N, C = x.shape
        q = (x @ attn.q.weight.t() + attn.q.bias).reshape(B, N, 2, 16).permute(0, 2, 1, 3)
        kx = attn.norm(attn.sr(x.transpose(1, 2).reshape(B, C, 4, 4)).reshape(B, C, -1).transpose(1, 2))
        kv = (kx @ attn.kv.weight.t() + attn.kv.bias).reshape(B, -1, 2, 2, 16).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # [B, H, 4, d]
        bq = (q @ ham.projection) > 0
        bk = ((k - ham.key_center[:, None, :]) @ ham.projection) > 0
        sim = (bq[:, :, :, None, :] == bk[:, :, None, :, :]).sum(-1).float()  # [B, H, 16, 4]
        rows = sim / sim.sum(-1, keepdim=True)
        beta = ham.beta.view(1, 2, 1, 1)
        weights = 1 / 4 + beta * (rows - 1 / 4)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(ham.train()(x, [4, 4]), expected, atol=2e-5, rtol=1e-4)
    assert ham.op_counts(16)["mul"] > 0


def test_op_counts_match_the_codes_and_grow_linearly():
    _, ham = make(dim=48, heads=3, nbits=16)
    x = torch.randn(1, 13, 48)
    qkv = ham.qkv(x).reshape(1, 13, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    ones = ham._extended_code(q, False).sum() + ham._extended_code(k, True).sum()
    matadd_adds = int(ones) * (16 + 1)  # each 1 in a code row adds one [v, 1] row
    counts = ham.op_counts(13)
    other_adds = 3 * ((13 + 13) * 15 * 16 + 13 * 16 + 13 * 16 + 2 * 13 * 16 + 2 * 13 * 16)
    assert counts["add"] == matadd_adds + other_adds
    big, small = ham.op_counts(2000), ham.op_counts(1000)
    assert big["mul"] < 2.01 * small["mul"] and big["add"] < 2.01 * small["add"]  # linear, not quadratic


def test_masks_are_rejected():
    _, ham = make()
    with pytest.raises(ModelError, match="mask"):
        ham(torch.randn(1, 4, 48), attn_mask=torch.zeros(4, 4))
