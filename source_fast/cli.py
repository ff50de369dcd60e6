"""The `source-fast` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="source-fast", description="training-data attribution with SOURCE and EK-FAC")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on scikit-learn's digits, attribute test predictions, and check them against retraining (LDS)")
    demo.add_argument("--out", default="source_fast_demo", help="output folder (default: ./source_fast_demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller run for a smoke test (about a minute)")
    demo.add_argument("--workers", type=int, default=2, help="retraining processes (default: 2)")
    demo.add_argument("--subsets", type=int, default=None, help="random halves retrained per scenario (default: 100; --quick 12)")
    demo.add_argument("--seeds", type=int, default=None, help="data orders per subset (default: 3; --quick 1)")
    demo.add_argument(
        "--scenario", action="append", choices=["standard", "non_converged", "multi_stage"], default=None,
        help="run only this scenario (repeatable; default: all three)",
    )
    sub.add_parser("info", help="versions, the extension and the backend chosen for each op")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.out, quick=args.quick, workers=args.workers, subsets=args.subsets, seeds=args.seeds, only=args.scenario)
    elif args.command == "info":
        from .info import main as info_main

        info_main()
    return 0
