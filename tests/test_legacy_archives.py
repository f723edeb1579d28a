"""Archives written by the code before issue 14's clean-up still load and serve.

``tests/fixtures/archives-0b5d150/`` holds a model store written by commit 0b5d150, and that code's
own in-process answers to a few requests (its README says how it was made). Each engine of today's
code serves a copy of that store (a real TorchServe with the gateway, then the native engine, on
free ports), and every answer over REST must be the old one: same classes, same labels,
probabilities within 1e-4. The fixture itself is checked in tests/test_legacy_archives_unit.py.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import requests

from service.serving.engines import serving_class
from tests.helpers import engine_params
from tests.test_serving import settings_for

FIXTURE = Path(__file__).parent / "fixtures" / "archives-0b5d150"


def _fixture() -> dict:
    return json.loads((FIXTURE / "answers.json").read_text())


@pytest.fixture(scope="module", params=engine_params("torchserve", "native"))
def served(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"legacy-{request.param}")
    shutil.copytree(FIXTURE / "store", root / "store")
    settings = settings_for(root / "store", root / "state", engine=request.param, startup_timeout_s=120)
    serving = serving_class(request.param)(settings)
    report = serving.start()
    try:
        yield serving, settings, report
    finally:
        serving.stop()


def test_old_archives_serve_the_old_answers(served):
    serving, settings, report = served
    fixture = _fixture()
    assert {(r.name, str(r.version)) for r in report if r.ready} == {(name, "1") for name in fixture["models"]}
    headers = {"Authorization": f"Bearer {serving.api_token.value}"}
    for name, cases in fixture["models"].items():
        for case in cases:
            r = requests.post(f"http://127.0.0.1:{settings.inference_port}/predictions/{name}",
                              data=base64.b64decode(case["body"]), headers=headers, timeout=60)
            assert r.status_code == 200, (name, r.text)
            got, want = r.json(), case["answer"]
            assert (got["model"], got["version"]) == (name, "1")
            assert len(got["predictions"]) == len(want["predictions"]) > 0
            for g, w in zip(got["predictions"], want["predictions"]):
                assert [(e["index"], e["label"]) for e in g["top_k"]] == [(e["index"], e["label"]) for e in w["top_k"]]
                assert [e["probability"] for e in g["top_k"]] == pytest.approx(
                    [e["probability"] for e in w["top_k"]], abs=1e-4)
