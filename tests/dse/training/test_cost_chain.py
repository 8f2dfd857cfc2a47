"""The chain profile -> cost model -> MoE balance-loss weights -> fine-tuned model, end to end through `dse finetune`.

A profile written by the test (formula rows, :func:`tests.conftest.write_profile`) is the only cost input; what
comes out (``costs.json``, the reloaded model's layers) must equal what the profile says, with its provenance;
a removed row turns that layer's cost into regression, which ``--strict-costs`` refuses. Then: the balance loss
is what pulls the router towards the cost model's equilibrium share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dse.checkpoints import architecture, build_dense, load_finetuned
from dse.cli import main
from dse.cost.sources import cost_model_for
from dse.profiling.inventory import build_inventory
from dse.training.finetune import finetune, moe_names, resolve_assignment
from models.moe import equilibrium_share, moe_layers
from tests.conftest import write_profile
from tests.dse.conftest import FINETUNE_TINY

QKV = "blocks.0.attn.qkv"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("chain")
    cfg = tiny_cfg()
    torch.manual_seed(0)
    dense = build_dense(cfg)
    ckpt = root / "dense.pt"
    torch.save({"model": dense.state_dict(), "meta": {"architecture": architecture(cfg), "stage": "pretrain"}}, ckpt)
    profile = write_profile(root / "profiles", cfg=cfg, batch=cfg.profile.batch)
    return cfg, dense, ckpt, profile, root


def _finetune_cli(ckpt: Path, profile: Path, out: Path, *extra: str) -> int:
    sets = [a for o in [*FINETUNE_TINY, "finetune.epochs=1"] for a in ("--set", o)]
    return main(["finetune", "--checkpoint", str(ckpt), "--profile", str(profile), "--out", str(out), *sets, *extra])


def _matmul_row_ms(profile: Path, b: int, m: int, k: int, n: int) -> float:
    """The profile's own TVM matmul latency for one shape, read from the CSV text (not through the cost model)."""
    lines = profile.read_text().splitlines()
    header = lines[0].split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if (row["primitive"], row["backend"]) == ("matmul", "tvm") and \
                tuple(int(row[c]) for c in ("batch", "m", "k", "n")) == (b, m, k, n):
            return float(row["latency_ms"])
    raise AssertionError(f"no matmul row for {(b, m, k, n)}")


def test_profile_costs_reach_the_fine_tuned_model_with_provenance(chain, tmp_path, capsys):
    cfg, dense, ckpt, profile, _ = chain
    assert _finetune_cli(ckpt, profile, tmp_path / "ft", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    costs = json.loads((tmp_path / "ft" / "costs.json").read_text())
    priced = cost_model_for(cfg, dense, profile)
    layers = costs["layers"]
    assert set(layers) == {name for name, _ in moe_layers(load_finetuned(tmp_path / "ft" / "weights.pt")[0])}
    for name, entry in layers.items():
        assert {k: entry[k] for k in ("mult", "shift")} == pytest.approx(priced.moe_expert_costs(name))
        assert entry["provenance"]["source"] == "measured" and entry["provenance"]["profile"] == str(profile)
    # independently of the cost model: the Mult expert's cost per token is the profile's matmul row / tokens
    (lw,) = [it for it in build_inventory(dense, batch=cfg.profile.batch).linears() if it.name == QKV]
    assert layers[QKV]["mult"] == pytest.approx(_matmul_row_ms(profile, lw.b, lw.m, lw.k, lw.n) / (lw.b * lw.m))
    assert costs["sources"] == {"measured": len(layers)} and summary["cost_sources"] == {"measured": len(layers)}
    # the reloaded model's layers hold the same costs and the same provenance (the checkpoint's meta)
    model, _ = load_finetuned(tmp_path / "ft" / "weights.pt")
    for name, layer in moe_layers(model):
        assert layer.expert_costs.tolist() == pytest.approx([layers[name]["mult"], layers[name]["shift"]])
        assert layer.cost_provenance == layers[name]["provenance"]


def test_a_removed_row_turns_the_cost_into_regression_and_strict_refuses_it(chain, tmp_path, capsys):
    cfg, dense, ckpt, profile, root = chain
    (lw,) = [it for it in build_inventory(dense, batch=cfg.profile.batch).linears() if it.name == QKV]
    cut = tmp_path / "profiles" / profile.parent.name / profile.name
    cut.parent.mkdir(parents=True)
    cut.with_suffix(".yaml").write_text(profile.with_suffix(".yaml").read_text())
    prefix = f"matmul,tvm,{lw.b},{lw.m},{lw.k},{lw.n},"
    lines = profile.read_text().splitlines(keepends=True)
    cut.write_text("".join(line for line in lines if not line.startswith(prefix)))
    assert len(cut.read_text().splitlines()) == len(lines) - 1

    assert _finetune_cli(ckpt, cut, tmp_path / "ft") == 0
    out = capsys.readouterr().out
    layers = json.loads((tmp_path / "ft" / "costs.json").read_text())["layers"]
    record = layers[QKV]["provenance"]
    assert record["experts"]["mult"]["source"] == "regression" and record["laws"][0]["primitive"] == "matmul"
    assert record["source"] == "mixed" and "loo_rmspe" in record["laws"][0]
    assert {layers[n]["provenance"]["source"] for n in layers if n != QKV} == {"measured"}
    assert f"{QKV}: mixed (mult regression, shift measured)" in out  # the command says so too

    assert _finetune_cli(ckpt, cut, tmp_path / "strict", "--strict-costs") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cost.strict: the MoE expert costs of {QKV} are mixed") and "\n" not in err
    assert not (tmp_path / "strict" / "weights.pt").exists()
    assert _finetune_cli(ckpt, profile, tmp_path / "strict-ok", "--strict-costs") == 0  # all measured: accepted


def test_the_balance_loss_pulls_the_router_towards_the_equilibrium(chain, tmp_path, tiny_cfg):
    """Same seed, same data: with the balance loss the Mult share ends closer to the equilibrium of the costs
    given than without it (coefficient 0), and opposite costs pull it to opposite sides."""
    _, dense, ckpt, _, _ = chain
    names = moe_names(resolve_assignment(dense, None))
    shares = {}
    for label, coef, (c_mult, c_shift) in (("free", 0.0, (1.0, 4.0)), ("cheap mult", 2.0, (1.0, 4.0)),
                                            ("cheap shift", 2.0, (4.0, 1.0))):
        costs = {name: {"mult": c_mult, "shift": c_shift} for name in names}
        cfg = tiny_cfg("finetune.epochs=2", f"finetune.moe_coef={coef}", "finetune.kd_weight=0")
        summary = finetune(cfg, tmp_path / label.replace(" ", "_"), checkpoint=ckpt, costs=costs, progress=False)
        assert summary["equilibrium"] == {name: pytest.approx(c_shift / (c_mult + c_shift)) for name in names}
        shares[label] = sum(summary["routing_end"].values()) / len(names)
    eq_cheap_mult = equilibrium_share({"mult": 1.0, "shift": 4.0})  # 0.8 of the tokens to Mult
    assert abs(shares["cheap mult"] - eq_cheap_mult) < abs(shares["free"] - eq_cheap_mult) - 0.05, shares
    assert shares["cheap mult"] > shares["cheap shift"] + 0.2, shares
