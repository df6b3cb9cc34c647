import dataclasses
import json
import time

import pytest

from charter import models
from charter.errors import ModelNotFound
from charter.settings import Settings


def test_prepare_is_done_once(tiny_model):
    from pathlib import Path

    marker = Path(tiny_model) / models.MARKER
    before = marker.stat().st_mtime_ns
    t = time.monotonic()
    assert str(models.prepare("tiny")) == tiny_model
    assert time.monotonic() - t < 1.0 and marker.stat().st_mtime_ns == before


def test_prepared_folders_are_what_vllm_and_trl_read(tiny_model, smollm2_model):
    from pathlib import Path

    for path in (tiny_model, smollm2_model):
        cfg = json.loads((Path(path) / "config.json").read_text())
        assert "quantization_config" not in cfg  # dequantized: vLLM must not look for GGUF
        assert (Path(path) / "model.safetensors").exists() and (Path(path) / "tokenizer.json").exists()
    tiny = json.loads((Path(tiny_model) / "config.json").read_text())
    assert tiny["num_hidden_layers"] == 2 and tiny["hidden_size"] == 64 and tiny["head_dim"] == 64
    assert {m["name"] for m in models.list_prepared()} >= {"tiny", "smollm2-135m"}


def test_resolve(tmp_path, tiny_model):
    assert models.resolve("tiny") == tiny_model
    assert models.resolve(tiny_model) == tiny_model  # a local folder
    (tmp_path / "empty").mkdir()
    here = dataclasses.replace(Settings.from_env(), data_roots=(tmp_path,))  # as an operator lists a models folder
    with pytest.raises(ModelNotFound, match="no config.json"):
        models.resolve(str(tmp_path / "empty"), here)
    with pytest.raises(ModelNotFound, match="charter models prepare"):
        models.resolve("someorg/somemodel")
    with pytest.raises(ModelNotFound, match="choose one of"):
        models.prepare("gpt-9")


def test_local_vllm_servers_run_float32_on_cpus_without_bf16(monkeypatch):
    from charter.pipelines import servers

    avx2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not servers.cpu_has_bf16(avx2) and servers.cpu_has_bf16(sapphire)
    monkeypatch.setattr(servers, "has_gpu", lambda: False)
    monkeypatch.setattr(servers, "cpu_has_bf16", lambda: False)
    assert servers.default_dtype() == "float32"
    monkeypatch.setattr(servers, "cpu_has_bf16", lambda: True)
    assert servers.default_dtype() == "auto"


def test_local_vllm_servers_load_safetensors_and_no_model_code(monkeypatch, tmp_path):
    from charter.pipelines import servers

    started = {}
    monkeypatch.setattr(servers.subprocess, "Popen", lambda cmd, **kw: started.setdefault("cmd", cmd))
    servers.start_server("/models/tiny", 1234, tmp_path / "log", kvcache_gib=1)
    cmd = started["cmd"]
    assert cmd[cmd.index("--load-format") + 1] == "safetensors"
    assert not any("trust-remote-code" in a or "trust_remote_code" in a for a in cmd)
    assert models.SAFE_WEIGHTS == {"trust_remote_code": False, "use_safetensors": True}
