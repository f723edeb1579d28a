"""``python -m service.training run SPEC [--run-dir DIR] [--store DIR] [--data-root DIR]``."""

from __future__ import annotations

import argparse
import logging
import sys

from service.errors import ServiceError
from service.rundir import error_line
from service.training.run_command import add_run_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.training", description="fine-tuning runs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a fine-tuning spec in the foreground (resumes from --run-dir)")
    add_run_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args.spec, run_dir=args.run_dir, store=args.store, data_roots=args.data_root)
    except ServiceError as exc:
        print(error_line(exc.message), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
