"""A kronfluence multi-process script through source_fast's shim, run under torchrun (gloo) by
tests/test_kronfluence.py, the whole dataset given to every rank. MODE ddp: the script starts the
process group and wraps the prepared model in DistributedDataParallel, as kronfluence's DDP examples
do; plain: neither (the Analyzer starts the group, as kronfluence's does); skew: plain, but rank 1 is
given fewer queries (refused on every rank).

usage: torchrun --nproc-per-node 2 _kronfluence_ddp.py OUTPUT_DIR MODE STRATEGY [STRATEGY ...]
Each rank also saves what the Analyzer returned to OUTPUT_DIR/returned_<strategy>_rank<r>.pt, and its
`analyzer.state` to OUTPUT_DIR/state_rank<r>.pt.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
from test_kronfluence import ddp_workload, f64_arguments  # noqa: E402

from source_fast.interop.kronfluence import Analyzer, prepare_model  # noqa: E402


STATE = ("process_index", "num_processes", "local_process_index", "device", "use_distributed", "is_main_process",
         "is_local_main_process", "is_last_process")


def main() -> None:
    out, mode, strategies = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    model, task, train, queries = ddp_workload()
    model = prepare_model(model, task)
    if mode == "ddp":
        dist.init_process_group("gloo")
        model = DistributedDataParallel(model)
    if mode == "skew" and os.environ["RANK"] == "1":
        queries = torch.utils.data.Subset(queries, range(len(queries) - 1))
    analyzer = Analyzer("run", model, task, cpu=True, disable_tqdm=True, output_dir=out, disable_model_save=False)
    state = analyzer.state  # as kronfluence's scripts read it
    torch.save({k: getattr(state, k) for k in STATE}, os.path.join(out, f"state_rank{state.process_index}.pt"))
    state.wait_for_everyone()
    factor_kw, score_kw = f64_arguments(torch.float64)
    for strategy in strategies:
        analyzer.fit_all_factors(strategy, train, per_device_batch_size=16, factor_args=FactorArguments(
            strategy=strategy, use_empirical_fisher=True, **factor_kw))
        score_args = ScoreArguments(damping_factor=1e-8, compute_per_module_scores=True, **score_kw)
        returned = {
            "pair": analyzer.compute_pairwise_scores(f"{strategy}_pair", strategy, queries, train,
                                                     per_device_query_batch_size=4, per_device_train_batch_size=16,
                                                     score_args=score_args),
            "self": analyzer.compute_self_scores(f"{strategy}_self", strategy, train, per_device_train_batch_size=16,
                                                 score_args=score_args),
            "measured": analyzer.compute_self_scores(
                f"{strategy}_measured", strategy, train, per_device_train_batch_size=16,
                score_args=ScoreArguments(damping_factor=1e-8, use_measurement_for_self_influence=True, **score_kw)),
        }
        torch.save(returned, os.path.join(out, f"returned_{strategy}_rank{dist.get_rank()}.pt"))
    del analyzer, model  # DistributedDataParallel's reducer goes while its process group is alive
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
