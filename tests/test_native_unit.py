"""The native engine's parts without a server: its OIP v2 tensor names against the test
clients', and the batch target of its device runner. The engine on free ports is
tests/test_native.py."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput
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


def test_rest_connections_are_accepted_with_tcp_nodelay():
    """The REST port's accepted connections send small writes at once. Before, the socket was
    made with protocol 0, asyncio left Nagle on, and every REST answer's last write waited
    for the client's delayed ACK (about 40 ms a call; BENCHMARKS.md (d))."""
    import asyncio
    import socket

    from service.serving.native.engine import bind

    listening = bind("127.0.0.1", 0)
    seen = []

    async def main():
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listening)
        port = listening.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen and seen[0] != 0


@pytest.mark.parametrize("datatype,value", [("FP32", 1e300), ("FP16", 70000.0), ("INT8", 300), ("UINT8", -1)])
def test_json_numbers_past_the_datatype_range_are_refused_not_wrapped_or_made_inf(datatype, value):
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}"):
        oip.from_json("x", datatype, [2], [1, value])
    assert oip.from_json("x", datatype, [2], [1, 2]).data.tolist() == [1, 2]
