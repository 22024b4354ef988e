"""The coordinator's request/reply format (version 1), shared by the server and the clients.

Transport: ZeroMQ. The coordinator binds a ROUTER on ``ipc://<data_dir>/coordinator.sock``;
a client connects a DEALER (or a REQ) and sends one frame per request, the body. The reply
comes back on the same envelope with one body frame. Bodies are msgpack maps (never pickle:
a request must not be able to run code in the broker). The whole format, field by field, is in
docs/design/broker.md; in short::

    request  {"v": 1, "id": <uint>, "type": "<request type>", **fields of that type}
    ok       {"v": 1, "id": <same>, "ok": true,  "result": {...}}
    error    {"v": 1, "id": <same or null>, "ok": false,
              "error": {"code": <int>, "name": "<class in shmbroker.errors>",
                        "message": "<one line>", "retriable": <bool>}}

``id`` is chosen by the client and echoed, so a client that timed out can recognise (and drop)
a late reply to an earlier request. A body that cannot be decoded is answered with ``id`` null.
"""
from __future__ import annotations

from typing import Any

import msgpack

from .. import errors

PROTOCOL_VERSION = 1
#: Request ids are unsigned 64-bit.
REQUEST_ID_MAX = (1 << 64) - 1

#: type -> {field: (python types, required)}. The only requests version 1 knows.
REQUEST_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "create_topic": {"name": ((str,), True), "partitions": ((int,), True),
                     "config": ((dict, type(None)), False)},
    "delete_topic": {"name": ((str,), True)},
    "list_topics": {},
    "describe_topic": {"name": ((str,), True)},
    "alter_partitions": {"name": ((str,), True), "partitions": ((int,), True)},
    # Consumer groups (served by group_service.py). Partitions are always arrays, never map
    # keys: the decoder accepts string map keys only (strict_map_key), so that a request
    # cannot smuggle in other key types.
    "join": {"group_id": ((str,), True), "member_id": ((str,), True),
             "group_instance_id": ((str, type(None)), False), "client_id": ((str,), True),
             "pid": ((int,), True), "host": ((str,), True), "topics": ((list,), True),
             "protocols": ((list,), True), "session_timeout_ms": ((int,), False),
             "rebalance_timeout_ms": ((int,), False), "sync": ((bool,), False),
             "commit": ((dict,), False)},
    "sync": {"group_id": ((str,), True), "member_id": ((str,), True),
             "generation_id": ((int,), True), "group_instance_id": ((str, type(None)), False)},
    "heartbeat": {"group_id": ((str,), True), "member_id": ((str,), True),
                  "generation_id": ((int,), True), "group_instance_id": ((str, type(None)), False)},
    "leave": {"group_id": ((str,), True), "member_id": ((str,), True),
              "group_instance_id": ((str, type(None)), False)},
    "offset_commit": {"group_id": ((str,), True), "member_id": ((str,), True),
                      "generation_id": ((int,), True),
                      "group_instance_id": ((str, type(None)), False),
                      "offsets": ((dict,), True)},
    "offset_fetch": {"group_id": ((str,), True), "topics": ((dict, type(None)), False)},
    "groups_list": {},
    "group_describe": {"group_id": ((str,), True)},
    "group_delete": {"group_id": ((str,), True)},
}
#: The request types the coordinator hands to its GroupService.
GROUP_REQUEST_TYPES = frozenset({"join", "sync", "heartbeat", "leave", "offset_commit",
                                 "offset_fetch", "groups_list", "group_describe", "group_delete"})
_ENVELOPE_FIELDS = {"v", "id", "type"}


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def request(request_id: int, request_type: str, **fields: Any) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "type": request_type, **fields})


def ok_reply(request_id: int | None, result: dict[str, Any]) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result})


def error_reply(request_id: int | None, exc: errors.ShmbrokerError) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
                   "error": error_fields(exc)})


def error_fields(exc: errors.ShmbrokerError) -> dict[str, Any]:
    """An error reply's ``error`` (also what a join answer says of the commit it carried)."""
    name = type(exc).__name__ if type(exc).__module__ == errors.__name__ else "ShmbrokerError"
    return {"code": exc.code, "name": name, "message": str(exc), "retriable": exc.retriable}


def decode_request(body: bytes, spec_by_type: dict | None = None
                   ) -> tuple[int | None, str, dict[str, Any]]:
    """``(id, type, fields)`` of a request, checked against ``spec_by_type`` (default
    :data:`REQUEST_FIELDS`; the router passes the coordinator's types and its own).

    Raises (always with the best ``id`` known so far, as ``exc.request_id``):
    InvalidRequestError for bytes that are not a msgpack map or fields that are missing,
    unknown or mistyped; UnsupportedVersionError for another protocol version.
    """
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise _invalid(None, f"request is not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise _invalid(None, f"request must be a msgpack map, got {type(message).__name__}")
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= REQUEST_ID_MAX:
        raise _invalid(None, f"request id must be an unsigned 64-bit integer, got {request_id!r}")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        exc = errors.UnsupportedVersionError(
            f"coordinator protocol version {version!r} is not supported (this broker speaks "
            f"version {PROTOCOL_VERSION})")
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise exc
    known = REQUEST_FIELDS if spec_by_type is None else spec_by_type
    request_type = message.get("type")
    if not isinstance(request_type, str) or request_type not in known:
        raise _invalid(request_id, f"unknown request type {request_type!r:.100}; known: "
                                   f"{', '.join(sorted(known))}")
    spec = known[request_type]
    fields = {k: v for k, v in message.items() if k not in _ENVELOPE_FIELDS}
    unknown = fields.keys() - spec.keys()
    if unknown:
        raise _invalid(request_id, f"{request_type}: unknown field(s) {sorted(unknown)}")
    for name, (types, required) in spec.items():
        if name not in fields:
            if required:
                raise _invalid(request_id, f"{request_type}: missing field {name!r}")
            continue
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _invalid(request_id, f"{request_type}: field {name!r} has the wrong type "
                                       f"({type(value).__name__})")
    return request_id, request_type, fields


def decode_reply(body: bytes) -> tuple[int | None, dict[str, Any] | errors.ShmbrokerError]:
    """``(id, result)`` of an ok reply, ``(id, exception)`` of an error reply (the class it
    names). The caller matches the id before raising, so a late error meant for an earlier
    request is not raised for the current one."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise errors.InvalidRequestError(f"coordinator reply is not msgpack ({type(exc).__name__})") from None
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise errors.UnsupportedVersionError(f"coordinator reply in an unknown format: {message!r:.200}")
    if message.get("ok") is True:
        result = message.get("result")
        return message.get("id"), result if isinstance(result, dict) else {}
    return message.get("id"), exception_from_error(message.get("error"))


def exception_from_error(error: Any) -> errors.ShmbrokerError:
    """The exception an error reply describes: the class named, if it is one of ours, else the
    most general class for the code."""
    if not isinstance(error, dict):
        return errors.ShmbrokerError(f"malformed error reply: {error!r:.200}")
    cls = getattr(errors, str(error.get("name")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ShmbrokerError)):
        cls = errors.ERRORS_BY_CODE.get(error.get("code"), errors.ShmbrokerError)
    message = str(error.get("message", ""))
    if cls is errors.CorruptSegmentError:
        return errors.CorruptSegmentError(message)
    return cls(message)


def _invalid(request_id: int | None, message: str) -> errors.InvalidRequestError:
    exc = errors.InvalidRequestError(message)
    exc.request_id = request_id  # type: ignore[attr-defined]
    return exc
