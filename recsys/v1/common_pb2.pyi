from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SourceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_STATUS_UNSPECIFIED: _ClassVar[SourceStatus]
    SOURCE_STATUS_OK: _ClassVar[SourceStatus]
    SOURCE_STATUS_TIMEOUT: _ClassVar[SourceStatus]
    SOURCE_STATUS_ERROR: _ClassVar[SourceStatus]
SOURCE_STATUS_UNSPECIFIED: SourceStatus
SOURCE_STATUS_OK: SourceStatus
SOURCE_STATUS_TIMEOUT: SourceStatus
SOURCE_STATUS_ERROR: SourceStatus

class UserFeatures(_message.Message):
    __slots__ = ("age", "gender", "occupation", "country", "genre_ratings")
    class GenreRatingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGE_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    OCCUPATION_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    GENRE_RATINGS_FIELD_NUMBER: _ClassVar[int]
    age: int
    gender: str
    occupation: str
    country: str
    genre_ratings: _containers.ScalarMap[str, float]
    def __init__(self, age: _Optional[int] = ..., gender: _Optional[str] = ..., occupation: _Optional[str] = ..., country: _Optional[str] = ..., genre_ratings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UserContext(_message.Message):
    __slots__ = ("user_id", "features", "recent_item_ids", "exclude_item_ids", "variant")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    features: UserFeatures
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    variant: str
    def __init__(self, user_id: _Optional[str] = ..., features: _Optional[_Union[UserFeatures, _Mapping]] = ..., recent_item_ids: _Optional[_Iterable[str]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., variant: _Optional[str] = ...) -> None: ...

class SourceReport(_message.Message):
    __slots__ = ("source", "status", "count", "latency_ms", "message")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    source: str
    status: SourceStatus
    count: int
    latency_ms: float
    message: str
    def __init__(self, source: _Optional[str] = ..., status: _Optional[_Union[SourceStatus, str]] = ..., count: _Optional[int] = ..., latency_ms: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("kind", "ref", "text")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ref: str
    text: str
    def __init__(self, kind: _Optional[str] = ..., ref: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "sources", "score", "source_scores", "seed_item_id", "genre")
    class SourceScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    SEED_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    GENRE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    score: float
    source_scores: _containers.ScalarMap[str, float]
    seed_item_id: str
    genre: str
    def __init__(self, item_id: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., score: _Optional[float] = ..., source_scores: _Optional[_Mapping[str, float]] = ..., seed_item_id: _Optional[str] = ..., genre: _Optional[str] = ...) -> None: ...
