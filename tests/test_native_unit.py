"""The native engine's parts without a server: its OIP v2 tensor names against the test
clients', and the batch target of its device runner. The engine on free ports is
tests/test_native.py."""

from __future__ import annotations

import pytest

from service.serving.native import oip
from service.serving.native.runner import batch_target
from tests import oip_clients

pytestmark = pytest.mark.unit


def test_tensor_names_agree_with_the_test_clients():
    assert (oip.IMAGES, oip.SEQUENCES, oip.LENGTHS, oip.TEXTS, oip.TOP_K) == (
        oip_clients.IMAGES, oip_clients.SEQUENCES, oip_clients.LENGTHS, oip_clients.TEXTS, oip_clients.TOP_K)
    assert (oip.LABELS, oip.PROBABILITIES, oip.CLASSES) == oip_clients.OUTPUTS


def test_batch_target_waits_for_what_is_in_flight_or_came_back():
    assert batch_target(queued=1, in_flight=1, last_batch=1, max_batch=8) == 1  # c=1: no wait
    assert batch_target(queued=1, in_flight=1, last_batch=8, max_batch=8) == 8  # the closed loop returns
    assert batch_target(queued=2, in_flight=6, last_batch=1, max_batch=8) == 6
    assert batch_target(queued=3, in_flight=40, last_batch=8, max_batch=8) == 8  # never past the batch size
