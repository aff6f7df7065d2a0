"""Bring your own model through the CLI: Hugging Face MoE folders, full pickles with --input, two-input
models end to end (export, int8 from an npz of every input, bench, compare).

One export runs the CLI in a subprocess as a user does; the others call ``edgegate.cli.main`` in this
process (the same parser and commands) so the tests do not pay torch's and transformers' import each time.
"""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgegate.cli import main
from tests._cli import edgegate

SEQ = 16


def _mixtral(transformers):
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.2)
    return transformers.MixtralForCausalLM(cfg)


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
    out = {}
    for name, build in (("mixtral", _mixtral), ("qwen3_moe", _qwen3_moe)):
        torch.manual_seed(0)
        model = build(transformers).eval()
        assert sum(p.numel() for p in model.parameters()) < 1_000_000
        model.save_pretrained(work / name)
        out[name] = (work / name, model)
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``edgegate ARGS...`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _ort(bundle: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_folder_exports_fp32_and_matches_transformers(hf, name, capsys):
    folder, model = hf[name]
    bundle = folder.parent / f"{name}.edgegate"
    if name == "mixtral":  # the user's path: a fresh process
        r = edgegate("export", folder.name, "--target", "cpu", "-o", bundle.name, cwd=folder.parent)
        assert r.returncode == 0, r.stderr
    else:
        code, _, err = cli(capsys, "export", folder, "--target", "cpu", "-o", bundle)
        assert code == 0, err
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["source"]["format"] == "hf-folder" and m["export"]["inputs"] == [
        {"name": "input_ids", "shape": [32], "dtype": "int64"}]
    ids = np.random.default_rng(1).integers(0, 64, (6, 32))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    got = _ort(bundle, {"input_ids": ids})
    assert got.shape == (6, 32, 64)
    assert float(np.abs(got - want).max()) <= 1e-3


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
    code, _, err = cli(capsys, "export", folder, *inputs, "--quant", "int8", "--calib", work / "tokens.npz",
                       "--holdout", "0.25", "-o", bundle)
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
