"""The LayerWorker service's methods with fedff's frame codec on the data path.

The generated code (fedff/v1) serialises frames with protobuf, which copies the tensor
bytes several times. The two streaming methods that carry tensors (Train requests,
Forward both ways) use `serialize_frame` / `parse_frame` instead: the same wire format,
one copy per side. Everything else is the generated code's. A peer that uses only the
generated code interoperates. A request that does not parse at all is answered
INVALID_ARGUMENT, in every method, like any other malformed message.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import WireError, parse_frame, serialize_frame

SERVICE = "fedff.v1.LayerWorker"


def train_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(f"/{SERVICE}/Train", request_serializer=serialize_frame,
                                 response_deserializer=pb.TrainReply.FromString)


def forward_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(f"/{SERVICE}/Forward", request_serializer=serialize_frame,
                                 response_deserializer=parse_frame)


class Undecodable:
    """A request whose bytes did not parse: it reaches the method as this, so the method
    answers INVALID_ARGUMENT (gRPC itself would answer INTERNAL and log a traceback)."""

    def __init__(self, method: str, error: Exception):
        self.message = (f"{method}: the request is not a valid fedff.v1 message "
                        f"({type(error).__name__}: {error}); is the peer a fedff driver or "
                        f"worker of the same protocol version?")


def tolerant(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - whatever a stranger sent: refused below
            return Undecodable(method, e)
    return deserialize


def checked(requests: Iterator[Any]) -> Iterator[Any]:
    """A request stream that raises WireError (INVALID_ARGUMENT in every streaming
    method) at the first message that did not parse."""
    for request in requests:
        if isinstance(request, Undecodable):
            raise WireError(request.message)
        yield request


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, message)


def _unary(behavior: Callable[..., Any], refuse: Callable[..., None]) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)
    return call


def _streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(checked(requests), context)
    return call


def add_worker_to_server(servicer: pb_grpc.LayerWorkerServicer, server: grpc.Server) -> None:
    refuse = getattr(servicer, "refuse", _abort)  # fedff's servicer logs it, within a bound
    handlers = {
        "Train": grpc.stream_stream_rpc_method_handler(
            _streaming(servicer.Train), request_deserializer=tolerant("Train", parse_frame),
            response_serializer=pb.TrainReply.SerializeToString),
        "Forward": grpc.stream_stream_rpc_method_handler(
            _streaming(servicer.Forward), request_deserializer=tolerant("Forward", parse_frame),
            response_serializer=serialize_frame),
        "GetState": grpc.unary_stream_rpc_method_handler(
            _unary(servicer.GetState, refuse),
            request_deserializer=tolerant("GetState", pb.StateRequest.FromString),
            response_serializer=pb.StateChunk.SerializeToString),
        "SetState": grpc.stream_unary_rpc_method_handler(
            _streaming(servicer.SetState),
            request_deserializer=tolerant("SetState", pb.StateChunk.FromString),
            response_serializer=pb.WorkerStatus.SerializeToString),
        "Control": grpc.unary_unary_rpc_method_handler(
            _unary(servicer.Control, refuse),
            request_deserializer=tolerant("Control", pb.ControlRequest.FromString),
            response_serializer=pb.WorkerStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
