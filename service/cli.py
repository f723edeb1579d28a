"""``modelctl``: the command line. It parses arguments and calls the modules; no logic."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.errors import ServiceError

SERVE_FLAGS = {
    # flag: (ServeSettings field, type, help)
    "--engine": ("engine", str, "serving engine: torchserve or native [MODELCTL_ENGINE, torchserve]"),
    "--model-store": ("model_store", Path, "model store directory [MODELCTL_MODEL_STORE, ./model_store]"),
    "--state-dir": ("state_dir", Path, "TorchServe state: config, logs, keys, tmp [MODELCTL_STATE_DIR, ./.modelctl]"),
    "--inference-port": ("inference_port", int, "REST inference port [MODELCTL_INFERENCE_PORT, 8080]"),
    "--management-port": ("management_port", int, "management API port, loopback only [8081]"),
    "--metrics-port": ("metrics_port", int, "TorchServe metrics port [8082]"),
    "--grpc-inference-port": ("grpc_inference_port", int, "gRPC inference port [7070]"),
    "--grpc-management-port": ("grpc_management_port", int, "gRPC management port, loopback only [7071]"),
    "--workers": ("workers_per_model", int, "workers per model version [1]"),
}


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, typ, text) in SERVE_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=text)


CONTROL_FLAGS = {
    # flag: (ControlConfig field, type, help)
    "--control-port": ("port", int, "control API (gRPC) port [MODELCTL_CONTROL_PORT, 50051]"),
    "--max-concurrent-jobs": ("max_concurrent_jobs", int, "fine-tuning jobs run at once [1]"),
    "--data-root": ("data_roots", Path, "a directory run specs may read datasets from (repeatable) "
                    "[MODELCTL_DATA_ROOTS, .]"),
}


def _add_control_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, typ, text) in CONTROL_FLAGS.items():
        action = "append" if dest == "data_roots" else "store"
        parser.add_argument(flag, dest=f"control_{dest}", type=typ, default=None, action=action, help=text)


def _control_config(args):
    from service.control.settings import ControlConfig

    return ControlConfig.from_env(**{dest: getattr(args, f"control_{dest}", None)
                                     for dest, _, _ in CONTROL_FLAGS.values()})


def _add_target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", default=None,
                        help="control API address [MODELCTL_CONTROL_TARGET, 127.0.0.1:$MODELCTL_CONTROL_PORT]")
    parser.add_argument("--token", default=None,
                        help="API token [MODELCTL_API_TOKEN_FILE, MODELCTL_API_TOKEN, $MODELCTL_STATE_DIR/api_token]")
    parser.add_argument("--tls-ca", default=None,
                        help="CA certificate (PEM) of a TLS control API [MODELCTL_CONTROL_TLS_CA]")


def _control_client(args):
    from service.control.api.client import ControlClient

    return ControlClient(args.control, token=args.token, tls_ca=args.tls_ca)


def _settings(args):
    from service.serving.settings import ServeSettings

    overrides = {dest: getattr(args, dest, None) for dest, _, _ in SERVE_FLAGS.values()}
    return ServeSettings.from_env(**{k: v for k, v in overrides.items() if v is not None})


# ---- commands ----------------------------------------------------------------------
def cmd_serve(args) -> int:
    from service.serving.engines import serving_class

    settings = _settings(args)
    if args.no_control:  # a serving replica: the control service runs elsewhere
        serving = serving_class(settings.engine)(settings)
    else:
        from service.app import with_control

        serving = with_control(settings.engine)(settings, _control_config(args))
    serving.run_forever()
    return 1 if getattr(serving, "failure", None) else 0


def cmd_demo(args) -> int:
    from service.demo import run_demo

    return run_demo(_settings(args), _control_config(args))


def cmd_models_archive(args) -> int:
    from service.models import ModelSpec, Vocabulary, build_model
    from service.modelstore import ModelBundle, ModelStore
    from service.models.bundle import read_weights
    from service.inference.options import ServingOptions

    spec = ModelSpec.from_dict(json.loads(Path(args.spec).read_text()))
    if args.weights:
        state_dict = read_weights(Path(args.weights))  # weights_only: pickled code is refused
    else:
        state_dict = build_model(spec).state_dict()  # random, or the spec's pretrained weights
    if args.labels:
        labels = json.loads(Path(args.labels).read_text())
    elif args.label_names:
        labels = [s.strip() for s in args.label_names.split(",")]
    else:
        labels = [str(i) for i in range(spec.num_classes)]
    vocab = Vocabulary.from_list(json.loads(Path(args.vocab).read_text())) if args.vocab else None
    store = ModelStore(args.store or _settings(args).model_store)
    info = store.write(
        args.name,
        ModelBundle(spec, state_dict, labels, vocab),
        version=args.version,
        options=ServingOptions(batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms),
    )
    print(f"wrote {info.name} version {info.version}: {info.path} ({info.size_bytes / 1e6:.1f} MB)")
    return 0


def cmd_models_list(args) -> int:
    from service.modelstore import ModelStore

    store = ModelStore(args.store or _settings(args).model_store)
    archives = store.list()
    # The deploy decisions recorded beside each version (deploy-if-faster's measurements).
    decisions = {(a.name, a.version): store.deploy_decisions(a.name, a.version) for a in archives}
    if args.json:
        print(json.dumps([{"path": str(a.path), **a.lineage, "deploy_decisions": decisions[(a.name, a.version)]}
                          for a in archives], indent=2))
        return 0
    print(f"{'MODEL':24} {'VERSION':>7}  {'FAMILY':12} {'CREATED':25} {'PARENT':10} SOURCE")
    for a in archives:
        lin = a.lineage
        parent = lin.get("parent") or "-"
        print(
            f"{a.name:24} {a.version:>7}  {lin.get('family', '?'):12} "
            f"{lin.get('created_at', '?'):25} {str(parent):10} {lin.get('source', '?')}"
        )
        for d in decisions[(a.name, a.version)][-1:]:
            print(f"{'':26}{d.get('policy', '?')} ({d.get('job_id', '?')}): {d.get('outcome', '?')}: "
                  f"{d.get('reason', '')}")
    return 0


def cmd_finetune_run(args) -> int:
    from service.training.run_command import run_command

    return run_command(args.spec, run_dir=args.run_dir, store=args.store or _settings(args).model_store,
                       data_roots=args.data_root)


def cmd_finetune_create(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        job = client.create_job(Path(args.spec), deploy=args.deploy, workers=args.workers, tolerance=args.tolerance)
        print(display.job_line(job), flush=True)
        if args.watch:
            return display.follow(client.watch(job.id), sys.stdout)
    return 0


def cmd_finetune_list(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        reply = client.list_jobs(states=[s.upper() for s in args.state or []], output_model=args.model or "",
                                 page_size=args.limit)
    print(display.jobs_table(reply.jobs))
    return 0


def cmd_finetune_get(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        job = client.get_job(args.job_id)
    print(display.as_json(job) if args.json else display.job_text(job))
    return 0


def cmd_finetune_watch(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        return display.follow(client.watch(args.job_id, skip_history=args.new_only), sys.stdout)


def cmd_finetune_cancel(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        print(display.job_line(client.cancel_job(args.job_id)))
    return 0


def cmd_models_deploy(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        print(display.deployment_line(client.deploy(args.name, args.version, workers=args.workers,
                                                    timeout_s=args.timeout)))
    return 0


def cmd_models_rollback(args) -> int:
    from service.control.api import display

    with _control_client(args) as client:
        print(display.deployment_line(client.rollback(args.name, args.to or 0, workers=args.workers)))
    return 0


def cmd_predict(args) -> int:
    from service.predict_client import PredictionClient, read_token

    settings = _settings(args)
    token = args.token or read_token(settings.state_dir)
    client = PredictionClient(
        rest_url=f"http://{settings.host}:{settings.inference_port}",
        grpc_target=f"{settings.host}:{settings.grpc_inference_port}",
        token=token,
    )
    if args.image:
        inputs = {Path(p).name: Path(p).read_bytes() for p in args.image}
    elif args.json is not None:
        text = Path(args.json[1:]).read_text() if args.json.startswith("@") else args.json
        inputs = {"body": text.encode()}
    elif args.text is not None:
        inputs = {"body": json.dumps({"inputs": args.text}).encode()}
    else:
        raise SystemExit("predict needs --image, --json or --text")
    call = client.grpc if args.grpc else client.rest
    print(json.dumps(call(args.model, inputs, version=args.version, k=args.k), indent=2))
    return 0


# ---- parser ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelctl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start TorchServe, the gRPC gateway and the control API; serve every archive")
    _add_serve_flags(p)
    _add_control_flags(p)
    p.add_argument("--no-control", action="store_true",
                   help="serve only (a replica; the control service runs elsewhere and deploys through "
                        "the model store's desired state)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="serve three archives, fine-tune two through the control API, "
                                     "deploy if better, predict held-out digits over REST and gRPC")
    _add_serve_flags(p)
    _add_control_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="ask a served model for its top-k labels")
    p.add_argument("model")
    p.add_argument("--version", default=None)
    p.add_argument("--image", nargs="+", help="JPEG/PNG files, several in one request")
    p.add_argument("--json", help="JSON body, or @file")
    p.add_argument("--text", help="raw text for a text model")
    p.add_argument("-k", type=int, default=None, help="number of labels (default 5)")
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    p.add_argument("--token", default=None,
                   help="API token [MODELCTL_API_TOKEN_FILE, MODELCTL_API_TOKEN, <state dir>/api_token]")
    _add_serve_flags(p)
    p.set_defaults(func=cmd_predict)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_cmd", required=True)
    p = models.add_parser("archive", help="write a new archive version from a spec and weights")
    p.add_argument("--name", required=True)
    p.add_argument("--spec", required=True, help="model spec JSON file")
    p.add_argument("--weights", help="state_dict file (torch.save); default: build from the spec")
    p.add_argument("--labels", help="JSON list of label names")
    p.add_argument("--label-names", help="comma-separated label names")
    p.add_argument("--vocab", help="JSON list of tokens for a text model")
    p.add_argument("--version", type=int, default=None, help="default: next free version")
    p.add_argument("--store", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-delay-ms", type=int, default=5)
    p.set_defaults(func=cmd_models_archive)
    p = models.add_parser("list", help="every version with its lineage")
    p.add_argument("--store", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("deploy", help="register a version with TorchServe, wait for READY workers, make it "
                          "the default (control API)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--workers", type=int, default=0, help="workers for the version (default: the service's)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for READY (default: the service's)")
    _add_target_flag(p)
    p.set_defaults(func=cmd_models_deploy)
    p = models.add_parser("rollback", help="restore the default before the latest deployment (control API)")
    p.add_argument("name")
    p.add_argument("--to", type=int, default=None, help="roll back to this version instead")
    p.add_argument("--workers", type=int, default=0)
    _add_target_flag(p)
    p.set_defaults(func=cmd_models_rollback)

    finetune = sub.add_parser("finetune", help="fine-tuning runs").add_subparsers(dest="finetune_cmd", required=True)
    p = finetune.add_parser("run", help="run a fine-tuning spec in the foreground; a new archive version at the end")
    p.add_argument("spec", help="run spec, JSON or YAML")
    p.add_argument("--run-dir", default=None, help="checkpoints and events; the same dir resumes "
                   "[$MODELCTL_RUNS_DIR/<name>-<spec digest>]")
    p.add_argument("--store", default=None, help="model store [MODELCTL_MODEL_STORE, ./model_store]")
    p.add_argument("--data-root", action="append", default=None,
                   help="a directory datasets may be read from (repeatable) [$MODELCTL_DATA_ROOTS, .]")
    p.set_defaults(func=cmd_finetune_run)
    p = finetune.add_parser("create", help="submit a run spec as a job to the control API")
    p.add_argument("spec", help="run spec, JSON or YAML")
    p.add_argument("--deploy", choices=["none", "deploy", "deploy-if-better", "deploy-if-faster"], default="none",
                   help="what to do with the new version [none]; deploy-if-faster: only when faster than the "
                        "serving version and its metric is within --tolerance of that version's")
    p.add_argument("--tolerance", type=float, default=None,
                   help="deploy-if-faster: how much worse the metric may be, 0 to 1 in metric units "
                        "(absolute on the loss side for mse) [0.01]")
    p.add_argument("--workers", type=int, default=0, help="workers of the deployed version (default: the service's)")
    p.add_argument("--watch", action="store_true", help="then follow it until it ends")
    _add_target_flag(p)
    p.set_defaults(func=cmd_finetune_create)
    p = finetune.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--model", default=None, help="only jobs writing this model")
    p.add_argument("--limit", type=int, default=50)
    _add_target_flag(p)
    p.set_defaults(func=cmd_finetune_list)
    p = finetune.add_parser("get", help="one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    _add_target_flag(p)
    p.set_defaults(func=cmd_finetune_get)
    p = finetune.add_parser("watch", help="follow a job live: state changes and epochs")
    p.add_argument("job_id")
    p.add_argument("--new-only", action="store_true", help="skip the epochs done so far")
    _add_target_flag(p)
    p.set_defaults(func=cmd_finetune_watch)
    p = finetune.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    _add_target_flag(p)
    p.set_defaults(func=cmd_finetune_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
