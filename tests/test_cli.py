"""`modelctl models archive|list` through the real entry point and a real store."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from service.cli import main
from service.modelstore import ModelStore
from tests.helpers import SPECS, make_bundle

pytestmark = pytest.mark.unit


def test_archive_then_list(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPECS["lstm"]))
    weights = tmp_path / "w.pt"
    bundle = make_bundle("lstm", seed=4)
    torch.save(bundle.state_dict, weights)
    store = tmp_path / "store"
    args = ["models", "archive", "--name", "seq", "--spec", str(spec), "--weights", str(weights),
            "--label-names", "up,down,flat", "--store", str(store)]
    assert main(args) == 0
    assert "wrote seq version 1" in capsys.readouterr().out
    with zipfile.ZipFile(store / "seq" / "1.mar") as z:
        z.extract("weights.pt", tmp_path / "x")
        assert json.loads(z.read("labels.json")) == ["up", "down", "flat"]
    saved = torch.load(tmp_path / "x" / "weights.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in bundle.state_dict.items())

    # The same version again is refused, and the stored archive is kept.
    before = (store / "seq" / "1.mar").read_bytes()
    assert main([*args, "--version", "1"]) == 2
    assert "versions are immutable" in capsys.readouterr().err
    assert (store / "seq" / "1.mar").read_bytes() == before

    assert main(["models", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "seq" in out and "rnn" in out
    assert main(["models", "list", "--store", str(store), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["name"], x["version"]) for x in listed] == [("seq", 1)]
    assert ModelStore(store).versions("seq") == [1]


def test_invalid_spec_names_the_field(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPECS["lstm"], "config": {**SPECS["lstm"]["config"], "cell": "transformer"}}))
    assert main(["models", "archive", "--name", "m", "--spec", str(spec), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "config.cell" in err and "lstm" in err
    assert not (tmp_path / "s" / "m").exists() or ModelStore(tmp_path / "s").versions("m") == []
