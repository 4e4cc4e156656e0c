from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveRequest(_message.Message):
    __slots__ = ("user", "budget", "sources", "omit_source_scores", "packed", "catalogue", "with_user_state")
    USER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OMIT_SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_FIELD_NUMBER: _ClassVar[int]
    WITH_USER_STATE_FIELD_NUMBER: _ClassVar[int]
    user: _common_pb2.UserContext
    budget: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    omit_source_scores: bool
    packed: bool
    catalogue: str
    with_user_state: bool
    def __init__(self, user: _Optional[_Union[_common_pb2.UserContext, _Mapping]] = ..., budget: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., omit_source_scores: _Optional[bool] = ..., packed: _Optional[bool] = ..., catalogue: _Optional[str] = ..., with_user_state: _Optional[bool] = ...) -> None: ...

class StoredUserState(_message.Message):
    __slots__ = ("known", "age", "gender", "occupation", "country", "genres", "aggregates")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    OCCUPATION_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    known: bool
    age: float
    gender: str
    occupation: str
    country: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    aggregates: bytes
    def __init__(self, known: _Optional[bool] = ..., age: _Optional[float] = ..., gender: _Optional[str] = ..., occupation: _Optional[str] = ..., country: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ..., aggregates: _Optional[bytes] = ...) -> None: ...

class SourceScores(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class PackedCandidates(_message.Message):
    __slots__ = ("item_ids", "scores", "source_names", "source_mask", "seeds", "seed_index", "genres", "genre_index", "source_scores", "rows", "catalogue")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAMES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MASK_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SEED_INDEX_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    GENRE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    source_names: _containers.RepeatedScalarFieldContainer[str]
    source_mask: _containers.RepeatedScalarFieldContainer[int]
    seeds: _containers.RepeatedScalarFieldContainer[str]
    seed_index: _containers.RepeatedScalarFieldContainer[int]
    genres: _containers.RepeatedScalarFieldContainer[str]
    genre_index: _containers.RepeatedScalarFieldContainer[int]
    source_scores: _containers.RepeatedCompositeFieldContainer[SourceScores]
    rows: bytes
    catalogue: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., source_names: _Optional[_Iterable[str]] = ..., source_mask: _Optional[_Iterable[int]] = ..., seeds: _Optional[_Iterable[str]] = ..., seed_index: _Optional[_Iterable[int]] = ..., genres: _Optional[_Iterable[str]] = ..., genre_index: _Optional[_Iterable[int]] = ..., source_scores: _Optional[_Iterable[_Union[SourceScores, _Mapping]]] = ..., rows: _Optional[bytes] = ..., catalogue: _Optional[str] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("candidates", "source_reports", "index_version", "degraded", "variant", "packed", "user_state")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REPORTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    USER_STATE_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[_common_pb2.Candidate]
    source_reports: _containers.RepeatedCompositeFieldContainer[_common_pb2.SourceReport]
    index_version: str
    degraded: bool
    variant: str
    packed: PackedCandidates
    user_state: StoredUserState
    def __init__(self, candidates: _Optional[_Iterable[_Union[_common_pb2.Candidate, _Mapping]]] = ..., source_reports: _Optional[_Iterable[_Union[_common_pb2.SourceReport, _Mapping]]] = ..., index_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., variant: _Optional[str] = ..., packed: _Optional[_Union[PackedCandidates, _Mapping]] = ..., user_state: _Optional[_Union[StoredUserState, _Mapping]] = ...) -> None: ...

class RetrieveManyRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RetrieveRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RetrieveRequest, _Mapping]]] = ...) -> None: ...

class RetrieveOutcome(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: RetrieveResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[RetrieveResponse, _Mapping]] = ...) -> None: ...

class RetrieveManyResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[RetrieveOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[RetrieveOutcome, _Mapping]]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "user_id", "variant")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    user_id: str
    variant: str
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., user_id: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class SimilarItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "index_version", "variant")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SimilarItem]
    index_version: str
    variant: str
    def __init__(self, items: _Optional[_Iterable[_Union[SimilarItem, _Mapping]]] = ..., index_version: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RecordInteractionRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "rating", "timestamp", "event_id", "dedupe_window_s")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUPE_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    rating: float
    timestamp: int
    event_id: str
    dedupe_window_s: int
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., rating: _Optional[float] = ..., timestamp: _Optional[int] = ..., event_id: _Optional[str] = ..., dedupe_window_s: _Optional[int] = ...) -> None: ...

class RecordInteractionResponse(_message.Message):
    __slots__ = ("history_length", "rating_count", "duplicate")
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RATING_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    history_length: int
    rating_count: int
    duplicate: bool
    def __init__(self, history_length: _Optional[int] = ..., rating_count: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...
