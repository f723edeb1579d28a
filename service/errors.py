"""Named errors of the service, and their one mapping to wire statuses.

Code anywhere in the package raises these. Only the edges (the TorchServe handler,
the gRPC servers' error interceptor, the CLI) translate them, through ``http_status`` and
``grpc_status`` below, so a status code is decided in exactly one place. An error body that
crossed a process (the handler's, read back by the gRPC gateway) is turned back into its
named error by its ``type`` (:func:`from_body`).
"""

from __future__ import annotations

import reprlib

#: The most characters of a caller's value that an error message shows (:func:`shown`).
MAX_SHOWN_CHARS = 200


class _BoundedRepr(reprlib.Repr):
    """``repr`` that never walks or builds more than a bounded part of a value: three levels,
    eight items a level, 80 characters a string (a YAML alias bomb is small in memory and
    exponential as text)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 8, 8, 8, 8
        self.maxfrozenset = self.maxdeque = self.maxarray = 8
        self.maxstring = self.maxother = 80

    def repr_int(self, x, level):
        if x.bit_length() > 128:  # str() of a huge int is slow, and refused past 4300 digits
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _BoundedRepr()


def shown(value, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters however large or
    deep ``value`` is (nested values are elided with ``...``)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - an odd object's __repr__ must not turn an error into another
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    #: Name of the matching gRPC status code (a ``grpc.StatusCode`` member name).
    grpc_code = "INTERNAL"
    #: Matching HTTP status.
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        """The error body, shaped like TorchServe's own error bodies."""
        return {"code": self.http_status, "type": self.type, "message": self.message}


class InvalidArgument(ServiceError):
    """The caller sent something malformed: a bad payload, field or option."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class InvalidInput(InvalidArgument):
    """A prediction payload that cannot be decoded or does not fit the model."""


class PayloadTooLarge(InvalidArgument):
    """A request body or decoded input over the configured limit."""

    http_status = 413


class InvalidSpec(InvalidArgument):
    """A model, run or archive spec with an invalid field.

    ``field`` is the dotted path of the offending field, so the message can name it.
    """

    def __init__(self, field: str, message: str, allowed=None):
        self.field = field
        self.allowed = list(allowed) if allowed is not None else None
        text = f"{field}: {message}"
        if self.allowed is not None:
            text += f" (allowed: {', '.join(map(str, self.allowed))})"
        super().__init__(text)


class Unauthenticated(ServiceError):
    """A call without the operator's API token, or with a wrong one."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class NotFound(ServiceError):
    """A model, version, job or file that does not exist."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(ServiceError):
    """Something immutable that exists already, such as an archive version."""

    grpc_code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(ServiceError):
    """The request is valid but the system is not in a state to carry it out."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class PretrainedWeightsNotFound(FailedPrecondition):
    """Pretrained weights were asked for but are not on this machine."""

    def __init__(self, what: str, searched):
        self.searched = [str(p) for p in searched]
        where = "; ".join(self.searched) if self.searched else "(nowhere)"
        super().__init__(f"pretrained weights for {what} not found; looked in: {where}")


class ArchiveRefused(FailedPrecondition):
    """A model store archive that fails the check run before registration
    (:mod:`service.modelstore.check`): it is not registered, and a deployment of it is
    refused. ``path`` is the archive, ``problem`` what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"archive {self.path} is refused: {problem}")


class Internal(ServiceError):
    """A failure of the service itself (a bug), reported for one request while the
    others of its batch are still answered."""


class ResourceExhausted(ServiceError):
    """Too many requests: a full queue. Callers should retry later."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unavailable(ServiceError):
    """A dependency (TorchServe, a worker) is not reachable or not ready."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class StoreUnwritable(Unavailable):
    """The model store refused a write: its filesystem is full (ENOSPC, EDQUOT, EFBIG) or
    not writable (EROFS, EACCES, EPERM). Nothing partial was published."""


def error_types() -> dict[str, type[ServiceError]]:
    """The named errors of this module by their ``type`` (class name), ServiceError included:
    the one table an error body's ``type`` is read through (:func:`from_body`)."""
    found, todo = {}, [ServiceError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def from_body(body: dict) -> ServiceError:
    """The named error an error body (:meth:`ServiceError.to_dict`, as a handler answers it)
    stands for, chosen by its ``type``, with its ``message``; a type this module does not name
    is a plain ServiceError (INTERNAL). The body's ``code`` is not read: the type decides both
    statuses."""
    cls = error_types().get(body.get("type"), ServiceError)
    err = cls.__new__(cls)  # some named errors build their message from other arguments
    ServiceError.__init__(err, str(body.get("message", "")))
    return err


def http_status(exc: BaseException) -> int:
    """HTTP status for any exception: a ServiceError's own, else 500."""
    return exc.http_status if isinstance(exc, ServiceError) else 500


def grpc_status(exc: BaseException):
    """``grpc.StatusCode`` for any exception: a ServiceError's own, else INTERNAL."""
    import grpc  # imported here: the models and the trainer must not need grpc

    name = exc.grpc_code if isinstance(exc, ServiceError) else "INTERNAL"
    return getattr(grpc.StatusCode, name)
