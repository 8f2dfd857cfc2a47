"""Mult/Shift mixture of experts with a trained top-1 router and a latency-aware balance loss (ShiftAddViT,
You et al., NeurIPS 2023).

Routing is per token per Linear, as in ShiftAddViT: a router ``Linear(in, 2)`` gives probabilities
``p = softmax(router(x))`` over the experts [Mult (``nn.Linear``), Shift (:class:`ShiftLinear`)], each token
goes to its argmax expert, and the router is trained by two signals:

* the task loss, through the gate ``g = p[chosen]``. ``gate="prob"`` outputs ``g * y_chosen`` (Shazeer et al.
  2017; Switch Transformer). ``gate="straight_through"`` outputs ``y_chosen * g / sg(g)``: the chosen
  expert's value unscaled (a freshly converted layer keeps the dense function, where ``g * y`` with a
  2-expert top-1 ``g >= 0.5`` roughly halves it) and no per-token multiply at inference, with a router
  gradient of the same direction (``dL/dlogits = <dL/dout, y> * dlog g/dlogits``). The default is
  :data:`DEFAULT_GATE` (``straight_through``), the one constant that ``MoELinear``, ``reparameterize`` and
  ``finetune.gate`` in ``dse.config`` all use: it starts fine-tuning from the dense function and needs no
  per-token multiply at inference. Measured on the embedded digits ViT (Hamming attention + MoE in every
  Linear, 12 epochs from the same 98.06% dense checkpoint, 2026-12-03): ``prob`` 97.22%, ``straight_through``
  96.67% — two of 360 validation images, inside one seed's noise, so the cheaper combine stays the default.
  Never a log-space combine (the ShiftAddViT release's ``y + log g``).
* the latency-aware load-balancing loss (:meth:`MoELinear.balance_loss`), after the ShiftAddViT
  release's NoisyGate (``fmoe_new.py``) and Shazeer et al., "Outrageously large neural networks", ICLR 2017::

      importance_e = sum_t p_e(t)                     # soft
      load_e       = sum_t 1[e chosen for t]          # hard counts, straight-through gradient of p_e(t)
      loss         = cv2(c * importance) + cv2(c * load),   cv2(x) = var(x) / mean(x)^2

  with ``c_e`` that layer's measured cost of expert e (latency or energy per token, from the cost model;
  only the ratio matters since cv2 is scale-free). Equilibrium: both terms vanish iff
  ``c_mult * n_mult = c_shift * n_shift`` — tokens in inverse proportion to expert cost, i.e. a share
  ``c_shift / (c_mult + c_shift)`` to Mult (:func:`equilibrium_share`; "the faster the expert, the more
  tokens"). The hard load term
  measures the split the model actually makes (soft importance alone can sit at p_mult = 0.25 for every
  token while no token is routed to Mult).

Costs are never defaulted: :meth:`MoELinear.set_expert_costs` (normally via ``reparameterize(...,
costs=...)``); ``balance_loss()`` without them raises :class:`ModelError`.

Static capacity (for export): with ``mult_capacity = r`` set, an eval-mode forward sends the
``floor(r * T + 0.5)`` tokens with the highest Mult probability (T = all tokens of the batch) to Mult and
the rest to Shift, in the form ``argsort -> index_select -> experts on the two slices -> cat ->
index_select(inverse order)``, which imports into TVM Relax (``nonzero``/boolean masks do not), so PyTorch
eval and the compiled graph agree. Training ignores the capacity (the router is what is being trained).

Bookkeeping: ``token_counts`` (cumulative, since :meth:`reset_routing_stats`) and ``last_counts`` are
buffers updated in place in every forward — no host synchronisation in forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from models.errors import ModelError
from models.shift import ShiftLinear

EXPERTS = ("mult", "shift")  # index 0 = Mult, 1 = Shift
GATE_MODES = ("prob", "straight_through")
DEFAULT_GATE = "straight_through"  # the one default of MoELinear, reparameterize and finetune.gate (module doc)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, unbiased variance (Shazeer et al. 2017; ShiftAddViT's NoisyGate)."""
    return x.var() / (x.mean() ** 2 + 1e-10)


class MoELinear(nn.Module):
    """Top-1 mixture of a Mult (``nn.Linear``) and a Shift (:class:`ShiftLinear`) expert; see module doc."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 5,
                 frac_bits: int = 16, gate: str = DEFAULT_GATE, noise_std: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if gate not in GATE_MODES:
            raise ModelError(f"unknown MoE gate '{gate}'; use one of {', '.join(GATE_MODES)}")
        self.in_features, self.out_features = in_features, out_features
        self.gate_mode = gate
        self.noise_std = noise_std
        dd = {"device": device, "dtype": dtype}
        self.mult = nn.Linear(in_features, out_features, bias=bias, **dd)
        self.shift = ShiftLinear(in_features, out_features, bias, weight_bits, frac_bits, **dd)
        self.router = nn.Linear(in_features, len(EXPERTS), **dd)
        nn.init.trunc_normal_(self.router.weight, std=0.02)  # ShiftAddViT's router init (Block._init_weights)
        nn.init.zeros_(self.router.bias)
        self.cost_provenance: dict | None = None  # where expert_costs came from (models.costs), when told
        # Costs come from the cost model of the target; NaN = not given (a balance loss then refuses).
        self.register_buffer("expert_costs", torch.full((len(EXPERTS),), float("nan"), device=device),
                             persistent=False)
        self.register_buffer("token_counts", torch.zeros(len(EXPERTS), dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("last_counts", torch.zeros(len(EXPERTS), dtype=torch.long, device=device),
                             persistent=False)
        self.mult_capacity: float | None = None
        self.layer_name = ""
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer_name: str = "", **kwargs) -> MoELinear:
        """Both experts start from the dense weights (the Shift expert via ``ShiftLinear.from_linear``)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            for expert in (layer.mult, layer.shift):
                expert.weight.copy_(linear.weight)
                if linear.bias is not None:
                    expert.bias.copy_(linear.bias)
        layer.layer_name = layer_name
        return layer

    # ---- costs and capacity ----------------------------------------------------------------------------
    def set_expert_costs(self, mult: float, shift: float, provenance: Mapping | None = None) -> None:
        """Per-token cost of each expert for this layer (any unit; only the ratio matters), and where they come
        from (``cost_provenance``; :mod:`models.costs`)."""
        for name, value in (("mult", mult), ("shift", shift)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ModelError(f"MoE layer '{self.layer_name}': expert cost {name}={value!r} must be a "
                                 "positive finite number")
        self.expert_costs.copy_(torch.tensor([float(mult), float(shift)]))
        self.cost_provenance = dict(provenance) if provenance is not None else None

    @property
    def has_costs(self) -> bool:
        return bool(torch.isfinite(self.expert_costs).all())

    def set_capacity(self, mult_capacity: float | None) -> None:
        if mult_capacity is not None and not 0.0 <= mult_capacity <= 1.0:
            raise ModelError(f"MoE layer '{self.layer_name}': mult_capacity={mult_capacity} must be in [0, 1]")
        self.mult_capacity = mult_capacity

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features)  # [T, in]
        logits = self.router(xt).float()  # [T, 2]
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        probs = logits.softmax(dim=-1)  # [T, 2]
        if self.mult_capacity is not None and not self.training:
            y, to_mult = self._capacity_forward(xt, probs)
        else:
            y, to_mult = self._top1_forward(xt, probs)
        self._bookkeep(to_mult, probs)
        return y.reshape(*lead, self.out_features)

    def _combine(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """y [T, out], g [T] gate of the expert each row came from."""
        if self.gate_mode == "prob":
            return y * g.to(y.dtype)[:, None]
        if self.training and torch.is_grad_enabled():
            return y * (g / g.detach()).to(y.dtype)[:, None]  # value 1, gradient of g (module docstring)
        return y

    def _top1_forward(self, xt: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        # Both experts on every token and a select: static shapes, no host sync (data-dependent splits
        # would need the per-expert counts on the host).
        to_mult = probs[:, 0] >= probs[:, 1]  # [T]; a tie goes to Mult, as argmax does
        y_mult = self.mult(xt)  # [T, out]
        y_shift = self.shift(xt).to(y_mult.dtype)  # [T, out]
        y = torch.where(to_mult[:, None], y_mult, y_shift)
        g = torch.where(to_mult, probs[:, 0], probs[:, 1])  # [T]
        return self._combine(y, g), lambda: to_mult

    def _capacity_forward(self, xt: torch.Tensor, probs: torch.Tensor,
                          ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        total = xt.shape[0]
        cap = int(math.floor(self.mult_capacity * total + 0.5))  # round half up, T static at trace time
        order = torch.argsort(probs[:, 0], descending=True)  # [T] most Mult-inclined first
        inverse = torch.argsort(order)  # [T] position of each token in `order`
        xs = xt.index_select(0, order)  # [T, in]
        parts, gates = [], []
        if cap > 0:
            parts.append(self.mult(xs[:cap]))  # [cap, out]
            gates.append(probs[:, 0].index_select(0, order[:cap]))
        if cap < total:
            parts.append(self.shift(xs[cap:]))  # [T - cap, out]
            gates.append(probs[:, 1].index_select(0, order[cap:]))
        dtype = parts[0].dtype
        ys = torch.cat([p.to(dtype) for p in parts], dim=0)  # [T, out] in sorted order
        y = self._combine(ys, torch.cat(gates)).index_select(0, inverse)  # [T, out] original order
        return y, lambda: inverse < cap  # [T] the first `cap` tokens of the order went to Mult

    def _bookkeep(self, to_mult: Callable[[], torch.Tensor], probs: torch.Tensor) -> None:
        """Loss statistics (training) and token counts; ``to_mult`` is only evaluated when needed, so an
        exported inference graph carries no bookkeeping."""
        if not self.training and torch.compiler.is_exporting():
            return
        mask = to_mult()  # [T] bool
        hard = torch.stack([mask, ~mask], dim=1)  # [T, 2]
        if self.training:
            importance = probs.sum(0)  # [2]
            load = (hard.to(probs.dtype) + probs - probs.detach()).sum(0)  # [2] value = counts
            self._stats = (importance, load)
        if torch.compiler.is_exporting():
            return  # no buffer mutation in an exported graph
        with torch.no_grad():
            counts = hard.sum(0)  # [2] long, stays on device
            self.last_counts.copy_(counts)
            self.token_counts.add_(counts)

    # ---- loss and statistics ---------------------------------------------------------------------------
    def balance_loss(self) -> torch.Tensor:
        """Latency-aware load-balancing loss of the last training forward (module docstring)."""
        if not self.has_costs:
            raise ModelError(f"MoE layer '{self.layer_name}' has no cost model: pass costs= to reparameterize "
                             "(or call set_expert_costs) before training with the balance loss")
        if self._stats is None:
            raise ModelError(f"MoE layer '{self.layer_name}' has no routing statistics: run a training-mode "
                             "forward before balance_loss()")
        importance, load = self._stats
        c = self.expert_costs.to(importance.dtype)
        return cv_squared(c * importance) + cv_squared(c * load)

    def reset_routing_stats(self) -> None:
        self.token_counts.zero_()
        self.last_counts.zero_()

    def share_to_mult(self, cumulative: bool = True) -> float:
        """Fraction of tokens routed to Mult (host sync: call outside the training step's hot path)."""
        counts = (self.token_counts if cumulative else self.last_counts).double()
        total = float(counts.sum())
        return float(counts[0]) / total if total > 0 else float("nan")

    def op_counts(self, tokens: int, mult_share: float | None = None) -> dict[str, int]:
        """Operations for ``tokens`` rows at Mult share ``mult_share`` (default: the capacity if set, else
        the cumulative measured share): router + Mult expert on its share + Shift expert on the rest."""
        share = mult_share if mult_share is not None else (
            self.mult_capacity if self.mult_capacity is not None else self.share_to_mult())
        if not 0.0 <= share <= 1.0:
            raise ModelError(f"MoE layer '{self.layer_name}': no routing share known; run a forward pass or "
                             "pass mult_share=")
        n_mult = int(math.floor(share * tokens + 0.5))
        n_shift = tokens - n_mult
        k, n = self.in_features, self.out_features
        bias = self.mult.bias is not None
        # router: k multiply-adds per expert logit (k - 1 sums + bias); softmax/argmax of 2 logits not counted
        counts = {"mul": tokens * k * len(EXPERTS), "add": tokens * k * len(EXPERTS), "shift": 0}
        counts["mul"] += n_mult * k * n
        counts["add"] += n_mult * ((k - 1) * n + (n if bias else 0))
        for key, value in self.shift.op_counts(n_shift).items():
            counts[key] += value
        if self.gate_mode == "prob":
            counts["mul"] += tokens * n  # g * y
        return counts

    def __getstate__(self) -> dict:
        # The last batch's loss statistics hold autograd graph nodes, which cannot be copied or pickled.
        state = self.__dict__.copy()
        state["_stats"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, gate={self.gate_mode}, "
                f"mult_capacity={self.mult_capacity}")


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELinear]]:
    """(qualified name, module) of every MoE layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MoELinear):
            yield name, module


def moe_balance_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' balance losses of the last training forward (0 if the model has none)."""
    losses = [m.balance_loss() for _, m in moe_layers(model)]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(losses).sum()


def equilibrium_share(costs: Mapping[str, float]) -> float:
    """Mult token share at which the latency-aware balance loss vanishes: ``c_shift / (c_mult + c_shift)``.

    Both terms of :meth:`MoELinear.balance_loss` are zero iff ``c_mult·n_mult = c_shift·n_shift``, so with
    ``s = n_mult / (n_mult + n_shift)``: ``c_mult·s = c_shift·(1 - s)``. ``costs`` holds the layer's
    per-token expert costs as ``{"mult": c_mult, "shift": c_shift}``; the Shift share is ``1 -`` this.
    """
    c_mult, c_shift = costs["mult"], costs["shift"]
    if not (c_mult > 0 and c_shift > 0):
        raise ValueError(f"expert costs must be positive, got mult={c_mult}, shift={c_shift}")
    return c_shift / (c_mult + c_shift)


def routing_shares(model: nn.Module, cumulative: bool = True) -> dict[str, float]:
    """{layer: share of tokens routed to Mult} (cumulative since reset, or the last batch)."""
    return {name: m.share_to_mult(cumulative) for name, m in moe_layers(model)}


def reset_routing_stats(model: nn.Module) -> None:
    for _, m in moe_layers(model):
        m.reset_routing_stats()


def set_moe_capacity(model: nn.Module, capacity: dict[str, float | None] | float | None) -> None:
    """Set the static Mult capacity of MoE layers: one value for all, or {layer: value}."""
    layers = dict(moe_layers(model))
    if not isinstance(capacity, dict):
        capacity = dict.fromkeys(layers, capacity)
    unknown = sorted(set(capacity) - set(layers))
    if unknown:
        raise ModelError(f"no MoE layer named {', '.join(unknown)}; MoE layers: {', '.join(layers) or 'none'}")
    for name, value in capacity.items():
        layers[name].set_capacity(value)
