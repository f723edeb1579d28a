"""``python -m service.control``: the control API alone, deploying to a running TorchServe.

``modelctl serve`` starts it beside TorchServe; this entry point is for a TorchServe that
runs already (its state dir holds key_file.json) and for tests that kill and restart it.

Calls need the operator's API token (``MODELCTL_API_TOKEN_FILE``, ``MODELCTL_API_TOKEN``, or
``<state dir>/api_token``, generated there when none is set); ``MODELCTL_CONTROL_TLS_CERT``
and ``MODELCTL_CONTROL_TLS_KEY`` make the port TLS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.errors import ServiceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.control", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--port", type=int, default=None, help="[MODELCTL_CONTROL_PORT, 50051]")
    parser.add_argument("--host", default=None, help="[MODELCTL_CONTROL_HOST, 127.0.0.1]")
    parser.add_argument("--db", dest="db_path", type=Path, default=None, help="[<state dir>/control.db]")
    parser.add_argument("--runs-dir", type=Path, default=None, help="[<state dir>/runs]")
    parser.add_argument("--data-root", action="append", type=Path, default=None,
                        help="where run specs may read datasets (repeatable) [MODELCTL_DATA_ROOTS, .]")
    parser.add_argument("--max-concurrent-jobs", type=int, default=None, help="[1]")
    parser.add_argument("--cancel-grace-s", type=float, default=None, help="[20]")
    # the TorchServe to deploy to
    parser.add_argument("--model-store", type=Path, default=None, help="[MODELCTL_MODEL_STORE, ./model_store]")
    parser.add_argument("--state-dir", type=Path, default=None, help="TorchServe's [MODELCTL_STATE_DIR, ./.modelctl]")
    parser.add_argument("--management-port", type=int, default=None, help="TorchServe's [8081]")
    parser.add_argument("--workers", type=int, default=None, help="workers per deployed version [1]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.control.settings import ControlConfig
    from service.app import standalone_service
    from service.serving.settings import ServeSettings

    try:
        settings = ServeSettings.from_env(model_store=args.model_store, state_dir=args.state_dir,
                                          management_port=args.management_port,
                                          workers_per_model=args.workers)
        control = ControlConfig.from_env(port=args.port, host=args.host, db_path=args.db_path,
                                         runs_dir=args.runs_dir, data_roots=args.data_root,
                                         max_concurrent_jobs=args.max_concurrent_jobs,
                                         cancel_grace_s=args.cancel_grace_s)
        standalone_service(control, settings).run_forever()
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
