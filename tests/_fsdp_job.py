"""A real FSDP run for tests/test_engine.py: FSDP2's fully_shard over 2 gloo ranks on the CPU, AdamW
for a few steps, its weights and optimizer state saved whole as FSDP gives them (the state keyed by
parameter names) and in the ranks' pieces as accelerate saves them (sharded/); and on rank 0 the same
training without FSDP, saved as torch's optimizer saves it.

    torchrun --standalone --nproc-per-node 2 tests/_fsdp_job.py OUT_DIR
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)


def train(model: nn.Module, names: bool) -> torch.optim.Optimizer:
    """AdamW over two groups out of module order (biases, then weights), as Trainer's; `names`: built from
    named parameters, so torch's state records whose each state is (FSDP's names them itself)."""
    x, y = data()
    groups = [[(n, p) for n, p in model.named_parameters() if n.endswith(end)] for end in ("bias", "weight")]
    opt = torch.optim.AdamW([{"params": g if names else [p for _, p in g]} for g in groups], lr=1e-2, weight_decay=0.01)
    for _ in range(5):  # every rank the whole batch: FSDP's averaged gradient is the one process's
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def main() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = sys.argv[1]
    dist.init_process_group("gloo")
    model = build()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = train(model, names=False)
    try:  # the sharded model itself is refused, with what to do instead
        from source_fast.capture import tracked_layers

        tracked_layers(model, None)
    except ValueError as exc:
        with open(os.path.join(out, f"refused{dist.get_rank()}.txt"), "w") as f:
            f.write(str(exc))
    # As accelerate (Trainer's FSDP) saves checkpoints with fsdp_state_dict_type SHARDED_STATE_DICT: the
    # ranks' pieces, through torch.distributed.checkpoint, in pytorch_model_fsdp_0/ and optimizer_0/.
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True)  # the process group above; save_* read its rank
    save_fsdp_model(plugin, accelerator, model, os.path.join(out, "sharded"))
    save_fsdp_optimizer(plugin, accelerator, opt, model, os.path.join(out, "sharded"))
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state, weights = get_optimizer_state_dict(model, opt, options=whole), get_model_state_dict(model, options=whole)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(out, "fsdp_optimizer.bin"))
        torch.save(weights, os.path.join(out, "fsdp_model.pt"))
        plain = build()
        torch.save(train(plain, names=True).state_dict(), os.path.join(out, "optimizer.pt"))
        torch.save(plain.state_dict(), os.path.join(out, "model.pt"))
    # FSDP's sharded tensors go while their process group is alive, on every rank at once: otherwise gloo's
    # threads may abort the process at exit ("terminate called without an active exception", about one run
    # in ten on these machines).
    dist.barrier()
    del model, opt, state, weights
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
