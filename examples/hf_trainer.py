"""HF Trainer with resumekit: checksummed checkpoints, a save on SIGTERM, resume from the newest *valid* one.

Runs on a CPU in seconds (a 2-layer Llama built from a config, synthetic data, no downloads)::

    python examples/hf_trainer.py --out runs/hf              # kill it any time (Ctrl-C, kill -9), run it again
    resumekit run --dir runs/hf --layout hf -- python examples/hf_trainer.py --out runs/hf

Under ``resumekit run`` the supervisor picks the checkpoint and exports it as ``RESUMEKIT_RESUME_FROM``; run alone,
the script asks the hf layout itself. Either way the choice is the newest ``checkpoint-N`` that validates, not the
highest N that the Trainer's own ``get_last_checkpoint`` would take (a save killed halfway leaves one behind).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from resumekit.integrations.hf import ResumekitCallback
from resumekit.layouts import get_layout
from resumekit.storage import open_storage


class RandomTokens(torch.utils.data.Dataset):
    """Fixed synthetic token sequences (seeded), so every run sees the same data."""

    def __init__(self, n: int = 512, seq: int = 32, vocab: int = 256):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i].clone()}


def resume_point(out: str):
    """Where to resume: the supervisor's choice, else the newest valid checkpoint-N, else None (fresh start)."""
    if "RESUMEKIT_RESUME_FROM" in os.environ:  # set by `resumekit run` ("" means: start fresh)
        return os.environ["RESUMEKIT_RESUME_FROM"] or None
    if not os.path.isdir(out):
        return None
    best, skipped = get_layout("hf").latest(open_storage(out, create=False))
    for s in skipped:
        print(f"skipping {s.path}: {s.reason}")
    return best.path if best else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/hf", help="output_dir (checkpoint-N directories go here)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=20)
    a = p.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=RandomTokens(), callbacks=[ResumekitCallback()]
    )  # manifest after every save; SIGTERM -> save, exit 143
    resume = resume_point(a.out)
    print(f"resuming from {resume}" if resume else "starting fresh")
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    main()
