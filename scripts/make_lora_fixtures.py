"""Generate the LoRA golden fixtures in ``tests/fixtures/lora-a/`` with PEFT + transformers + torch.

Not part of the package (the project never depends on torch). Run from the repository root with
the throw-away environment of ``scripts/make_fixtures.py`` plus ``peft``::

    ../peer/bin/pip install peft
    ../peer/bin/python scripts/make_lora_fixtures.py

It loads the tiny random GPT-2 ``tests/fixtures/tiny-a``, wraps it in a PEFT LoRA (rank 4,
alpha 8, every Dense layer of the blocks: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) whose
A and B are both random (PEFT starts B at zero, which would hide a wrong B or a wrong scale),
and writes:

- ``adapter/``: the folder ``PeftModel.save_pretrained`` writes (adapter_config.json +
  adapter_model.safetensors), exactly as PEFT names and lays out GPT-2's arrays;
- ``golden.npz``: ``input_ids`` [1, 6] and the first 8192 columns of the ``logits`` [1, 6, 8192]
  of ``PeftModel.from_pretrained(GPT2LMHeadModel(tiny-a), adapter)`` in float64 (eval mode, the
  adapter unmerged), stored as float32, and ``argmax`` [1, 6] over the whole vocabulary;
- ``golden.json``: versions and how far the adapter moves the logits (so a test comparing with
  the base's logits knows the adapter matters).

Deterministic: fixed torch seed, CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
TINY_A = ROOT / "tests" / "fixtures" / "tiny-a"
OUT = ROOT / "tests" / "fixtures" / "lora-a"
INPUT_IDS = [464, 2068, 7586, 21831, 18045, 625]  # "The quick brown fox jumps over"
RANK, ALPHA = 4, 8
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
COLUMNS = 8192  # of the logits stored (the whole vocabulary's would be 1.2 MB)


def main() -> None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel.from_pretrained(TINY_A, dtype=torch.float32).eval()
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        fan_in_fan_out=True,  # GPT-2's Conv1D
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # both random: B = 0 would make any scale look right
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    if OUT.exists():
        shutil.rmtree(OUT)
    folder = OUT / "adapter"
    model.peft_config["default"].base_model_name_or_path = "tiny-a"  # not this machine's path
    model.save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's model-card template

    ids = torch.tensor([INPUT_IDS])
    fresh = GPT2LMHeadModel.from_pretrained(TINY_A, dtype=torch.float64).eval()
    with torch.no_grad():
        base_logits = fresh(input_ids=ids).logits.numpy()
    loaded = peft.PeftModel.from_pretrained(fresh, folder).eval()  # float64, as stored
    loaded.to(torch.float64)
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.numpy()

    np.savez(
        OUT / "golden.npz",
        input_ids=np.asarray([INPUT_IDS], np.int32),
        logits=logits[..., :COLUMNS].astype(np.float32),
        argmax=logits.argmax(-1).astype(np.int32),
    )
    meta = {
        "versions": {
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "rank": RANK,
        "alpha": ALPHA,
        "targets": TARGETS,
        "adapter_moves_logits_by": float(np.abs(logits - base_logits).max()),
    }
    (OUT / "golden.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
