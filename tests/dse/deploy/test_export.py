"""dse export: the compiled graph holds the project's kernels, matches PyTorch, and ships as a verified,
torch-free artifact (plus a compile-only CUDA one).

One small but trained model serves every test (the session fixtures ``shiftadd_checkpoint`` and ``artifact``
of ``tests/dse/conftest.py``): a 2-block vit_digits pretrained for 4 epochs, then
reparameterised with a mixed assignment (Hamming and softmax attention, shift, mult and MoE Linears) and
its hash fitted — realistic weights, so top-1 agreement is a meaningful check. The PyTorch reference is
computed here, independently of the exporter's own check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[3]


def _reference(checkpoint: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val images, labels, PyTorch logits of the export form, batch by batch as the artifact runs)."""
    from dse.checkpoints import load_finetuned
    from dse.config import load_config
    from dse.deploy.export import logits_of, val_tensors
    from dse.deploy.graph import export_form
    from models.moe import set_moe_capacity

    cfg = load_config(checkpoint / "resolved_config.yaml")
    x, y = val_tensors(cfg)  # all 360 validation images
    model, _ = load_finetuned(checkpoint / "weights.pt")
    set_moe_capacity(model, manifest["moe"]["capacity"])  # calibrated by the exporter
    prims = {name: entry["primitive"] for name, entry in manifest["shift_primitives"].items()}
    form = export_form(model, lambda name, _layer: prims[name])
    return x.numpy(), y.numpy(), logits_of(form, x, int(manifest["input"]["batch"])).numpy()


# ---------------------------------------------------------------------------------------------------
# The graph


def test_relax_module_calls_the_kernels(shiftadd_checkpoint, shiftadd_spec):
    """The imported Relax module: kernel PrimFuncs by name, reached through call_tir from main(), one per
    shift primitive as chosen per layer; shift weights enter as int8 arrays."""
    from dse.checkpoints import load_finetuned
    from dse.config import load_config
    from dse.deploy import graph
    from dse.deploy.export import calibrate_capacity, val_tensors

    cfg = load_config(shiftadd_checkpoint / "resolved_config.yaml")
    x, _ = val_tensors(cfg, 32)
    model, _ = load_finetuned(shiftadd_checkpoint / "weights.pt")
    capacity = calibrate_capacity(model, x, 8)
    assert set(capacity) == set(shiftadd_spec.costs) and all(0.0 < v < 1.0 for v in capacity.values())
    integer = {"blocks.0.attn.qkv", "blocks.1.mlp.fc1.shift"}
    form = graph.export_form(model, lambda name, _l: "matshift" if name in integer else "matshift_decode")
    g = graph.to_relax(form, x[:8].contiguous(), "cpu")

    names = {gv.name_hint for gv in g.mod.functions}
    called = graph.call_tir_targets(g.mod)
    by_prim: dict[str, set[str]] = {}
    for name in called:
        if name in g.kernel_calls:
            by_prim.setdefault(g.kernel_calls[name], set()).add(name)
    assert set(by_prim) == {"matshift", "matshift_decode", "matadd", "matmul", "bmm"}
    assert all(n.startswith("shiftadd_") and n in names for fns in by_prim.values() for n in fns)
    # blocks.0.attn.qkv: 8 images x 65 tokens, 48 -> 144, on the integer kernel
    assert "shiftadd_matshift_b1_m520_k48_n144" in by_prim["matshift"]
    # the two products of the one Hamming attention, each split into a lane-multiple and a tail call
    products: dict[tuple[int, ...], int] = {}
    for name in by_prim["matadd"]:
        b, m, k, n = g.kernel_shapes[name]
        products[(b, m, k)] = products.get((b, m, k), 0) + n
    assert products == {(24, 32, 65): 17, (24, 65, 32): 17}  # [24 = 8 images x 3 heads, 2*16 bits, d + 1]
    assert g.kernel_shapes["shiftadd_matshift_b1_m520_k48_n144"] == (1, 520, 48, 144)
    assert g.params["blocks.0.attn.qkv.shift"].dtype == np.int8
    assert g.params["blocks.0.attn.qkv.sign"].dtype == np.int8
    assert not any(n.startswith("blocks.0.attn.qkv.weight") for n in g.param_names)
    assert list(g.params) == g.param_names
    # the CPU GEMMs take pre-packed weights: the packing depends on parameters only and leaves the forward
    from tvm import relax

    packs = {n for n in called if n.startswith("shiftadd_pack_")}
    assert packs and all(n.split("_pack_")[1].startswith(("matmul", "matshift_decode")) for n in packs)
    lifted = relax.transform.LiftTransformParams()(g.mod)
    assert not [n for n in graph.call_tir_targets(lifted) if n.startswith("shiftadd_pack_")]
    assert packs <= set(graph.call_tir_targets(lifted, "main_transform_params"))


def test_kernels_are_tuned_beside_the_profiles_not_in_the_install(shiftadd_checkpoint, tmp_path, monkeypatch):
    """Every kernel the graph builds asks for its records under the configured profile root."""
    from dse.checkpoints import load_finetuned
    from dse.config import load_config
    from dse.deploy import graph
    from dse.deploy.export import val_tensors
    from dse.profiling.profiler import Settings

    cfg = load_config(shiftadd_checkpoint / "resolved_config.yaml", [f"profile.dir={tmp_path / 'store'}"])
    assert cfg.profile.tuning_dir == tmp_path / "store" / "tuning"
    assert Settings.from_config(cfg.profile).tuning_dir == str(tmp_path / "store" / "tuning")
    asked = []
    real = graph.kernels.build

    def spy(*args, **kwargs):
        asked.append(kwargs.get("tuning_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(graph.kernels, "build", spy)
    x, _ = val_tensors(cfg, 8)
    model, _ = load_finetuned(shiftadd_checkpoint / "weights.pt")
    form = graph.export_form(model, lambda name, _l: "matshift")
    graph.to_relax(form, x[:8].contiguous(), "cpu", tuning_dir=cfg.profile.tuning_dir)
    assert asked and set(asked) == {cfg.profile.tuning_dir}


def test_fast_layer_norm_and_gelu_match_pytorch():
    """The pipeline's own LayerNorm kernel and fast-erf GELU against PyTorch."""
    import tvm
    from tvm import relax

    from kernels.relax_pipeline import compile_relax

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 65, 96)) * 3 + 1).astype("float32")
    gamma, beta = rng.standard_normal(96).astype("float32"), rng.standard_normal(96).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    gv = relax.Var("g", relax.TensorType((96,), "float32"))
    bv = relax.Var("b", relax.TensorType((96,), "float32"))
    with bb.function("main", [xv, gv, bv]):
        with bb.dataflow():
            ln = bb.emit(relax.op.nn.layer_norm(xv, gv, bv, axes=[-1], epsilon=1e-6))
            out = bb.emit_output(bb.emit(relax.op.nn.gelu(ln)))
        bb.emit_func_output(out)
    mod = bb.get()
    exe = compile_relax(mod, "cpu")
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in (x, gamma, beta))).numpy()
    ref = torch.nn.functional.gelu(torch.nn.functional.layer_norm(
        torch.from_numpy(x), (96,), torch.from_numpy(gamma), torch.from_numpy(beta), 1e-6)).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    import kernels
    from kernels.row_kernels import row_kernels_pass

    rewritten = row_kernels_pass(kernels.resolve_target("cpu"))(mod)
    assert any(gv.name_hint.startswith("dse_layer_norm_r130_c96") for gv in rewritten.functions)


# ---------------------------------------------------------------------------------------------------
# The artifact


def _near_ties(checkpoint: Path, manifest: dict, x: np.ndarray, batch: int, tol: float = 1e-5) -> np.ndarray:
    """Images whose forward takes a discrete decision within noise of its threshold: a hash bit
    ``1[z > 0]`` with ``|z| < tol·||t||``, or a MoE token at the capacity boundary whose router probability
    is within ``tol`` of its neighbour's. Two correct programs that sum in different orders may decide these
    differently (a query code with one bit flipped), which moves that image's logits by far more than
    rounding error; every other image must match to 1e-3. The noise is not float32's 1e-7: an integer
    matshift layer rounds its input to a fixed-point grid, and a one-step difference there reaches q and k
    at about 1e-5 of their norm."""
    import torch

    from dse.checkpoints import load_finetuned
    from models.hamming import HammingAttention
    from models.moe import MoELinear, set_moe_capacity

    model, _ = load_finetuned(checkpoint / "weights.pt")
    set_moe_capacity(model, manifest["moe"]["capacity"])
    model.eval()
    flagged = np.zeros(len(x), bool)
    current: list[int] = [0]
    bits, cap_forward = HammingAttention._bits, MoELinear._capacity_forward

    def hooked_bits(self, t, keys):
        hard, z = bits(self, t, keys)  # z: [B,H,N,nb]
        rel = (z.abs() / t.norm(dim=-1, keepdim=True).clamp_min(1e-30)).flatten(1).min(1).values  # [B]
        flagged[current[0]:current[0] + len(rel)] |= (rel < tol).numpy()
        return hard, z

    def hooked_capacity(self, xt, probs):
        total = xt.shape[0]
        cap = int(np.floor(self.mult_capacity * total + 0.5))
        if 0 < cap < total:
            order = torch.argsort(probs[:, 0], descending=True)
            p = probs[order, 0]
            tokens = total // batch
            for pos in torch.nonzero((p[:-1] - p[1:]).abs() < tol).flatten().tolist():
                if pos - 2 < cap <= pos + 2:  # a near-tie that straddles the boundary
                    for tok in (order[pos], order[pos + 1]):
                        flagged[current[0] + int(tok) // tokens] = True
        return cap_forward(self, xt, probs)

    HammingAttention._bits, MoELinear._capacity_forward = hooked_bits, hooked_capacity
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                current[0] = i
                model(torch.from_numpy(x[i:i + batch]))
    finally:
        HammingAttention._bits, MoELinear._capacity_forward = bits, cap_forward
    return flagged


def test_artifact_matches_pytorch_on_the_validation_set(artifact, shiftadd_checkpoint, shiftadd_spec):
    from dse.deploy.artifact import Artifact

    manifest = yaml.safe_load((artifact / "manifest.yaml").read_text())
    x, y, ref = _reference(shiftadd_checkpoint, manifest)
    assert len(x) == 360
    got = Artifact.load(artifact).predict(x)
    errs = np.abs(got - ref).max(1) / np.abs(ref).max(1)  # [images] relative to each image's largest logit
    ties = _near_ties(shiftadd_checkpoint, manifest, x, int(manifest["input"]["batch"]))
    # Each image takes ~25k hash decisions (65 tokens x 3 heads x 2x16 bits x 4 blocks, q and k), so a share
    # of images always holds one within 1e-5 of its threshold: measured 55 and 208 of 360 on two CI runs (one
    # of the 55, a query code, off by 5.7e-3). Those still count below (top-1 on all, at most 1% off by 1e-3).
    print(f"near-tie images: {ties.sum()} of {len(x)}; max error elsewhere {errs[~ties].max():.2e}")
    assert (~ties).sum() >= 0.25 * len(x), f"only {(~ties).sum()} images without a near-tie to check strictly"
    assert errs[~ties].max() <= 1e-3, f"max relative logit error {errs[~ties].max():.2e} away from near-ties"
    assert (errs > 1e-3).mean() <= 0.01, f"{(errs > 1e-3).sum()} images off by more than 1e-3"
    assert (got.argmax(1) == ref.argmax(1)).all()  # on every image, near-ties included
    assert np.median(errs) <= 1e-4
    assert (ref.argmax(1) == y).mean() > 0.15  # trained weights, clearly above chance (10%); measured 0.19
    assert {e["primitive"] for e in manifest["shift_primitives"].values()} >= {"matshift"}
    acc = manifest["accuracy"]
    checked = shiftadd_spec.check_images
    assert acc["val_images"] == checked
    assert acc["compiled_val_acc"] == pytest.approx(100.0 * (got[:checked].argmax(1) == y[:checked]).mean())
    assert acc["top1_agreement"] == 1.0 and acc["median_rel_logit_err"] <= 1e-4


def test_artifact_folder_and_manifest(artifact, shiftadd_spec):
    from dse.deploy.artifact import verify
    from dse.fileio import sha256_file

    manifest = yaml.safe_load((artifact / "manifest.yaml").read_text())
    assert verify(artifact)["files"] == manifest["files"]
    assert set(manifest["files"]) == {"model.so", "weights.npz", "assignment.yaml"}
    for name, digest in manifest["files"].items():
        assert sha256_file(artifact / name) == digest
    assert manifest["run_on_device"] is True
    assert manifest["target"]["kind"] == "llvm" and manifest["input"]["shape"] == [8, 3, 32, 32]
    assert manifest["latency"]["measured"]["median_ms"] > 0
    prims = {k["primitive"] for k in manifest["kernels"]}
    assert {"matadd", "matmul", "bmm"} <= prims and prims & {"matshift", "matshift_decode"}
    assert all(k["calls"] >= 1 for k in manifest["kernels"])
    # the kernels listed are those the BUILT library defines (read from the loaded model.so, not the graph)
    import tvm

    lib = tvm.runtime.load_module(str(artifact / "model.so"))
    assert all(lib.implements_function(k["function"], True) for k in manifest["kernels"])
    assert not lib.implements_function("matshift_no_such_kernel", True)  # the probe can say no
    assert manifest["library"]["pipeline"] == "project" and manifest["library"]["kernels_missing"] == []
    assert set(manifest["moe"]["capacity"]) == set(shiftadd_spec.costs)
    with np.load(artifact / "weights.npz") as npz:
        assert list(manifest["params"]) == [n for n in manifest["params"] if n in npz.files]
        assert npz["blocks.0.attn.qkv.shift"].dtype == np.int8 and npz["blocks.0.attn.qkv.sign"].dtype == np.int8
        assert set(np.unique(npz["blocks.0.attn.qkv.sign"])) <= {-1, 0, 1}
        assert "blocks.0.attn.qkv.weight" not in npz.files
    saved = yaml.safe_load((artifact / "assignment.yaml").read_text())
    assert saved["linear"] == shiftadd_spec.assignment["linear"] and set(saved["capacity"]) == set(shiftadd_spec.costs)


def test_cuda_companion_is_compile_only(artifact):
    from dse.deploy.artifact import verify

    cuda = artifact / "cuda-sm_90"
    manifest = verify(cuda)
    assert manifest["run_on_device"] is False
    assert manifest["target"]["kind"] == "cuda" and manifest["target"]["arch"] == "sm_90"
    assert manifest["latency"]["measured"] is None and manifest["accuracy"]["compiled_val_acc"] is None
    assert (cuda / "model.so").stat().st_size > 0
    assert {k["primitive"] for k in manifest["kernels"]} >= {"matadd", "matmul"}


LOADER = r"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from dse.deploy.artifact import Artifact
art = Artifact.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], art.predict(x))
assert sys.modules["torch"] is None
"""


def test_loader_runs_without_torch(artifact, tmp_path):
    from dse.deploy.artifact import Artifact

    rng = np.random.default_rng(1)
    x = rng.standard_normal((11, 3, 32, 32)).astype("float32")  # not a multiple of the batch
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", LOADER, str(artifact), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    assert got.shape == (11, 10)
    np.testing.assert_allclose(got, Artifact.load(artifact).predict(x), rtol=0, atol=1e-5)


def test_tampered_artifact_is_refused_before_loading(artifact, tmp_path, monkeypatch, dse_cli):
    import shutil

    import tvm

    from dse.deploy.artifact import Artifact, ArtifactError

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    with open(bad / "weights.npz", "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))

    def no_load(*_a, **_k):
        raise AssertionError("the library was loaded before its checksum was verified")

    monkeypatch.setattr(tvm.runtime, "load_module", no_load)
    with pytest.raises(ArtifactError, match="weights.npz fails its checksum"):
        Artifact.load(bad)
    res = dse_cli("bench", "--artifact", str(bad), "--no-compile", timeout=300)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum" in lines[0]

    (bad / "model.so").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Artifact.load(bad)


def test_a_pinned_manifest_digest_catches_a_rewritten_artifact(artifact, tmp_path, dse_cli):
    """Checksums beside the files catch damage; one who also rewrites the manifest passes them, not the pin."""
    import hashlib
    import shutil

    from dse.deploy.artifact import Artifact, ArtifactError, manifest_digest, verify

    pin = hashlib.sha256((artifact / "manifest.yaml").read_bytes()).hexdigest()
    assert manifest_digest(artifact) == pin
    assert Artifact.load(artifact, expected_digest=pin).manifest["target_slug"]
    forged = tmp_path / "forged"
    shutil.copytree(artifact, forged)
    with open(forged / "weights.npz", "r+b") as fh:  # other weights ...
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    manifest = yaml.safe_load((forged / "manifest.yaml").read_text())
    manifest["files"]["weights.npz"] = hashlib.sha256((forged / "weights.npz").read_bytes()).hexdigest()
    (forged / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))  # ... and checksums to match
    assert verify(forged)["files"]["weights.npz"] == manifest["files"]["weights.npz"]  # the checksums pass
    with pytest.raises(ArtifactError, match="not the pinned"):
        Artifact.load(forged, expected_digest=pin)
    res = dse_cli("bench", "--artifact", str(forged), "--expect-digest", pin, "--no-compile", timeout=300)
    assert res.returncode == 1 and res.stderr.strip().startswith("error: ") and "not the pinned" in res.stderr


def test_export_prices_with_the_profile_of_the_device_it_targets(tmp_path):
    """No profile of this machine: exporting for another device's target uses that device's profile, and
    says which it lacks or which to choose."""
    from dse.config import Config
    from dse.deploy.export import profile_table
    from tests.conftest import write_profile

    cfg = Config()
    cfg.profile.dir = str(tmp_path / "profiles")
    znver4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
    table, reason = profile_table(cfg, znver4, None)
    assert table is None and "no profile for target llvm-znver4-2c" in reason
    epyc = {"kind": "cpu", "name": "AMD EPYC 9R14", "slug": "amd-epyc-9r14", "cores": 2}
    path = write_profile(tmp_path / "profiles", device=epyc, target=znver4)
    table, reason = profile_table(cfg, znver4, None)
    assert reason == str(path) and table.profile.meta["device"]["slug"] == "amd-epyc-9r14"
    write_profile(tmp_path / "profiles", device=dict(epyc, slug="amd-epyc-9654", name="AMD EPYC 9654"),
                  target=znver4)
    table, reason = profile_table(cfg, znver4, None)
    assert table is None and "several devices" in reason and "--profile" in reason
    table, reason = profile_table(cfg, znver4, path)  # named: used, from any device
    assert reason == str(path)


def test_bench_refuses_a_manifest_listing_shift_kernels_the_library_lacks(artifact, tmp_path, dse_cli):
    import hashlib
    import shutil

    from dse.deploy.artifact import Artifact, ArtifactError

    lying = tmp_path / "lying"
    shutil.copytree(artifact, lying)
    manifest = yaml.safe_load((lying / "manifest.yaml").read_text())
    row = next(k for k in manifest["kernels"] if k["primitive"] in ("matshift", "matshift_decode"))
    row["function"] = row["function"] + "_absent"  # a kernel the graph named but the build did not produce
    (lying / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    loaded = Artifact.load(lying)
    with pytest.raises(ArtifactError, match=f"lacks 1 shift/add kernel.*{row['function']}.*compile pipeline project"):
        loaded.check_kernels()
    Artifact.load(artifact).check_kernels()  # the real one passes
    pin = hashlib.sha256((lying / "manifest.yaml").read_bytes()).hexdigest()
    res = dse_cli("bench", "--artifact", str(lying), "--expect-digest", pin, "--no-compile", "--no-dense-tvm",
                  timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "_absent" in lines[0]


def test_compile_relax_records_the_fallback_to_tvms_default_pipeline(monkeypatch):
    """The project's pipeline failing on a module is recorded (pipeline tvm-default and why), not only logged."""
    import tvm
    from tvm import relax

    from kernels import relax_pipeline
    from kernels.compiled import library_functions

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.relu(xv)))
        bb.emit_func_output(out)
    mod = bb.get()
    ok = relax_pipeline.compile_relax_recorded(mod, "cpu")
    assert ok.pipeline == "project" and ok.fallback_reason is None
    assert any("relu" in f for f in library_functions(ok.executable))

    def broken(_target):
        raise RuntimeError("a schedule rule rejected the module")

    monkeypatch.setattr(relax_pipeline, "relax_pipeline", broken)
    fell = relax_pipeline.compile_relax_recorded(mod, "cpu")
    assert fell.pipeline == "tvm-default" and "schedule rule rejected" in fell.fallback_reason
    x = np.linspace(-1, 1, 32, dtype="float32").reshape(4, 8)
    got = relax.VirtualMachine(fell.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, np.maximum(x, 0))
