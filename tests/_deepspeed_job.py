"""Real DeepSpeed runs for tests/test_engine.py: ZeRO stages 1, 2 and 3 over 2 gloo ranks on the CPU,
torch's AdamW in two parameter groups (decayed weights, then biases), a few steps, each saved by
engine.save_checkpoint into OUT_DIR/stageK (stage 3 in sub-groups smaller than a group), stage 1
in bfloat16 (DeepSpeed's BF16_Optimizer, its own file names) into OUT_DIR/stage1_bf16, stage 2 with
elastic_checkpoint, stage 3 with a stateless optimizer (SGD without momentum); beside each,
full.pt: every parameter's float32 weights and second moments as DeepSpeed gathers them itself. On
rank 0, the same float32 training in one process, saved as torch saves it.

    torchrun --standalone --nproc-per-node 2 tests/_deepspeed_job.py OUT_DIR
"""

import os
import sys

import torch
from _fsdp_job import build, data  # the same model and data as the FSDP run's
from torch import nn

STEPS = 5


def groups(model: nn.Module, names: bool) -> list[dict]:
    by_kind = [[(n, p) for n, p in model.named_parameters() if n.endswith(end)] for end in ("weight", "bias")]
    return [{"params": g if names else [p for _, p in g], "weight_decay": decay}
            for g, decay in zip(by_kind, (0.01, 0.0))]


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = sys.argv[1]
    x, y = data()
    rank = int(os.environ["RANK"])
    half = slice(12 * rank, 12 * rank + 12)  # the ranks' averaged gradient is the whole batch's
    runs = {"stage1": (1, torch.float32, {}), "stage2": (2, torch.float32, {}), "stage3": (3, torch.float32, {}),
            "stage1_bf16": (1, torch.bfloat16, {}), "stage2_elastic": (2, torch.float32, {"elastic_checkpoint": True}),
            "stage3_sgd": (3, torch.float32, {})}  # the last with SGD without momentum: an optimizer with no state
    for name, (stage, dtype, options) in runs.items():
        model = build()
        config = {"train_micro_batch_size_per_gpu": 12, "zero_optimization": {"stage": stage, "sub_group_size": 10,
                  **options}, "bf16": {"enabled": dtype == torch.bfloat16}}
        if name.endswith("sgd"):
            optimizer = torch.optim.SGD(groups(model, names=False), lr=1e-2)
            config["zero_allow_untested_optimizer"] = True
        else:
            optimizer = None
            config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups(model, names=False), config=config,
                                          optimizer=optimizer)
        for _ in range(STEPS):
            engine.backward(nn.functional.cross_entropy(engine(x[half].to(dtype)).float(), y[half]))
            engine.step()
        folder = os.path.join(out, name)
        engine.save_checkpoint(folder)
        if name == "stage3" and rank == 0:  # the partitioned model itself is refused, with what to do instead
            from source_fast.capture import tracked_layers

            try:
                tracked_layers(engine.module, None)
            except ValueError as exc:
                with open(os.path.join(out, "refused.txt"), "w") as f:
                    f.write(str(exc))
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
            # Stages 1 and 2 link each parameter to its optimizer state once, after the first group's first
            # step, before the other groups have state (DeepSpeed 0.19): link them again for safe_get_*.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        params = dict(engine.module.named_parameters())
        full = {"weights": {n: safe_get_full_fp32_param(p) for n, p in params.items()}, "exp_avg_sq": {
            n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in params.items() if optimizer is None}}
        if rank == 0:
            torch.save(full, os.path.join(folder, "full.pt"))
    if rank == 0:
        model = build()
        opt = torch.optim.AdamW(groups(model, names=True), lr=1e-2)
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.save(opt.state_dict(), os.path.join(out, "optimizer.pt"))
        torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    # Every file is written: leave without tearing down DeepSpeed's process groups, whose gloo threads
    # abort the process at exit in about a third of the runs on these machines.
    torch.distributed.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
