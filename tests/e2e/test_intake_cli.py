"""Bring your own model through the CLI: Hugging Face MoE and BitNet folders, full pickles with --input,
two-input models end to end (export, int8 from an npz of every input, bench, compare), inspect of a folder.

Per covered architecture (Mixtral; Qwen3-MoE without renormalization; Qwen3-Next with its gated attention,
gated shared experts and delta-net layers; DeepSeek-V3 with sigmoid scores, a score-correction bias, a
scale and a shared expert): a tiny trained model of the library's own config class is saved with
``save_pretrained`` and exported by ``edgegate export FOLDER``; fp32 ONNX Runtime logits match
transformers, one ``TopKGate`` per MoE layer and a ``SigmoidGate`` per gate are in the graph, and the
gate-aware int8 export keeps the top-k expert sets on held-out tokens. A BitNet folder exports as 2-bit
``TernaryMatMul`` and passes its golden check.

One export runs the CLI in a subprocess as a user does; the others call ``edgegate.cli.main`` in this
process (the same parser and commands) so the tests do not pay torch's and transformers' import each time.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegate.cli import main
from tests._cli import edgegate

SEQ = 16


def _qwen3_moe(transformers):
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                                      norm_topk_prob=False, initializer_range=0.2)
    return transformers.Qwen3MoeForCausalLM(cfg)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (folder written by save_pretrained, the transformers model itself); seeded, < 1M parameters."""
    transformers = pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = _qwen3_moe(transformers).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.save_pretrained(work / "qwen3_moe")
    return {"qwen3_moe": (work / "qwen3_moe", model)}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``edgegate ARGS...`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _cli_quiet(*args: str) -> tuple[int, str]:
    """``edgegate ARGS...`` in this process, for module-scoped fixtures (no capsys): (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def _ort(bundle: Path, feeds: dict[str, np.ndarray], file: str = "model.onnx") -> np.ndarray:
    session = ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


# ------------------------------------------------------------------------------ trained tiny HF architectures

# (MoE layers, sigmoid gates: gated shared experts + gated attention layers)
EXPECTED = {"mixtral": (2, 0), "qwen3_moe": (2, 0), "qwen3_next": (2, 3), "deepseek_v3": (2, 0)}
CALIB_ROWS, HELD_ROWS = 256, 64  # token windows of 8; --holdout 0.2 of the 320 rows in tokens.npz
# The default fidelity search runs (a router's top-k set meets 0.995 at the first try); the cpu target's latency
# pass has its own tests and times the graph, so it is off here.
INT8_OPTIONS = ("-O", "latency_aware=false")


@pytest.fixture(scope="module")
def zoo_work(tmp_path_factory) -> Path:
    """A folder with tokens.npz: calibration windows, then as many held-out ones as --holdout 0.2 sets aside."""
    pytest.importorskip("transformers")
    from tests.unit import _hf

    work = tmp_path_factory.mktemp("zoo")
    _, calib, held = _hf.markov()
    np.savez(work / "tokens.npz", input_ids=np.concatenate([calib.input()[:CALIB_ROWS], held.input()[:HELD_ROWS]]))
    return work


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def zoo_bundles(request, zoo_work) -> dict:
    """One architecture: trained, saved with save_pretrained, exported by the CLI as fp32 and as int8."""
    from tests.unit import _hf

    arch = request.param
    model = _hf.trained(arch)
    assert _hf.n_params(model) < 1_000_000
    folder = zoo_work / arch
    model.lm.save_pretrained(folder)
    inputs = ("--input", f"input_ids:1x{_hf.CONTEXT}:int64")
    fp32, int8 = zoo_work / f"{arch}.edgegate", zoo_work / f"{arch}.int8.edgegate"
    if arch == "mixtral":  # the user's path: a fresh process
        r = edgegate("export", arch, *inputs, "-o", fp32.name, cwd=zoo_work)
        assert r.returncode == 0, r.stderr
    else:
        code, err = _cli_quiet("export", folder, *inputs, "-o", fp32)
        assert code == 0, err
    code, err = _cli_quiet("export", folder, *inputs, "--quant", "int8", "--calib", zoo_work / "tokens.npz",
                           "--holdout", "0.2", *INT8_OPTIONS, "-o", int8)
    assert code == 0, err
    _, _, held = _hf.markov()
    return {"arch": arch, "model": model, "fp32": fp32, "int8": int8, "held": held.input()[HELD_ROWS:2 * HELD_ROWS]}


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _ops(bundle: Path) -> tuple[onnx.ModelProto, Counter]:
    graph = onnx.load(str(bundle / "model.onnx"))
    return graph, Counter(n.op_type for n in graph.graph.node)


def test_hf_folder_fp32_cli_export_matches_transformers_with_its_gates(zoo_bundles):
    arch, bundle = zoo_bundles["arch"], zoo_bundles["fp32"]
    moe_layers, sigmoid_gates = EXPECTED[arch]
    m = _manifest(bundle)
    assert m["source"]["format"] == "hf-folder" and m["export"]["inputs"] == [
        {"name": "input_ids", "shape": [8], "dtype": "int64"}]
    conversion = m["conversion"]
    assert conversion["max_abs_err"] <= 1e-4 and max(conversion["modules"].values()) <= 1e-4
    assert Counter(c["family"] for c in conversion["converted"])["router"] == moe_layers
    kinds = Counter(g["kind"] for g in m["gates"]["gates"])
    assert (kinds["router"], kinds["sigmoid"]) == (moe_layers, sigmoid_gates)
    graph, ops = _ops(bundle)
    assert (ops["TopKGate"], ops["SigmoidGate"]) == (moe_layers, sigmoid_gates)
    # Qwen3-Next's delta-net layers export in their compact form (transformers' own: ~1500 nodes a layer).
    assert len(graph.graph.node) < 600
    # Each expert is three 2-D matrices of its own (quantized per expert, per output channel), never a
    # slice of the fused 3-D parameters.
    weights = {t.name: tuple(t.dims) for t in graph.graph.initializer if t.name.endswith("weight")}
    experts = [n for n in weights if ".experts." in n]
    assert len(experts) == 3 * 4 * moe_layers and all(len(weights[n]) == 2 for n in experts)
    assert all(len(dims) <= 2 for dims in weights.values())
    x = zoo_bundles["held"]
    with torch.no_grad():
        want = zoo_bundles["model"](torch.from_numpy(x)).numpy()
    got = _ort(bundle, {"input_ids": x})
    assert got.shape == (HELD_ROWS, 8, 16)
    assert float(np.abs(got - want).max()) <= 1e-3


def test_hf_folder_int8_cli_export_keeps_the_experts_on_held_out_tokens(zoo_bundles):
    arch, bundle = zoo_bundles["arch"], zoo_bundles["int8"]
    moe_layers, sigmoid_gates = EXPECTED[arch]
    m = _manifest(bundle)
    q = m["quant"]
    assert q["samples"] == CALIB_ROWS and q["holdout"] == 0.2
    fid = q["fidelity"]
    assert fid["measured_on"] == "held_out" and fid["samples"] == HELD_ROWS
    routers = {name: g for name, g in fid["gates"].items() if g["kind"] == "router"}
    assert len(routers) == moe_layers
    for g in routers.values():  # every held-out token's expert set, in every MoE layer
        assert g["rows"] == HELD_ROWS * 8 and g["topk_set_agreement"] >= 0.98
    # Routers and gate projections stayed float; every expert of every MoE layer was calibrated on its tokens.
    for router in routers:
        assert f"{router}.proj" in q["float_layers"]
    for gate in (g for g in m["gates"]["gates"] if g["kind"] == "sigmoid"):
        projection = "gate" if gate["module"] == "GatedSharedExpert" else "gate_proj"
        assert f"{gate['name']}.{projection}" in q["float_layers"]
    slots = q["calibrated"]["slots"]
    assert len(slots) == moe_layers and all(min(rows) > 0 for rows in slots.values())
    assert len([p for p in q["calibrated"]["layers"] if ".experts." in p]) == 3 * 4 * moe_layers
    _, ops = _ops(bundle)
    assert ops["QuantizeLinear"] > 0 and (ops["TopKGate"], ops["SigmoidGate"]) == (moe_layers, sigmoid_gates)
    # ONNX Runtime's int8 graph follows the fake-quantized model (the golden check, next tokens of 64 rows).
    assert m["golden"]["vs_torch"]["logits_top1_agreement"] >= 0.97


# --------------------------------------------------------------------------------------------------- BitNet

@pytest.fixture(scope="module")
def bitnet(tmp_path_factory) -> dict:
    """A packed BitNet b1.58 folder (uint8 codes + weight_scale, as released checkpoints ship) exported fp32."""
    zoo = pytest.importorskip("edgegate.zoo.hf")
    pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("bitnet")
    model = zoo.packed_bitnet()
    model.save_pretrained(work / "bitnet")
    code, err = _cli_quiet("export", work / "bitnet", "--input", "input_ids:1x8:int64", "-o", work / "b.edgegate")
    assert code == 0, err
    return {"model": model, "bundle": work / "b.edgegate", "folder": work / "bitnet"}


def test_bitnet_folder_exports_its_ternary_codes_at_2_bits(bitnet):
    from edgegate.zoo.hf import BITNET_LAYERS, markov

    bundle, layers = bitnet["bundle"], 2 * BITNET_LAYERS
    m = _manifest(bundle)
    assert m["model"]["class"] == "transformers:BitNetForCausalLM"
    conversion = m["conversion"]
    assert Counter(c["family"] for c in conversion["converted"]) == {"ternary": layers}
    assert max(conversion["modules"].values()) <= 1e-5
    assert conversion["end_to_end"] == "recorded (in-graph activation rounding)"
    graph, ops = _ops(bundle)
    assert ops["TernaryMatMul"] == layers and sum(n.domain == "edgegate" for n in graph.graph.node) == layers
    ternary = sum(g["details"]["in_features"] * g["details"]["out_features"] for g in m["gates"]["gates"]
                  if g["kind"] == "ternary")
    packed = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sum(int(np.prod(t.dims)) for t in packed) * 4 == ternary  # 2 bits per weight
    matrices = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert len(matrices) == 2, matrices  # the embedding and lm_head: no ternary layer is stored as floats
    # The fp32 export passed its golden check against the converted model (the export refuses otherwise).
    assert m["golden"]["samples"] == 64 and m["golden"]["vs_torch"]["logits_top1_agreement"] >= 0.99
    x = markov()[2].input()[:64]
    got = _ort(bundle, {"input_ids": x})
    with torch.no_grad():
        want = bitnet["model"](input_ids=torch.from_numpy(x), use_cache=False).logits.numpy()
    # Per-token 8-bit activation rounding sits inside the graph: a value within an ulp of a rounding
    # boundary may round the other way in ORT, moving that token's logits by a quantization step. Every
    # other logit matches to float round-off and the predicted tokens all agree.
    assert np.mean(np.abs(got - want) <= 1e-4) >= 0.99 and np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99
    assert float(np.abs(got - want).max()) <= 0.02 * float(np.abs(want).max())


def test_inspect_says_what_export_would_find_in_a_folder(bitnet, capsys):
    code, out, err = cli(capsys, "inspect", bitnet["folder"], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "model" and info["format"] == "hf-folder" and info["architecture"] == "bitnet"
    assert [(c["source_class"].rpartition(":")[2], c["target_class"].rpartition(":")[2], c["modules"])
            for c in info["converters"]] == [("BitLinear", "TernaryLinear", 14)]
    assert Counter(g["kind"] for g in info["gates"]["gates"]) == {"ternary": 14}
    code, out, err = cli(capsys, "inspect", bitnet["folder"])
    assert code == 0, err
    assert "(Hugging Face model folder)" in out and "14 x BitLinear -> TernaryLinear (ternary)" in out


def test_token_model_with_attention_mask_int8_holdout_bench_compare(hf, capsys):
    folder, model = hf["qwen3_moe"]
    work = folder.parent
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 64, (160, SEQ))
    mask = np.ones((160, SEQ), np.int64)
    mask[::4, :5] = 0  # left padding on a quarter of the rows
    np.savez(work / "tokens.npz", input_ids=ids, attention_mask=mask)
    inputs = ("--input", f"input_ids:1x{SEQ}:int64", "--input", f"attention_mask:1x{SEQ}:int64")
    bundle = work / "q8.edgegate"
    # The cpu target's latency pass times the int8 graph with both inputs; the fidelity search is not the point.
    code, _, err = cli(capsys, "export", folder, *inputs, "--quant", "int8", "--calib", work / "tokens.npz",
                       "--holdout", "0.25", "--fidelity-target", "0", "-o", bundle)
    assert code == 0, err
    m = json.loads((bundle / "manifest.json").read_text())
    assert [i["name"] for i in m["export"]["inputs"]] == ["input_ids", "attention_mask"]
    assert m["quant"]["samples"] == 120 and m["quant"]["holdout"] == 0.25
    fid = m["quant"]["fidelity"]
    assert fid["measured_on"] == "held_out" and fid["samples"] == 40 and fid["top1_agreement"] >= 0.9
    golden = np.load(bundle / "golden_io.npz")
    assert golden["input.attention_mask"].shape == golden["input.input_ids"].shape == (40, SEQ)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids[:40]), attention_mask=torch.from_numpy(mask[:40]),
                     use_cache=False).logits.numpy()
    got = _ort(bundle, {"input_ids": ids[:40], "attention_mask": mask[:40]})
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.85  # int8 next-token choice vs transformers

    code, out, err = cli(capsys, "bench", bundle, "--runs", "5", "--warmup", "1")
    assert code == 0, err
    assert "Golden check : passed on 40 samples" in out
    code, out, err = cli(capsys, "compare", folder, bundle, "--data", work / "tokens.npz", "--max-samples", "32",
                         "--runs", "3", "--warmup", "1", "--json", work / "c.json")
    assert code == 0, err
    row = json.loads((work / "c.json").read_text())["rows"][1]
    # compare fed both inputs to both sides: its agreement is the one computed here from the same 32 rows
    expected = float((got[:32].argmax(-1) == want[:32].argmax(-1)).mean())
    assert abs(row["metrics"]["top1_agreement"] - expected) <= 2 / (32 * SEQ)
    assert row["recorded"]["measured_on"] == "held_out" and row["recorded"]["samples"] == 40


USER_CODE = '''
import torch
from torch import nn


class AudioLike(nn.Module):
    """Two inputs like silero-vad: a frame x [B, 1, 16] and a rate sr [B, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 + 1, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x, sr):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc(torch.cat([h, sr / 16000.0], dim=1))))
'''


@pytest.fixture(scope="module")
def user_work(tmp_path_factory) -> Path:
    """A user's project: their module in usermodels.py, full pickles of their models beside it."""
    import importlib.util

    work = tmp_path_factory.mktemp("user")
    (work / "usermodels.py").write_text(textwrap.dedent(USER_CODE))
    spec = importlib.util.spec_from_file_location("usermodels", work / "usermodels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    audio = mod.AudioLike().eval()
    # Pickled by reference to usermodels.AudioLike, which the CLI imports from its working directory.
    import sys
    sys.modules["usermodels"] = mod
    try:
        torch.save(audio, work / "audio.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    finally:
        del sys.modules["usermodels"]
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3)).eval()
    torch.save(cnn, work / "cnn.pt")
    rng = np.random.default_rng(0)
    np.savez(work / "audio.npz", x=rng.standard_normal((200, 1, 16)).astype(np.float32),
             sr=rng.choice([8000.0, 16000.0], (200, 1)).astype(np.float32))
    return work


def test_full_pickle_cnn_with_input_flag(user_work, capsys):
    code, _, err = cli(capsys, "export", user_work / "cnn.pt", "--trust-model", "--input", "x:1x1x8x8", "-o",
                       user_work / "cnn.edgegate")
    assert code == 0, err
    m = json.loads((user_work / "cnn.edgegate" / "manifest.json").read_text())
    assert m["source"]["format"] == "full-pickle" and m["export"]["inputs"] == [
        {"name": "x", "shape": [1, 8, 8], "dtype": "float32"}]
    assert m["golden"]["vs_torch"]["logits_max_abs_err"] <= 1e-4
    cnn = torch.load(user_work / "cnn.pt", weights_only=False)
    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(user_work / "cnn.edgegate", {"x": x}), cnn(torch.from_numpy(x)).numpy(),
                                   atol=1e-4)
    code, out, err = cli(capsys, "inspect", user_work / "cnn.pt", "--trust-model", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "full-pickle" and info["converters"] == [] and info["gates"]["gates"] == []
    code, _, err = cli(capsys, "export", user_work / "cnn.pt", "--trust-model", "--input", "x:1x1x8", "-o",
                       user_work / "bad.edgegate")
    assert code == 2 and err.count("\n") == 1 and not (user_work / "bad.edgegate").exists()
    assert err.startswith("edgegate: error: model inputs x:Nx1x8:float32") and "do not fit the model" in err


def test_two_input_float_model_int8_bench_compare(user_work, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(user_work))  # the pickle names usermodels.AudioLike, as in the user's project
    inputs = ("--input", "x:1x1x16", "--input", "sr:1x1")
    bundle = user_work / "audio8.edgegate"
    code, _, err = cli(capsys, "export", user_work / "audio.pt", "--trust-model", *inputs, "--quant", "int8",
                       "--calib", user_work / "audio.npz", "-o", bundle)
    assert code == 0, err
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["quant"]["samples"] == 200 and m["quant"]["fidelity"]["measured_on"] == "calibration"
    assert m["quant"]["fidelity"]["samples"] == 200 and set(m["quant"]["plan"]["layers"]) == {"fc", "out"}
    golden = np.load(bundle / "golden_io.npz")
    assert golden["input.x"].shape == (64, 1, 16) and golden["input.sr"].shape == (64, 1)
    code, out, err = cli(capsys, "bench", bundle, "--runs", "5", "--warmup", "1")
    assert code == 0, err
    assert "Golden check : passed on 64 samples" in out
    code, out, err = cli(capsys, "compare", user_work / "audio.pt", bundle, "--trust-model", "--data",
                         user_work / "audio.npz", "--runs", "3", "--warmup", "1")
    assert code == 0, err
    assert "on the calibration rows, not held-out data (exported without --holdout): audio8.edgegate" in out
    row = [ln.split() for ln in out.splitlines() if ln.startswith("audio8.edgegate ")][0]
    assert row[1:3] == ["cpu", "int8"] and float(row[3]) >= 0.95  # top-1 agreement with the float model
