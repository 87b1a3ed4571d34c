from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    TRAIN: _ClassVar[FrameKind]
    EVAL: _ClassVar[FrameKind]
    END_EPOCH: _ClassVar[FrameKind]
    REPLAY: _ClassVar[FrameKind]

class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_UNSPECIFIED: _ClassVar[Command]
    CONFIGURE: _ClassVar[Command]
    STATUS: _ClassVar[Command]
    CHECKPOINT: _ClassVar[Command]
    SHUTDOWN: _ClassVar[Command]
FRAME_KIND_UNSPECIFIED: FrameKind
TRAIN: FrameKind
EVAL: FrameKind
END_EPOCH: FrameKind
REPLAY: FrameKind
COMMAND_UNSPECIFIED: Command
CONFIGURE: Command
STATUS: Command
CHECKPOINT: Command
SHUTDOWN: Command

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class FrameHeader(_message.Message):
    __slots__ = ("kind", "epoch", "n_pos", "tensors", "total_bytes", "head")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    N_POS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    kind: FrameKind
    epoch: int
    n_pos: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    head: bool
    def __init__(self, kind: _Optional[_Union[FrameKind, str]] = ..., epoch: _Optional[int] = ..., n_pos: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., head: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("batch_id", "chunk", "chunks", "header", "data")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    chunk: int
    chunks: int
    header: FrameHeader
    data: bytes
    def __init__(self, batch_id: _Optional[int] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., header: _Optional[_Union[FrameHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("batch_id", "metrics", "feedback", "feedback_data")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DATA_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    metrics: _containers.ScalarMap[str, float]
    feedback: FrameHeader
    feedback_data: bytes
    def __init__(self, batch_id: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., feedback: _Optional[_Union[FrameHeader, _Mapping]] = ..., feedback_data: _Optional[bytes] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("worker", "trained_through")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TRAINED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    worker: str
    trained_through: int
    def __init__(self, worker: _Optional[str] = ..., trained_through: _Optional[int] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("ready", "ack", "durable_through")
    READY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    DURABLE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    ready: Ready
    ack: Ack
    durable_through: int
    def __init__(self, ready: _Optional[_Union[Ready, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., durable_through: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("chunk", "chunks", "data")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    chunks: int
    data: bytes
    def __init__(self, chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("command", "config_json")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    command: Command
    config_json: str
    def __init__(self, command: _Optional[_Union[Command, str]] = ..., config_json: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "configured", "first_layer", "last_layer", "head", "epoch", "trained_through", "durable_through", "downstream", "peak_rss_mb", "rss_mb")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAINED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    DURABLE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_MB_FIELD_NUMBER: _ClassVar[int]
    RSS_MB_FIELD_NUMBER: _ClassVar[int]
    worker: str
    configured: bool
    first_layer: int
    last_layer: int
    head: bool
    epoch: int
    trained_through: int
    durable_through: int
    downstream: str
    peak_rss_mb: float
    rss_mb: float
    def __init__(self, worker: _Optional[str] = ..., configured: _Optional[bool] = ..., first_layer: _Optional[int] = ..., last_layer: _Optional[int] = ..., head: _Optional[bool] = ..., epoch: _Optional[int] = ..., trained_through: _Optional[int] = ..., durable_through: _Optional[int] = ..., downstream: _Optional[str] = ..., peak_rss_mb: _Optional[float] = ..., rss_mb: _Optional[float] = ...) -> None: ...
