"""The `peft_lora` method of `benchmarks/sft.py`, in PyTorch + PEFT.

Run by `sft.py` with the Python of a separate virtual environment that has
torch, transformers and peft (never kft dependencies):

    python -m venv ~/peft-venv
    ~/peft-venv/bin/pip install torch transformers peft
    python benchmarks/sft.py --methods lora,peft_lora \
        --peft-python ~/peft-venv/bin/python

It trains the same SmolLM2-135M-Instruct checkpoint (Hugging Face format,
float32) on the same token batches `sft.py` made for kft (an `.npz` of
`token_ids`, `padding_mask`, targets and weights), with PEFT LoRA on the
same seven projections (rank 8, alpha 16, no dropout), Adam at the same
rate and the same loss (token cross-entropy averaged over the weighted
tokens), and writes the step times, its peak RSS and the bytes of its
parameters as JSON.

    python _peft_sft.py MODEL_DIR BATCHES.npz OUT.json STEPS LR
"""

import json
import resource
import sys
import time

import numpy as np
import torch
from peft import LoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]


def main(model_dir, batches, out, steps, lr, batch_size=8):
    torch.manual_seed(0)
    data = np.load(batches)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
        task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = len(data["token_ids"]) // batch_size * batch_size
    times, losses = [], []
    for step in range(steps):
        index = np.arange(step * batch_size, (step + 1) * batch_size) % rows
        tokens = torch.from_numpy(data["token_ids"][index].astype("int64"))
        mask = torch.from_numpy(data["padding_mask"][index].astype("int64"))
        targets = torch.from_numpy(data["targets"][index].astype("int64"))
        weights = torch.from_numpy(data["weights"][index].astype("float32"))
        start = time.perf_counter()
        logits = model(input_ids=tokens, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    with open(out, "w") as f:
        json.dump({"step_times": times, "losses": losses,
                   "threads": torch.get_num_threads(),
                   "peak_rss_mb": resource.getrusage(
                       resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "variable_bytes": sum(p.numel() * p.element_size()
                                         for p in model.parameters()),
                   "trainable_params": sum(p.numel() for p in model.parameters()
                                           if p.requires_grad)}, f)


if __name__ == "__main__":
    model_dir, batches, out, steps, lr = sys.argv[1:6]
    main(model_dir, batches, out, int(steps), float(lr))
