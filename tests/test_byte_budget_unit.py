"""The TorchServe engine's byte budget without a server (service/serving/torchserve/budget.py):
its derivation from the frontend's heap, the size classes, the Content-Length regexes, nginx's
text and the gateway's byte admission. The real nginx and a real TorchServe under large bodies
are tests/test_byte_budget.py."""

from __future__ import annotations

import json
import random
import re

import pytest

from service.errors import InvalidArgument
from service.serving.settings import ServeSettings
from service.serving.torchserve.budget import (
    MiB,
    above_regex,
    endpoint_shares,
    size_classes,
    worst_case,
)
from service.serving.torchserve.gateway import ByteAdmission
from service.serving.torchserve.proxy import render_nginx_conf
from tests.test_byte_budget import TOKEN, KiB

pytestmark = pytest.mark.unit


def test_the_budget_is_derived_from_the_frontend_heap(tmp_path):
    s = ServeSettings(model_store=tmp_path)
    assert s.engine == "torchserve" and s.frontend_heap_mb == 512
    # (512 MiB heap - 128 MiB kept for the frontend) / 2 copies of each body = 192 MiB.
    assert s.frontend_reserve_bytes == 128 * MiB
    assert s.inflight_bytes_budget == s.frontend_bytes_budget == 192 * MiB
    assert endpoint_shares(s) == (96 * MiB, 96 * MiB)
    for heap, budget in ((128, 32), (256, 96), (1024, 384), (4096, 1536)):
        assert ServeSettings(frontend_heap_mb=heap).inflight_bytes_budget == budget * MiB, heap
    assert ServeSettings.from_env({"MODELCTL_FRONTEND_HEAP_MB": "1024"}).inflight_bytes_budget == 384 * MiB
    # The operator's value wins, above or below the derived one.
    for value in (40 * MiB, 3000 * MiB):
        s = ServeSettings.from_env({"MODELCTL_MAX_INFLIGHT_BYTES": str(value)})
        assert s.inflight_bytes_budget == value
        assert sum(endpoint_shares(s)) == value
    # The native engine keeps its own derivation (job_queue_size x body limit / 4).
    native = ServeSettings(engine="native")
    assert native.inflight_bytes_budget == native.native_bytes_budget == 400 * MiB
    assert ServeSettings(engine="native", frontend_heap_mb=64).inflight_bytes_budget == 400 * MiB


def test_a_budget_must_hold_one_whole_request_per_endpoint():
    with pytest.raises(InvalidArgument, match=r"^MODELCTL_FRONTEND_HEAP_MB: frontend_heap_mb is too small: "
                                              r"100 MiB leaves a byte budget of 18874368 bytes"):
        ServeSettings.from_env({"MODELCTL_FRONTEND_HEAP_MB": "100"})
    with pytest.raises(InvalidArgument, match="frontend_heap_mb is too small: 64 MiB leaves a byte budget of 0"):
        ServeSettings(frontend_heap_mb=64)
    # A smaller body limit fits a smaller heap.
    assert ServeSettings(frontend_heap_mb=100, max_request_size_bytes=8 * MiB).inflight_bytes_budget == 18 * MiB
    with pytest.raises(InvalidArgument, match=r"^MODELCTL_MAX_INFLIGHT_BYTES: max_inflight_bytes must be 0 or "
                                              r"at least 33554432 for the TorchServe engine"):
        ServeSettings.from_env({"MODELCTL_MAX_INFLIGHT_BYTES": str(32 * MiB - 1)})
    assert ServeSettings(max_inflight_bytes=32 * MiB).inflight_bytes_budget == 32 * MiB
    # The native engine needs one request only.
    assert ServeSettings(engine="native", max_inflight_bytes=16 * MiB).inflight_bytes_budget == 16 * MiB


def test_size_classes_of_the_default_share():
    classes = size_classes(96 * MiB, 16 * MiB)
    assert [(c.above, c.top, c.places, c.nested_places) for c in classes] == [
        (0, 256 * KiB, 48, 69), (256 * KiB, 1 * MiB, 12, 21), (1 * MiB, 4 * MiB, 6, 9), (4 * MiB, 16 * MiB, 3, 3)]
    assert [c.nested_bytes for c in classes] == [96 * MiB, 84 * MiB, 72 * MiB, 48 * MiB]
    assert worst_case(classes) == 96 * MiB


@pytest.mark.parametrize("max_request", [1000, 200 * KiB, 256 * KiB, 256 * KiB + 1, 1 * MiB, 3 * MiB, 16 * MiB,
                                         64 * MiB])
def test_size_classes_never_hold_more_than_the_share(max_request):
    rng = random.Random(max_request)
    for share in [max_request, max_request + 1, 2 * max_request - 1, 3 * max_request] + \
            [rng.randrange(max_request, 40 * max_request) for _ in range(50)]:
        classes = size_classes(share, max_request)
        assert worst_case(classes) <= share, (share, classes)
        assert classes[-1].top == max_request and classes[-1].places >= 1
        assert classes[0].above == 0 and classes[0].nested_bytes == share
        assert all(a.top == b.above for a, b in zip(classes, classes[1:]))
        assert [c.nested_places for c in classes] == sorted((c.nested_places for c in classes), reverse=True)
        for c in classes:  # the gateway's byte bound of a class is nginx's worst case of it
            if c.above:
                assert c.nested_bytes == sum(d.places * d.top for d in classes if d.above >= c.above)
    with pytest.raises(ValueError):
        size_classes(max_request - 1, max_request)


def test_above_regex_is_a_numeric_comparison():
    rng = random.Random(7)
    limits = [0, 1, 9, 10, 99, 100, 101, 262144, 1048576, 4194304, 16777216, 999999] + \
        [rng.randrange(10 ** rng.randrange(1, 11)) for _ in range(300)]
    for n in limits:
        pattern = re.compile(f"0*{above_regex(n)}")
        values = {0, 1, n - 1, n, n + 1, n + 2, 10 * n, n // 10, 10 ** len(str(n)), 10 ** len(str(n)) - 1}
        values |= {rng.randrange(3 * n + 3) for _ in range(30)} | {rng.randrange(10 ** 12) for _ in range(10)}
        for v in (v for v in values if v >= 0):
            for text in (str(v), "000" + str(v)):
                assert bool(pattern.fullmatch(text)) == (v > n), (n, text)


def test_nginx_conf_counts_bodies_by_size_class(tmp_path):
    s = ServeSettings(state_dir=tmp_path)
    text = render_nginx_conf(s, TOKEN, tmp_path / "proxy")
    key = '"$http_transfer_encoding:$content_length"'
    for above, places in ((0, 69), (262144, 21), (1048576, 9), (4194304, 3)):
        assert f"map {key} $modelctl_body_over_{above} {{" in text
        assert f"limit_conn_zone $modelctl_body_over_{above} zone=modelctl_bytes_over_{above}:64k;" in text
        assert f"limit_conn modelctl_bytes_over_{above} {places};" in text
    # Every body counts in the first zone (no body: not at all); above it, by Content-Length,
    # and a chunked body (Transfer-Encoding) in every zone.
    first = text[text.index("$modelctl_body_over_0 {"):]
    assert first[:first.index("}")].split("{", 1)[1].split() == ["default", "1;", '":"', '"";']
    for above in (262144, 1048576, 4194304):
        block = text[text.index(f"$modelctl_body_over_{above} {{"):]
        block = block[:block.index("\n    }")]
        assert 'default "";' in block and '"~^[^:]" 1;' in block
        assert f'"~^:0*{above_regex(above)}$" 1;' in block
    assert "limit_conn_status 429;" in text and "error_page 429 @busy;" in text
    busy = text[text.index("location @busy"):]
    assert "add_header Retry-After 1 always;" in busy
    message = json.loads(busy[busy.index("return 429 '") + 12:busy.index("';")])["message"]
    assert "more than 50 for this model" in message and "100663296 bytes" in message
    assert "max_inflight_bytes, 201326592" in message
    assert "client_body_buffer_size 1m;" in text and "proxy_request_buffering off" not in text

    # The operator's budget and a smaller body limit: fewer classes, other numbers.
    s = ServeSettings(state_dir=tmp_path, max_inflight_bytes=8 * MiB, max_request_size_bytes=1 * MiB)
    text = render_nginx_conf(s, TOKEN, tmp_path / "proxy")
    assert re.findall(r"limit_conn (modelctl_bytes_over_\d+) (\d+);", text) == [
        ("modelctl_bytes_over_0", "10"), ("modelctl_bytes_over_262144", "2")]
    assert worst_case(size_classes(4 * MiB, 1 * MiB)) == 4 * MiB


def test_gateway_byte_admission_keeps_room_for_small_messages():
    a = ByteAdmission(size_classes(96 * MiB, 16 * MiB), retry_after_s=3)
    big = 12 * MiB
    assert [a.acquire(big) for _ in range(5)] == [True] * 4 + [False]  # 48 MiB over 4 MiB
    assert a.held() == 48 * MiB
    assert [a.acquire(3 * MiB) for _ in range(9)] == [True] * 8 + [False]  # 72 MiB over 1 MiB
    assert [a.acquire(1 * MiB) for _ in range(13)] == [True] * 12 + [False]  # 84 MiB over 256 KiB
    assert a.acquire(12 * MiB) is False and a.held() == 84 * MiB
    # Large ones cannot take the last 12 MiB; small ones can, up to the share.
    smalls = 0
    while a.acquire(100 * KiB):
        smalls += 1
    assert smalls == (12 * MiB) // (100 * KiB)
    for n in [big] * 4 + [3 * MiB] * 8 + [1 * MiB] * 12 + [100 * KiB] * smalls:
        a.release(n)
    assert a.held() == 0 and set(a._held.values()) == {0}
    assert a.acquire(16 * MiB) and a.acquire(0)
    err, trailers = a.refusal(big)
    assert err.grpc_code == "RESOURCE_EXHAUSTED" and "100663296 bytes" in err.message
    assert dict(trailers) == {"retry-after": "3", "grpc-retry-pushback-ms": "3000"}
    assert ByteAdmission(None).acquire(10 ** 12)
