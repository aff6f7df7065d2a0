"""Hugging Face model folders: detected by content, built by transformers, refused in one line when unsafe."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgegate.errors import ModelFormatError, UnsafeModelError
from edgegate.loading import ModelFormat, detect_format, load, parse_inputs
from edgegate.loading.hf import DEFAULT_SEQ_LEN

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Mixtral (seeded, random weights) written with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("hf") / "mixtral"
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(folder: Path, tmp_path: Path, **config_changes) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_folder_loads_with_recorded_inputs_and_documented_sha256(folder):
    assert detect_format(folder) == ModelFormat.HF_FOLDER
    loaded = load(folder)
    assert loaded.spec["class"] == "transformers:MixtralForCausalLM"
    assert loaded.spec["meta"]["inputs"] == [{"name": "input_ids", "shape": [DEFAULT_SEQ_LEN], "dtype": "int64",
                                              "range": [0, 48]}]
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")], key=lambda p: p.name)
    lines = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    assert loaded.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    ids = torch.randint(0, 48, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[0, :3] = 0
    two = load(folder, inputs=parse_inputs(["input_ids:1x8:int64", "attention_mask:1x8:int64"]))
    with torch.no_grad():
        want = two.module.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(two.module(ids, mask), want)  # positional, in --input order
    assert two.spec["meta"]["inputs"][1] == {"name": "attention_mask", "shape": [8], "dtype": "int64", "range": [1, 2]}


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, UnsafeModelError, "needs remote code"),
    ({"model_type": "my_private_arch"}, UnsafeModelError, "model_type 'my_private_arch' is not in transformers"),
    ({"architectures": ["MixtralForTelepathy"]}, ModelFormatError, "architecture MixtralForTelepathy is not in"),
    ({"architectures": None}, ModelFormatError, "names no architecture"),
    ({"hidden_size": 4096, "intermediate_size": 16384}, ModelFormatError, "the config does not match the weights"),
])
def test_unsafe_or_broken_configs_are_refused_in_one_line(folder, tmp_path, change, error, match):
    with pytest.raises(error, match=match) as e:
        load(_copy(folder, tmp_path, **change))
    assert "\n" not in str(e.value)


def test_weights_that_are_pickled_missing_or_not_safetensors_are_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(folder, tmp_path)
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(str(weights))
    weights.unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=r"holds only pickled weights \(pytorch_model.bin\)"):
        load(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelFormatError, match="has config.json but no \\*.safetensors weights"):
        load(path)
    torch.save(tensors, path / "model.safetensors")  # a pickle under a safetensors name
    with pytest.raises(ModelFormatError, match="model.safetensors is not a safetensors file"):
        load(path)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="has missing weights"):
        load(path)
    with pytest.raises(ModelFormatError, match="leave out --model"):
        load(folder, model_class="torch.nn:Linear")
    with pytest.raises(ModelFormatError, match="has no input 'pixels'; its inputs are input_ids"):
        load(folder, inputs=parse_inputs(["pixels:1x3x8x8"]))


def test_missing_transformers_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when not installed
    with pytest.raises(ModelFormatError, match=r"needs transformers: pip install 'edgegate\[hf\]'"):
        load(folder)


def test_importing_edgegate_never_imports_transformers():
    code = "import sys, edgegate, edgegate.loading, edgegate.pipeline; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
