"""A gptscale LoRA adapter written as a PEFT adapter folder (`gptscale convert to-hf --adapter`)."""
from __future__ import annotations

import json
from pathlib import Path

from gptscale.atomic import staged_folder
from gptscale.checkpoint.adapter import AdapterFolder
from gptscale.convert.peft import adapter_to_peft


def write_peft(adapter: str | Path, out: str | Path, base: str | None = None) -> AdapterFolder:
    """The adapters of `adapter` (an adapter folder or a LoRA checkpoint) as PEFT's
    adapter_model.safetensors + adapter_config.json in `out` (staged, renamed when complete)."""
    from safetensors.torch import save_file

    folder = AdapterFolder(adapter)
    lora = folder.lora
    tensors, settings = adapter_to_peft(folder.tensors(), folder.model, r=lora.rank, alpha=lora.alpha,
                                        dropout=lora.dropout, targets=lora.targets, base_model=base)
    with staged_folder(out) as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder
