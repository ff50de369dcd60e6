"""The `source-fast` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="source-fast", description="training-data attribution with SOURCE and EK-FAC")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on scikit-learn's digits and diabetes, attribute test predictions, and check them against retraining (LDS)")
    demo.add_argument("--out", default="source_fast_demo", help="output folder (default: ./source_fast_demo)")
    demo.add_argument("--quick", action="store_true",
                      help="a small run, a smoke test (under a minute; too small to rank the methods)")
    demo.add_argument("--workers", type=int, default=2, help="retraining processes (default: 2)")
    demo.add_argument("--subsets", type=int, default=None, help="random halves retrained per scenario (default: 100; --quick 12)")
    demo.add_argument("--seeds", type=int, default=None, help="data orders per subset (default: 3; --quick 1)")
    demo.add_argument(
        "--scenario", action="append", choices=["standard", "non_converged", "multi_stage", "regression"], default=None,
        help="run only this scenario (repeatable; default: all four)",
    )
    sub.add_parser("info", help="versions, the extension and the backend chosen for each op")
    fit = sub.add_parser("fit", help="fit the EK-FAC factors of a job file's trajectory")
    fit.add_argument("job", help="a Python file defining job() -> source_fast.Job")
    fit.add_argument("--out", required=True, help="factor folder to write")
    fit.add_argument("--fisher", choices=["true", "empirical"], default="true",
                     help="true: the curvature from labels drawn from the model (default); empirical: from the "
                          "data's labels")
    fit.add_argument("--average-params", action="store_true", help="Fast-SOURCE: fit at each segment's mean weights")
    fit.add_argument("--final", action="store_true", help="fit only the final checkpoint (for --method ekfac)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the true Fisher's label sampling (default: 0)")
    score = sub.add_parser("score", help="score a job's training data against its queries, sharded and resumable")
    score.add_argument("job", help="a Python file defining job() -> source_fast.Job")
    score.add_argument("--factors", default=None, help="factor folder from `source-fast fit`")
    score.add_argument("--out", required=True, help="score folder (resumes a killed run of the same job)")
    # scoring.GRADIENT_METHODS, spelled out: importing it would import torch for --help (test_cli checks).
    score.add_argument("--method", default="source", choices=["source", "fast_source", "ekfac", "tracin", "grad_dot"])
    score.add_argument("--damping", default=None, type=_damping,
                       help="ekfac's damping: a number, heuristic (the default) or implied")
    score.add_argument("--final", action="store_true", help="use only the final checkpoint (for --method ekfac)")
    score.add_argument("--top-k", type=int, default=None, help="keep only each query's k largest and smallest scores")
    score.add_argument("--shard-size", type=int, default=4096, help="training rows per output shard")
    score.add_argument("--query-memory-gb", type=_gib, default=1.0, help="memory for prepared queries (GiB)")
    score.add_argument("--query-rank", type=int, default=None, help="low-rank query factors of this rank")
    args = parser.parse_args(argv)
    if args.command in ("fit", "score"):
        return _job_command(args)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.out, quick=args.quick, workers=args.workers, subsets=args.subsets, seeds=args.seeds, only=args.scenario)
    elif args.command == "info":
        from .info import main as info_main

        info_main()
    return 0


def _gib(value: str) -> float:
    """--query-memory-gb, checked while parsing: at least one byte, finite."""
    try:
        gib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GiB") from None
    if not 1 <= gib * (1 << 30) < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} GiB is not a positive, finite amount of memory")
    return gib


def _damping(value: str) -> float | str:
    """--damping, checked while parsing: a typo is a usage error that names the option, not a traceback."""
    if value in ("heuristic", "implied"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number, heuristic or implied") from None


def _job_command(args) -> int:
    import os

    import torch

    from . import jobs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    if distributed:
        # NCCL takes only CUDA tensors: gloo carries the collectives of a job whose model stays on the CPU.
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        if args.command == "fit":
            jobs.fit(args.job, args.out, fisher=args.fisher, average_params=args.average_params, final=args.final,
                     seed=args.seed)
        else:
            jobs.score(args.job, args.factors, args.out, method=args.method, damping=args.damping, top_k=args.top_k,
                       shard_size=args.shard_size, query_memory_budget=int(args.query_memory_gb * (1 << 30)),
                       query_rank=args.query_rank, final=args.final)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if not _refused_by_source_fast(exc):
            raise  # from the job's own code (its task, its data) or torch: the traceback shows where
        # The library's messages name its Python API; say what the same fix is on the command line.
        hints = [hint for phrase, hint in _CLI_HINTS if phrase in str(exc)]
        print(f"source-fast {args.command}: error: {exc}" + "".join(f"\n  on the command line: {h}" for h in hints),
              file=sys.stderr)
        return 2
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


def _refused_by_source_fast(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is source_fast's own code: its refusals of bad input are
    messages for the user; the same exception types raised in a job's task or data code are their bugs,
    whose tracebacks they need."""
    import os

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


_CLI_HINTS = [
    ("trajectory.final()", "add --final (to `source-fast fit` too, for factors of the final checkpoint)"),
    ("needs Factors from fit_factors()", "give --factors FOLDER, written by `source-fast fit`"),
    ("fitted on a trajectory with checkpoints per segment", "give `source-fast fit` and `source-fast score` the "
                                                            "same --final"),
    ("use another resume_dir", "delete that .partial folder, or give another --out"),
    ("train_data is not the data of any segment", "make the job's train_data the very object its trajectory's "
                                                  "segments were given as data"),
]
