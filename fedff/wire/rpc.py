"""The LayerWorker service's methods with fedff's frame codec on the data path.

The generated code (fedff/v1) serialises frames with protobuf, which copies the tensor
bytes several times. The two streaming methods that carry tensors (Train requests,
Forward both ways) use `serialize_frame` / `parse_frame` instead: the same wire format,
one copy per side. Everything else is the generated code's. A peer that uses only the
generated code interoperates.
"""

from __future__ import annotations

import grpc

from fedff.v1 import worker_pb2 as pb
from fedff.v1 import worker_pb2_grpc as pb_grpc
from fedff.wire.frames import parse_frame, serialize_frame

SERVICE = "fedff.v1.LayerWorker"


def train_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(f"/{SERVICE}/Train", request_serializer=serialize_frame,
                                 response_deserializer=pb.TrainReply.FromString)


def forward_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(f"/{SERVICE}/Forward", request_serializer=serialize_frame,
                                 response_deserializer=parse_frame)


def add_worker_to_server(servicer: pb_grpc.LayerWorkerServicer, server: grpc.Server) -> None:
    handlers = {
        "Train": grpc.stream_stream_rpc_method_handler(
            servicer.Train, request_deserializer=parse_frame,
            response_serializer=pb.TrainReply.SerializeToString),
        "Forward": grpc.stream_stream_rpc_method_handler(
            servicer.Forward, request_deserializer=parse_frame,
            response_serializer=serialize_frame),
        "GetState": grpc.unary_stream_rpc_method_handler(
            servicer.GetState, request_deserializer=pb.StateRequest.FromString,
            response_serializer=pb.StateChunk.SerializeToString),
        "SetState": grpc.stream_unary_rpc_method_handler(
            servicer.SetState, request_deserializer=pb.StateChunk.FromString,
            response_serializer=pb.WorkerStatus.SerializeToString),
        "Control": grpc.unary_unary_rpc_method_handler(
            servicer.Control, request_deserializer=pb.ControlRequest.FromString,
            response_serializer=pb.WorkerStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
