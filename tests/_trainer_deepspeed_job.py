"""A real Trainer run with DeepSpeed for tests/test_trainer.py: ZeRO stage 3 over 2 gloo ranks on the
CPU (torch's AdamW; the weights gathered whole into each checkpoint), and, gathered by DeepSpeed's own
safe_get_full_optimizer_state after training, the second moments of every parameter (rank 0 saves them
as deepspeed_exp_avg_sq.pt) for the test to compare the last checkpoint's partitions with.

    torchrun --standalone --nproc-per-node 2 tests/_trainer_deepspeed_job.py OUT_DIR
"""

import os
import sys

import torch
import transformers
from test_trainer import DECAY, LR, WARMUP, Tokens, _model

STEPS, SAVE = 6, 3


def main() -> None:
    from deepspeed.utils import safe_get_full_optimizer_state

    out = sys.argv[1]
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=4, learning_rate=LR,
        warmup_steps=WARMUP, weight_decay=DECAY, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        log_level="error", logging_steps=1, max_grad_norm=0.0, deepspeed=config)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(48, 12, 40, seed=1))
    trainer.train()
    moments = {n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in trainer.model_wrapped.module.named_parameters()}
    if int(os.environ["RANK"]) == 0:
        torch.save(moments, os.path.join(out, "deepspeed_exp_avg_sq.pt"))


if __name__ == "__main__":
    main()
