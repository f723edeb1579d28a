"""How fast can a student be? The serving floor of the distillation group's speed target.

``python -m benchmarks.speed_floor [--store .modelctl/eval/store] [--teacher eval-fashion-cnn:1]``
copies the teacher's archive into a scratch store (``<work dir>/speed-floor``) as version 1
and writes beside it, with the teacher's input spec, labels and default serving options:

* version 2: the smallest CNN the family builds, one conv block of one channel (untrained:
  speed does not depend on the weights);
* version 3 and on: untrained CNNs of the ``--channels`` given (default: the table's
  student).

Each is measured against the teacher by the speed check of ``deploy-if-faster``
(service/deploy/speed.py: decode, preprocess, forward and top-k of a request, alternating
rounds, batch-1 p50 and batch-8 throughput), and one JSON line is printed per version. The
one-channel CNN's ratio is the most any student of this input can reach on this machine:
what every request costs besides the forward.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.quality import STUDENT_CNN


def _cnn_bundle(teacher, channels: list[int]):
    from service.models import ModelSpec, build_model
    from service.modelstore import ModelBundle

    spec = ModelSpec.from_dict({**teacher.spec.to_dict(), "config": {"channels": channels, "dropout": 0.0}})
    model = build_model(spec)
    return ModelBundle(spec, {k: v.detach().clone() for k, v in model.state_dict().items()}, list(teacher.labels),
                       teacher.vocab, {"source": "benchmarks.speed_floor", "untrained": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path(".modelctl/eval/store"))
    parser.add_argument("--teacher", default="eval-fashion-cnn:1")
    parser.add_argument("--work-dir", type=Path, default=Path(".modelctl/eval"))
    parser.add_argument("--channels", nargs="*", default=[",".join(map(str, STUDENT_CNN["config"]["channels"]))],
                        help="comma-separated channels of each further CNN")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)

    from service.deploy.speed import run_speed_check
    from service.modelstore import ModelBundle, ModelStore

    name, version = args.teacher.split(":")
    teacher = ModelBundle.from_archive(ModelStore(args.store).get(name, int(version)).path)
    scratch = args.work_dir / "speed-floor"
    shutil.rmtree(scratch, ignore_errors=True)
    store = ModelStore(scratch)
    store.write("floor", teacher, version=1)
    variants = [[1]] + [[int(c) for c in spec.split(",")] for spec in args.channels]
    for v, channels in enumerate(variants, start=2):
        bundle = _cnn_bundle(teacher, channels)
        store.write("floor", bundle, version=v)
        params = sum(t.numel() for k, t in bundle.state_dict.items() if not k.endswith(("running_mean",
                     "running_var", "num_batches_tracked")))
        check = run_speed_check(scratch, "floor", v, 1, device="cpu", rounds=args.rounds, timeout_s=600)
        if not check.measured:
            print(f"speed check of {channels} failed: {check.error}", file=sys.stderr)
            return 1
        print(json.dumps({"channels": channels, "parameters": params,
                          "throughput_b8_ratio": check.new_throughput_b8 / check.serving_throughput_b8,
                          "p50_b1_ms": check.new_p50_ms_b1, "teacher_p50_b1_ms": check.serving_p50_ms_b1,
                          "throughput_b8": check.new_throughput_b8,
                          "teacher_throughput_b8": check.serving_throughput_b8}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
