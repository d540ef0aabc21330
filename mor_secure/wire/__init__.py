"""What crosses the boundary between the coordinator and a silo: plain message types, no torch, no paths.

`messages` holds the domain types both roles speak, `errors` the refusals a
silo may answer with, `client` the `SiloClient` interface the coordinator
codes against, and `serde` (with the generated protobuf code) the only
converter between these types and the wire format.
"""

from .errors import ErrorCode, SiloError
from .messages import (
    BitsPair,
    BitsReply,
    BitsRequest,
    ImageBlob,
    LedgerSummary,
    ScoreReply,
    ScoreRequest,
    ScoreRow,
    SiloDescription,
)

__all__ = [
    "BitsPair", "BitsReply", "BitsRequest", "ErrorCode", "ImageBlob", "LedgerSummary", "ScoreReply",
    "ScoreRequest", "ScoreRow", "SiloDescription", "SiloError",
]
