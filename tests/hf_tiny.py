"""A tiny HF Trainer run (2-layer Llama, hidden 32, CPU) for the integration tests; also runnable as a script.

Script use: ``python hf_tiny.py OUT MAX_STEPS STALL_AT MARKER`` trains with :class:`ResumekitCallback` and, at step
STALL_AT, stalls inside the save (after model, optimizer and scheduler are written, before the rng files and
``trainer_state.json``) after touching MARKER, so the test can SIGKILL it mid-save.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 8, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        ids = self.x[i]
        return {"input_ids": ids, "labels": ids.clone()}


class StallingTrainer(Trainer):
    """Stalls in ``_save_rng_state`` at one step, so a kill lands after optimizer.pt, before trainer_state.json."""

    stall_at = None
    marker = None

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.stall_at:
            with open(self.marker, "w") as f:
                f.write(output_dir)
            time.sleep(300)
        super()._save_rng_state(output_dir)


def make_trainer(out: str, max_steps: int, callbacks=(), trainer_cls=Trainer) -> Trainer:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    args = TrainingArguments(
        output_dir=out,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return trainer_cls(model=LlamaForCausalLM(cfg), args=args, train_dataset=TinyData(), callbacks=list(callbacks))


if __name__ == "__main__":
    from resumekit.integrations.hf import ResumekitCallback

    out, max_steps, stall_at, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    StallingTrainer.stall_at, StallingTrainer.marker = stall_at, marker
    make_trainer(out, max_steps, [ResumekitCallback()], StallingTrainer).train()
