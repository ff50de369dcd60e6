"""The `source-fast` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="source-fast", description="training-data attribution with SOURCE and EK-FAC")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on scikit-learn's digits and attribute test predictions")
    demo.add_argument("--out", default="source_fast_demo", help="output folder (default: ./source_fast_demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller run for a smoke test")
    sub.add_parser("info", help="versions, the extension and the backend chosen for each op")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.out, quick=args.quick)
    elif args.command == "info":
        from .info import main as info_main

        info_main()
    return 0
