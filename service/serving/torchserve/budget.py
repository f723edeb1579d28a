"""The replica's byte budget, split between the two public endpoints of the TorchServe engine.

TorchServe's Java frontend holds every request body it has accepted (queued or running) in
its heap, one live copy each, and more while a body is received or handed to a worker. So
the bodies in flight on a replica, REST and gRPC together, are bounded by
``ServeSettings.inflight_bytes_budget`` (``MODELCTL_MAX_INFLIGHT_BYTES``, else derived from
``frontend_heap_mb``: ``(heap - reserve) / 2``, 192 MiB on the defaults). The two public
endpoints are separate processes, so each gets half, as they each get half of TorchServe's
job queue: nginx (REST) the lower half, the gateway (gRPC) the rest.

Within an endpoint's share, bodies are sorted into size classes, whose tops are
:data:`CLASS_TOPS` below ``max_request_size_bytes`` and ``max_request_size_bytes`` itself. Each
class gets a number of places (:func:`size_classes`), from the largest down: the largest
half the share (at least one place), each smaller class half of what is left, the smallest
all the rest. With a 96 MiB share and 16 MiB bodies: 3 places over 4 MiB, 6 over 1 MiB up to
4 MiB, 12 over 256 KiB up to 1 MiB, 48 up to 256 KiB; 3x16 + 6x4 + 12x1 + 48x0.25 = 96 MiB.

* nginx cannot count bytes, only connections: one ``limit_conn`` zone per class top,
  counting every request whose body is larger than the class below (``Content-Length``; a
  body without one, chunked, counts in every zone, as the largest), limited to the places of
  its class and of every larger one (:attr:`SizeClass.nested_places`). Whatever the mix, the
  admitted bodies sum to at most the share, each counted at its class's top.
* the gateway counts each message's exact size (``ByteSize()``): the bytes of messages over a
  class's lower bound are at most the bytes of the places of that class and every larger one
  (:attr:`SizeClass.nested_bytes`), the smallest class's bound being the whole share.

Either way the places of the smallest class stay free for small requests while large ones
take all theirs: a flood of large bodies is answered 429 / RESOURCE_EXHAUSTED, and small
requests keep going through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
#: Tops of the size classes below ``max_request_size_bytes`` (which tops the largest class).
CLASS_TOPS = (256 * KiB, 1 * MiB, 4 * MiB)


@dataclass(frozen=True)
class SizeClass:
    """Bodies larger than ``above`` up to ``top`` bytes, and their places on one endpoint."""

    above: int
    top: int
    #: Requests of this class the endpoint admits at once when the larger classes are full.
    places: int
    #: Requests over ``above`` admitted at once: the places of this class and of every larger one.
    nested_places: int
    #: Bytes of messages over ``above`` admitted at once (the gateway): this class's
    #: ``places x top`` and every larger class's; for the smallest class, the whole share.
    nested_bytes: int


def endpoint_shares(settings) -> tuple[int, int]:
    """``(REST, gRPC)``: the byte budget's halves for nginx and for the gateway."""
    budget = settings.inflight_bytes_budget
    return budget // 2, budget - budget // 2


def size_classes(share: int, max_request: int) -> list[SizeClass]:
    """The size classes of one endpoint's ``share``, smallest first (see the module doc)."""
    if share < max_request:
        raise ValueError(f"a share of {share} bytes cannot hold one request of {max_request}")
    tops = [t for t in CLASS_TOPS if t < max_request] + [max_request]
    places: dict[int, int] = {}
    left = share
    for i, top in enumerate(reversed(tops)):
        if i == len(tops) - 1:
            n = left // top  # the smallest class: all that is left
        else:
            n = (left // 2) // top
        if i == 0:
            n = max(1, n)  # one whole request at least
        places[top] = n
        left -= n * top
    out = []
    nested_places = nested_bytes = 0
    for i in reversed(range(len(tops))):
        top = tops[i]
        nested_places += places[top]
        nested_bytes += places[top] * top
        out.append(SizeClass(above=tops[i - 1] if i else 0, top=top, places=places[top],
                             nested_places=nested_places,
                             nested_bytes=share if i == 0 else nested_bytes))
    return out[::-1]


def worst_case(classes: list[SizeClass]) -> int:
    """The most bytes an endpoint can hold: every class full, each body at its class's top."""
    return sum(c.places * c.top for c in classes)


def above_regex(n: int) -> str:
    """A regex (no anchors) for the decimal numbers greater than ``n``, written without
    leading zeros (match ``0*`` before it for those)."""
    if n < 0:
        raise ValueError(n)
    low = str(n + 1)
    width = len(low)
    parts = [f"[1-9]\\d{{{width},}}"]  # more digits
    for i, digit in enumerate(low):  # as many digits: the same prefix, then a larger digit
        d = int(digit)
        if d < 9:
            rest = width - i - 1
            parts.append(re.escape(low[:i]) + f"[{d + 1}-9]" + (f"\\d{{{rest}}}" if rest else ""))
    parts.append(low)
    return "(?:" + "|".join(parts) + ")"
