"""Real Trainer runs with DeepSpeed for tests/test_trainer.py: ZeRO stage 3 over 2 gloo ranks on the
CPU (torch's AdamW), of the GPT-2 model into OUT_DIR/full (as by default, each checkpoint holds the
weights only in the ranks' partitions) and of a LoRA model (peft) into OUT_DIR/lora (Trainer saves its
adapters whole and DeepSpeed's partitions without the frozen base). Beside each, deepspeed_full.pt:
every trained parameter's weights and second moments as DeepSpeed gathers them itself after training
(safe_get_full_fp32_param, safe_get_full_optimizer_state), for the test to compare the last
checkpoint with.

    torchrun --standalone --nproc-per-node 2 tests/_trainer_deepspeed_job.py OUT_DIR
"""

import os
import sys

import torch
import transformers
from test_trainer import DECAY, LR, WARMUP, Tokens, _model

STEPS, SAVE = 6, 3


def lora_model():
    import peft

    return peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    for name, model in (("full", _model()), ("lora", lora_model())):
        out = os.path.join(sys.argv[1], name)
        config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "zero_optimization": {"stage": 3},
                  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=4, learning_rate=LR,
            warmup_steps=WARMUP, weight_decay=DECAY, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
            log_level="error", logging_steps=1, max_grad_norm=0.0, deepspeed=config)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(48, 12, 40, seed=1))
        trainer.train()
        params = {n: p for n, p in trainer.model_wrapped.module.named_parameters() if p.requires_grad}
        full = {"weights": {n: safe_get_full_fp32_param(p) for n, p in params.items()},
                "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in params.items()}}
        if int(os.environ["RANK"]) == 0:
            torch.save(full, os.path.join(out, "deepspeed_full.pt"))
    # Every file is written: leave without tearing down DeepSpeed's process groups, whose gloo threads
    # abort the process at exit in about a third of the runs on these machines.
    torch.distributed.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
