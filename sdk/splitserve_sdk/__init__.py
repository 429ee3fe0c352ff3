"""splitserve's Python SDK: sync and asyncio clients of the public gRPC API
(`splitserve.v1.Inference`). Depends only on grpcio and protobuf."""

from splitserve_sdk.aio import AsyncClient
from splitserve_sdk.client import Client
from splitserve_sdk.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SplitserveError,
    Unauthenticated,
    Unavailable,
)
from splitserve_sdk._common import sampling
from splitserve_sdk.types import (
    Choice,
    Chunk,
    Completion,
    Health,
    ModelInfo,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "Choice", "Chunk", "Completion", "Health", "ModelInfo",
           "TokenLogprob", "ToolCall", "ToolCallDelta", "Usage", "sampling",
           "SplitserveError", "InvalidArgument", "NotFound", "ResourceExhausted", "Unavailable",
           "DeadlineExceeded", "Cancelled", "Unauthenticated"]
