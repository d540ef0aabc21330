from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageBlob(_message.Message):
    __slots__ = ("sha256", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    data: bytes
    def __init__(self, sha256: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ScoreRow(_message.Message):
    __slots__ = ("image", "prompt", "response")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    image: int
    prompt: bytes
    response: bytes
    def __init__(self, image: _Optional[int] = ..., prompt: _Optional[bytes] = ..., response: _Optional[bytes] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("round_id", "images", "rows", "objective", "weights")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    images: _containers.RepeatedCompositeFieldContainer[ImageBlob]
    rows: _containers.RepeatedCompositeFieldContainer[ScoreRow]
    objective: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, round_id: _Optional[bytes] = ..., images: _Optional[_Iterable[_Union[ImageBlob, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[ScoreRow, _Mapping]]] = ..., objective: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class BitsPair(_message.Message):
    __slots__ = ("image", "prompt", "chosen", "rejected")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    image: int
    prompt: bytes
    chosen: bytes
    rejected: bytes
    def __init__(self, image: _Optional[int] = ..., prompt: _Optional[bytes] = ..., chosen: _Optional[bytes] = ..., rejected: _Optional[bytes] = ...) -> None: ...

class BitsRequest(_message.Message):
    __slots__ = ("round_id", "images", "pairs", "randomized_response_epsilon", "objective")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZED_RESPONSE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    images: _containers.RepeatedCompositeFieldContainer[ImageBlob]
    pairs: _containers.RepeatedCompositeFieldContainer[BitsPair]
    randomized_response_epsilon: float
    objective: str
    def __init__(self, round_id: _Optional[bytes] = ..., images: _Optional[_Iterable[_Union[ImageBlob, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[BitsPair, _Mapping]]] = ..., randomized_response_epsilon: _Optional[float] = ..., objective: _Optional[str] = ...) -> None: ...

class BitsReply(_message.Message):
    __slots__ = ("bits", "flip_probability")
    BITS_FIELD_NUMBER: _ClassVar[int]
    FLIP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    bits: _containers.RepeatedScalarFieldContainer[bool]
    flip_probability: float
    def __init__(self, bits: _Optional[_Iterable[bool]] = ..., flip_probability: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("dp_enabled", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs", "max_grad_norm", "accountant", "privacy_unit", "max_pairs_per_unit", "noise", "is_private", "mechanisms")
    DP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    IS_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    MECHANISMS_FIELD_NUMBER: _ClassVar[int]
    dp_enabled: bool
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    max_grad_norm: float
    accountant: str
    privacy_unit: str
    max_pairs_per_unit: int
    noise: str
    is_private: bool
    mechanisms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dp_enabled: _Optional[bool] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., epochs: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., accountant: _Optional[str] = ..., privacy_unit: _Optional[str] = ..., max_pairs_per_unit: _Optional[int] = ..., noise: _Optional[str] = ..., is_private: _Optional[bool] = ..., mechanisms: _Optional[_Iterable[str]] = ...) -> None: ...

class LedgerSummary(_message.Message):
    __slots__ = ("epsilon_budget", "delta_budget", "epsilon_spent", "delta_spent", "charges", "open_reservations", "head_digest")
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_SPENT_FIELD_NUMBER: _ClassVar[int]
    CHARGES_FIELD_NUMBER: _ClassVar[int]
    OPEN_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    epsilon_budget: float
    delta_budget: float
    epsilon_spent: float
    delta_spent: float
    charges: int
    open_reservations: int
    head_digest: str
    def __init__(self, epsilon_budget: _Optional[float] = ..., delta_budget: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., delta_spent: _Optional[float] = ..., charges: _Optional[int] = ..., open_reservations: _Optional[int] = ..., head_digest: _Optional[str] = ...) -> None: ...

class SiloDescription(_message.Message):
    __slots__ = ("name", "architecture", "trainable_params", "privacy_report", "ledger")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_REPORT_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    trainable_params: int
    privacy_report: PrivacyReport
    ledger: LedgerSummary
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., trainable_params: _Optional[int] = ..., privacy_report: _Optional[_Union[PrivacyReport, _Mapping]] = ..., ledger: _Optional[_Union[LedgerSummary, _Mapping]] = ...) -> None: ...

class SignedCheckpoint(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AgreementKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgreementKeyReply(_message.Message):
    __slots__ = ("agreement_key", "certificate_pem")
    AGREEMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    agreement_key: str
    certificate_pem: bytes
    def __init__(self, agreement_key: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("name", "agreement_key", "certificate_pem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    agreement_key: str
    certificate_pem: bytes
    def __init__(self, name: _Optional[str] = ..., agreement_key: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class SecureScoreRequest(_message.Message):
    __slots__ = ("score", "participants")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    score: ScoreRequest
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    def __init__(self, score: _Optional[_Union[ScoreRequest, _Mapping]] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ...) -> None: ...

class SecureScoreReply(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("round_id", "participants", "ciphertexts")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    participants: _containers.RepeatedScalarFieldContainer[str]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, round_id: _Optional[bytes] = ..., participants: _Optional[_Iterable[str]] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Plaintext(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class DecryptReply(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Plaintext]
    def __init__(self, values: _Optional[_Iterable[_Union[Plaintext, _Mapping]]] = ...) -> None: ...
