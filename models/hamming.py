"""Additive attention over binary Hamming codes: the "linear-angular" attention of ShiftAddViT (You et al.,
NeurIPS 2023).

Hashing — sign random projections (Charikar, "Similarity estimation techniques from rounding algorithms",
STOC 2002): each head keeps a projection ``R`` [d, nbits] and hashes a query or key ``t`` to
``c = 1[t_hat @ R > 0]`` with ``t_hat = t / ||t||`` (the sign does not depend on ``||t||``, so inference
skips the normalisation; training keeps it for the straight-through surrogate's scale). For a random direction ``r``,
``P(bit differs) = theta / pi``, so the fraction of matching bits estimates ``1 - theta/pi``, ShiftAddViT's
linear-angular similarity. Each code is used with its complement, ``c_ext = [c, 1 - c]`` (2·nbits columns),
so ``c_ext(q_i) . c_ext(k_j) = s_ij``, the number of matching bits — still a pure masked accumulate.
Keys are centred first (``k - key_center``): softmax attention is invariant to adding one vector to every
key (it shifts each row's logits by a constant), and centring spreads the keys' angles so the bits carry
information.

Attention (per head, Nq queries, Nk keys, values v_j)::

    s_ij  = c_ext(q_i) . c_ext(k_j)                     # matching bits, 0..nbits
    z_i   = sum_j s_ij = c_ext(q_i) . sum_j c_ext(k_j)   # normaliser, additions only
    o_i   = sum_j s_ij v_j / z_i                         # normalised linear-angular attention
    out_i = v_mean + beta * (o_i - v_mean) + alpha * (v_i - v_mean)

i.e. row weights ``w_ij = (1 - alpha)/Nk + beta * (s_ij / z_i - 1/Nk) + alpha * [i == j]`` (rows sum to 1).
``beta`` (per head) is a learnable temperature around the uniform average — the codes' similarity
varies little around nbits/2, so without it the attention is nearly a plain mean; ``alpha`` (per head) is
the token's own value, ShiftAddViT's ``0.5 * V`` term (``pvt_v2.py`` LinAngularAttention_ksh) made
learnable. Both products are ``matadd`` calls, with a ones column appended to V so the normaliser comes
out of the same two products::

    KV  = matadd(mask=c_ext(K) [b·h, Nk, 2nb], v=[V, 1] [b·h, Nk, d+1])     -> [b·h, 2nb, d+1]
    QKV = matadd(mask=c_ext(Q)^T [b·h, 2nb, Nq], v=KV [b·h, 2nb, d+1])      -> [b·h, Nq, d+1]

Deviations from the ShiftAddViT release, on purpose: separate Q and K codes (the release ties Q = K through a
shared ``to_qk``, which is not the pretrained MSA); a normaliser and learnable alpha/beta instead of the
unnormalised ``0.5 V + code·KV / pi`` followed by an L2 norm; no depthwise conv over the flattened token
index (``dconv_v``), which does not respect a class token; sign random projections instead of KSH.

Hashing state and when it changes: ``projection`` [H, d, nbits], ``key_center`` [H, d] and ``fitted``
are registered buffers, so they travel in ``state_dict`` across fine-tuning stages. At construction the
projection is a seeded random orthogonal matrix and ``key_center`` is 0. :meth:`fit_hashing` (or
:func:`fit_hamming` for a whole model) refits them once on a batch — PCA-RR (Gong & Lazebnik, CVPR 2011:
top-``nbits`` principal directions of the normalised queries and keys, randomly rotated) when
``nbits <= d``, otherwise random orthogonal blocks — and initialises alpha/beta by least squares so the
output matches the softmax attention it replaces on that batch. It is never refitted implicitly; during
training the codes' straight-through gradient trains the q/k projections against the fixed hash, and
alpha/beta train as ordinary parameters.

Straight-through estimator: forward ``1[z > 0]``, backward the gradient of ``sigmoid(1.702 · sqrt(d) · z)``
(a logistic approximation of ``Phi(sqrt(d) z)``; for random unit vectors ``z`` has std ``1/sqrt(d)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import ops
from models.errors import ModelError


def random_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] with orthonormal columns (blocks of independent orthogonal bases when cols > rows)."""
    blocks = []
    for _ in range(math.ceil(cols / rows)):
        g = torch.randn(rows, rows, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        blocks.append(q * torch.sign(torch.diagonal(r)))  # sign fix: Haar-distributed (Mezzadri 2007)
    return torch.cat(blocks, dim=1)[:, :cols].float()


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class HammingAttention(nn.Module):
    """Replaces a timm ViT ``Attention``: reuses its ``qkv``/``proj`` (which may be Shift or MoE layers)."""

    # timm's ``fused_attn`` of the Attention replaced: whether this layer's msa form runs as one
    # F.scaled_dot_product_attention in eager PyTorch (the layer inventory prices that form from it)
    msa_fused_attn: bool = False

    def __init__(self, qkv: nn.Module, proj: nn.Module, num_heads: int, head_dim: int, *, nbits: int = 16,
                 seed: int = 0, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 norm: nn.Module | None = None, gate: nn.Module | None = None, proj_drop: nn.Module | None = None):
        """``qkv``: Linear-like dim -> 3·H·d, ``proj``: H·d -> dim; the optional modules are timm's
        ``q_norm``/``k_norm`` (per head), ``norm`` (on the attention output), ``gate`` (sigmoid gate)."""
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.qkv, self.proj = qkv, proj
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.norm = norm or nn.Identity()
        self.gate = gate
        self.proj_drop = proj_drop or nn.Identity()
        self._init_hashing(nbits, seed, self_term=True, device=_device_of(proj))

    def _init_hashing(self, nbits: int, seed: int, self_term: bool, device: torch.device) -> None:
        if nbits < 1:
            raise ModelError(f"nbits={nbits} must be >= 1")
        self.nbits = nbits
        self.seed = seed
        self._fit_pending = False
        gen = torch.Generator().manual_seed(seed)
        proj = torch.stack([random_orthogonal(self.head_dim, nbits, gen) for _ in range(self.num_heads)])
        self.register_buffer("projection", proj.to(device))  # [H, d, nbits]
        self.register_buffer("key_center", torch.zeros(self.num_heads, self.head_dim, device=device))  # [H, d]
        self.register_buffer("fitted", torch.tensor(False, device=device))
        # Before a fit: the plain normalised linear-angular attention plus ShiftAddViT's 0.5·V own-token term.
        self.beta = nn.Parameter(torch.ones(self.num_heads, device=device))
        self.alpha = nn.Parameter(torch.full((self.num_heads,), 0.5, device=device)) if self_term else None

    @classmethod
    def from_timm(cls, attn: nn.Module, nbits: int = 16, seed: int = 0) -> HammingAttention:
        """Wrap a ``timm.layers.Attention``, sharing its projection modules (no copy)."""
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise ModelError(f"{type(attn).__name__} has no '{name}'; HammingAttention replaces timm "
                                 "ViT Attention (qkv/proj) only")
        out = cls(attn.qkv, attn.proj, attn.num_heads, attn.head_dim, nbits=nbits, seed=seed,
                  q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                  norm=getattr(attn, "norm", None), gate=getattr(attn, "gate", None),
                  proj_drop=getattr(attn, "proj_drop", None))
        out.msa_fused_attn = bool(getattr(attn, "fused_attn", False))
        return out

    # ---- projections (overridden for PVT) --------------------------------------------------------------
    def _project(self, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(q [B,H,N,d], k [B,H,Nk,d], v [B,H,Nk,d], keys are the query tokens)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, d]
        return self.q_norm(q), self.k_norm(k), v, True

    def _output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, N, d = out.shape
        out = self.norm(out.transpose(1, 2).reshape(B, N, H * d))  # [B, N, attn_dim]
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ModelError("HammingAttention does not support attention masks; keep 'msa' for this layer")
        q, k, v, self_keys = self._project(x)
        return self._output(self._attend_or_fit(q, k, v, self_keys), x)

    # ---- the attention ---------------------------------------------------------------------------------
    def codes(self, t: torch.Tensor, keys: bool = False) -> torch.Tensor:
        """Binary codes {0,1} of queries (or keys) [B,H,N,d] -> [B,H,N,nbits] (forward value)."""
        return self._bits(t, keys)[0]

    def _bits(self, t: torch.Tensor, keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if keys:
            t = t - self.key_center[:, None, :]  # [B,H,N,d] - [H,1,d]
        if self.training:
            t = F.normalize(t, dim=-1)  # sets the STE surrogate's scale; a sign alone needs no norm
        z = torch.matmul(t, self.projection)  # [B,H,N,d] @ [H,d,nb] -> [B,H,N,nb]
        hard = (z > 0).to(z.dtype)
        return hard, z

    def _extended_code(self, t: torch.Tensor, keys: bool) -> torch.Tensor:
        hard, z = self._bits(t, keys)
        if self.training and torch.is_grad_enabled():
            soft = torch.sigmoid(z * (1.702 * math.sqrt(self.head_dim)))
            hard = hard + soft - soft.detach()  # straight-through (module docstring)
        return torch.cat([hard, 1.0 - hard], dim=-1)  # [B, H, N, 2·nb]

    def _attend_or_fit(self, q, k, v, self_keys: bool) -> torch.Tensor:
        with ops.fp32_region(q.device.type):
            q, k, v = q.float(), k.float(), v.float()
            if self._fit_pending:
                self._fit(q, k, v, self_keys)
                self._fit_pending = False
            return self.attend(q, k, v, self_keys)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_keys: bool) -> torch.Tensor:
        """q [B,H,Nq,d], k/v [B,H,Nk,d] -> [B,H,Nq,d] (formula in the module docstring)."""
        B, H, Nq, d = q.shape
        Nk = k.shape[2]
        cq = self._extended_code(q, keys=False)  # [B, H, Nq, 2nb]
        ck = self._extended_code(k, keys=True)  # [B, H, Nk, 2nb]
        v1 = torch.cat([v, v.new_ones(B, H, Nk, 1)], dim=-1)  # [B, H, Nk, d+1]
        c2 = cq.shape[-1]
        kv = ops.matadd(ck.reshape(B * H, Nk, c2), v1.reshape(B * H, Nk, d + 1), self.training)  # [BH,2nb,d+1]
        qkv = ops.matadd(cq.reshape(B * H, Nq, c2).transpose(1, 2), kv, self.training)  # [BH, Nq, d+1]
        qkv = qkv.reshape(B, H, Nq, d + 1)
        num, z = qkv[..., :d], qkv[..., d:]  # [B,H,Nq,d], [B,H,Nq,1]
        o = num / z.clamp_min(1.0)  # z = 0 only if no key shares a bit with the query; then num = 0 too
        v_mean = v.mean(dim=2, keepdim=True)  # [B, H, 1, d]
        out = v_mean + self.beta.view(1, H, 1, 1) * (o - v_mean)
        if self.alpha is not None and self_keys:
            out = out + self.alpha.view(1, H, 1, 1) * (v - v_mean)
        return out

    # ---- fitting -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_hashing(self, x: torch.Tensor, *args) -> None:
        """Refit the hash (key centre, projection) and alpha/beta on one batch of this layer's input."""
        q, k, v, self_keys = self._project(x, *args)
        with ops.fp32_region(x.device.type):
            self._fit(q.float(), k.float(), v.float(), self_keys)

    @torch.no_grad()
    def _fit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_keys: bool) -> None:
        H, d, nb = self.num_heads, self.head_dim, self.nbits
        gen = torch.Generator().manual_seed(self.seed + 1)
        self.key_center.copy_(k.mean(dim=(0, 2)))  # [H, d]
        qn = F.normalize(q, dim=-1)
        kn = F.normalize(k - self.key_center[:, None, :], dim=-1)
        pooled = torch.cat([qn, kn], dim=2).transpose(0, 1).reshape(H, -1, d)  # [H, B·(Nq+Nk), d]
        proj = []
        for h in range(H):
            if nb <= d:
                centred = (pooled[h] - pooled[h].mean(0)).double()
                _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
                top = vecs[:, -nb:].float()  # [d, nb]
                proj.append(top @ random_orthogonal(nb, nb, gen).to(top.device))
            else:
                proj.append(random_orthogonal(d, nb, gen).to(q.device))
        self.projection.copy_(torch.stack(proj))
        self._fit_mixing(q, k, v, self_keys)
        self.fitted.fill_(True)

    @torch.no_grad()
    def _fit_mixing(self, q, k, v, self_keys: bool) -> None:
        """Least-squares alpha/beta per head so ``out`` matches softmax(q k^T / sqrt(d)) v on this batch."""
        was_training = self.training
        self.train(False)
        try:
            target = F.scaled_dot_product_attention(q, k, v)  # [B,H,Nq,d]
            self.beta.fill_(1.0)
            use_alpha = self.alpha is not None and self_keys
            if use_alpha:
                self.alpha.fill_(0.0)
            v_mean = v.mean(dim=2, keepdim=True)
            with ops.kernel_ops("off"):  # calibration, not inference: no kernel builds
                o_dev = self.attend(q, k, v, self_keys) - v_mean  # beta = 1, alpha = 0: o - v_mean
        finally:
            self.train(was_training)
        y = (target - v_mean).transpose(0, 1).reshape(self.num_heads, -1)  # [H, B·Nq·d]
        feats = [o_dev.transpose(0, 1).reshape(self.num_heads, -1)]
        if use_alpha:
            feats.append((v - v_mean).transpose(0, 1).reshape(self.num_heads, -1))
        a = torch.stack(feats, dim=-1).double()  # [H, M, p]
        gram = a.transpose(1, 2) @ a  # [H, p, p]
        ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [H]
        gram = gram + ridge[:, None, None] * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        coef = torch.linalg.solve(gram, a.transpose(1, 2) @ y.double().unsqueeze(-1)).squeeze(-1)  # [H, p]
        self.beta.copy_(coef[:, 0].float())
        if use_alpha:
            self.alpha.copy_(coef[:, 1].float())

    # ---- accounting ----------------------------------------------------------------------------------
    def _key_tokens(self, tokens: int) -> int:
        return tokens

    def op_counts(self, tokens: int) -> dict[str, int]:
        """Operations of the attention core for one image of ``tokens`` queries (the qkv/proj Linears are
        separate layers and not included). Counted: hashing projections (multiply-adds; the L2 norm is not
        needed at inference because a sign is scale-invariant), key centring, the two masked accumulates
        (exactly nbits ones per extended code row), the normaliser division, the mean and the alpha/beta mix.
        """
        H, d, nb = self.num_heads, self.head_dim, self.nbits
        nq, nk = tokens, self._key_tokens(tokens)
        mul = (nq + nk) * d * nb  # hashing projections
        add = (nq + nk) * (d - 1) * nb + nk * d  # projection sums + key centring
        add += nk * nb * (d + 1) + nq * nb * (d + 1)  # K^T[V,1] and Q(K^T[V,1])
        mul += nq * d  # o = num / z (a division per element)
        add += nk * d
        mul += d  # v_mean = sum / Nk
        add += 2 * nq * d  # o - v_mean, v_mean + ...
        mul += nq * d  # beta * (o - v_mean)
        if self.alpha is not None and nk == nq:
            add += 2 * nq * d
            mul += nq * d
        return {"mul": H * mul, "add": H * add, "shift": 0}

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, nbits={self.nbits}"


class PvtHammingAttention(HammingAttention):
    """Replaces a timm PVTv2 ``Attention`` (``q``, ``kv``, ``proj``).

    Spatial reduction is kept: where the layer has ``sr`` (a strided conv + LayerNorm, or the ``linear``
    variant's pooling), keys and values come from the reduced tokens and are hashed there — linear attention
    needs no square similarity matrix, so Hamming attention applies in every stage. The own-token term
    (``alpha``) exists only where keys are the query tokens (no reduction).
    """

    def __init__(self, q: nn.Module, kv: nn.Module, proj: nn.Module, num_heads: int, head_dim: int, *,
                 sr: nn.Module | None = None, norm: nn.Module | None = None, pool: nn.Module | None = None,
                 act: nn.Module | None = None, proj_drop: nn.Module | None = None, nbits: int = 16,
                 seed: int = 0):
        # The ViT constructor's fused-qkv layout does not apply; only the hashing state is shared.
        nn.Module.__init__(self)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        # Same attribute names as timm's module, so state-dict keys stay those of the dense model.
        self.q, self.kv, self.proj = q, kv, proj
        self.sr, self.norm, self.pool, self.act = sr, norm, pool, act
        self.proj_drop = proj_drop or nn.Identity()
        self.q_norm = self.k_norm = nn.Identity()
        self.gate = None
        self._init_hashing(nbits, seed, self_term=sr is None and pool is None, device=_device_of(proj))

    @classmethod
    def from_timm(cls, attn: nn.Module, nbits: int = 16, seed: int = 0) -> PvtHammingAttention:
        for name in ("q", "kv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise ModelError(f"{type(attn).__name__} has no '{name}'; PvtHammingAttention replaces timm "
                                 "PVTv2 Attention (q/kv/proj) only")
        out = cls(attn.q, attn.kv, attn.proj, attn.num_heads, attn.head_dim, sr=attn.sr, norm=attn.norm,
                  pool=attn.pool, act=attn.act, proj_drop=attn.proj_drop, nbits=nbits, seed=seed)
        out.msa_fused_attn = bool(getattr(attn, "fused_attn", False))
        return out

    def _project(self, x: torch.Tensor, feat_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # [B, H, N, d]
        kx = x
        if self.pool is not None:  # timm pvt_v2 linear variant
            kx = x.permute(0, 2, 1).reshape(B, C, *feat_size)
            kx = self.act(self.norm(self.sr(self.pool(kx)).reshape(B, C, -1).permute(0, 2, 1)))
        elif self.sr is not None:
            kx = x.permute(0, 2, 1).reshape(B, C, *feat_size)
            kx = self.norm(self.sr(kx).reshape(B, C, -1).permute(0, 2, 1))  # [B, Nk, C]
        kv = self.kv(kx).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each [B, H, Nk, d]
        return q, k, v, self.sr is None and self.pool is None

    def _output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, N, d = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, H * d)))

    def forward(self, x: torch.Tensor, feat_size) -> torch.Tensor:
        q, k, v, self_keys = self._project(x, feat_size)
        return self._output(self._attend_or_fit(q, k, v, self_keys), x)

    def _key_tokens(self, tokens: int) -> int:
        if self.pool is not None:
            size = self.pool.output_size
            return size * size if isinstance(size, int) else math.prod(size)
        if self.sr is not None:
            return tokens // (self.sr.stride[0] * self.sr.stride[1])
        return tokens


@torch.no_grad()
def fit_hamming(model: nn.Module, images: torch.Tensor) -> int:
    """Fit every Hamming attention's hash on one batch, layer by layer in one forward pass (each layer
    sees the output of the already-fitted layers before it). Returns the number of layers fitted.

    The pass runs the PyTorch reference products (a calibration pass, not inference: no kernel builds)."""
    layers = [m for m in model.modules() if isinstance(m, HammingAttention)]
    if not layers:
        return 0
    was_training = model.training
    for m in layers:
        m._fit_pending = True
    model.eval()
    try:
        with ops.kernel_ops("off"):
            model(images)
    finally:
        model.train(was_training)
        for m in layers:
            m._fit_pending = False
    return len(layers)
