from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemDebug(_message.Message):
    __slots__ = ("sources", "source_scores", "raw_score", "model_version")
    class SourceScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedScalarFieldContainer[str]
    source_scores: _containers.ScalarMap[str, float]
    raw_score: float
    model_version: str
    def __init__(self, sources: _Optional[_Iterable[str]] = ..., source_scores: _Optional[_Mapping[str, float]] = ..., raw_score: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "sources", "debug", "reasons", "title", "genres")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    sources: _containers.RepeatedScalarFieldContainer[str]
    debug: ItemDebug
    reasons: _containers.RepeatedCompositeFieldContainer[_common_pb2.Reason]
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., sources: _Optional[_Iterable[str]] = ..., debug: _Optional[_Union[ItemDebug, _Mapping]] = ..., reasons: _Optional[_Iterable[_Union[_common_pb2.Reason, _Mapping]]] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user", "candidate_item_ids", "top_k", "include_watched", "debug")
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WATCHED_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user: _common_pb2.UserContext
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    include_watched: bool
    debug: bool
    def __init__(self, user: _Optional[_Union[_common_pb2.UserContext, _Mapping]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., include_watched: _Optional[bool] = ..., debug: _Optional[bool] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "model_version", "unknown_dropped", "watched_dropped", "variant")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_DROPPED_FIELD_NUMBER: _ClassVar[int]
    WATCHED_DROPPED_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    unknown_dropped: int
    watched_dropped: int
    variant: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., unknown_dropped: _Optional[int] = ..., watched_dropped: _Optional[int] = ..., variant: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user", "k", "retrieval_budget", "sources", "debug")
    USER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user: _common_pb2.UserContext
    k: int
    retrieval_budget: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    debug: bool
    def __init__(self, user: _Optional[_Union[_common_pb2.UserContext, _Mapping]] = ..., k: _Optional[int] = ..., retrieval_budget: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., debug: _Optional[bool] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "index_version", "source_reports", "retrieval_fallback", "fallback_reason", "variant")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REPORTS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    index_version: str
    source_reports: _containers.RepeatedCompositeFieldContainer[_common_pb2.SourceReport]
    retrieval_fallback: bool
    fallback_reason: str
    variant: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., source_reports: _Optional[_Iterable[_Union[_common_pb2.SourceReport, _Mapping]]] = ..., retrieval_fallback: _Optional[bool] = ..., fallback_reason: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...
