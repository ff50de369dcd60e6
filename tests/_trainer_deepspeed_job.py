"""A real Trainer run with DeepSpeed for tests/test_trainer.py: ZeRO stage 3 over 2 gloo ranks on the
CPU (torch's AdamW; as by default, each checkpoint holds the weights only in the ranks' partitions),
and, gathered by DeepSpeed's own safe_get_full_fp32_param and safe_get_full_optimizer_state after
training, every parameter's weights and second moments (rank 0 saves them as deepspeed_full.pt) for
the test to compare the last checkpoint's partitions with.

    torchrun --standalone --nproc-per-node 2 tests/_trainer_deepspeed_job.py OUT_DIR
"""

import os
import sys

import torch
import transformers
from test_trainer import DECAY, LR, WARMUP, Tokens, _model

STEPS, SAVE = 6, 3


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = sys.argv[1]
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=4, learning_rate=LR,
        warmup_steps=WARMUP, weight_decay=DECAY, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        log_level="error", logging_steps=1, max_grad_norm=0.0, deepspeed=config)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(48, 12, 40, seed=1))
    trainer.train()
    params = dict(trainer.model_wrapped.module.named_parameters())
    full = {"weights": {n: safe_get_full_fp32_param(p) for n, p in params.items()},
            "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in params.items()}}
    if int(os.environ["RANK"]) == 0:
        torch.save(full, os.path.join(out, "deepspeed_full.pt"))


if __name__ == "__main__":
    main()
