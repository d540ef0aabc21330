"""Data for the consortium: easy-VQA records, silo splits, preference pairs, user imports.

Importing from `mor_secure.data` is the supported way in; the submodules are
an implementation detail that may be reorganised.
"""

from __future__ import annotations

from mor_secure.data.consortium import (
    ConsortiumSpec,
    SiloDataSpec,
    SplitSpec,
    load_consortium,
)
from mor_secure.data.easyvqa import ANSWERS_BY_KIND, kind_of_answer, load_easyvqa
from mor_secure.data.importer import DataImportError, RowProblem, import_preference_jsonl
from mor_secure.data.preferences import count_by_kind, make_pairs, pairs_for_silo, silo_seed
from mor_secure.data.records import QUESTION_KINDS, PreferencePair, QuestionKind, VQARecord
from mor_secure.data.splits import ConsortiumSplits, make_splits

__all__ = [
    "ANSWERS_BY_KIND",
    "QUESTION_KINDS",
    "ConsortiumSpec",
    "ConsortiumSplits",
    "DataImportError",
    "PreferencePair",
    "QuestionKind",
    "RowProblem",
    "SiloDataSpec",
    "SplitSpec",
    "VQARecord",
    "count_by_kind",
    "import_preference_jsonl",
    "kind_of_answer",
    "load_consortium",
    "load_easyvqa",
    "make_pairs",
    "make_splits",
    "pairs_for_silo",
    "silo_seed",
]
