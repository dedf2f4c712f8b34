"""Steering-quality evaluation (SAE-TS protocol): behaviour x coherence, max over scales.

Example:
    >>> import vsteer
    >>> from vsteer.eval import LocalScorer, run_eval
    >>> llm = vsteer.LLM("smollm2", enforce_eager=True)
    >>> summary = run_eval(llm, ["wedding", "love"], ["caa", "actadd", "sara"], n=16,
    ...                    scorer=LocalScorer(llm), out_dir="eval-out")
"""

from vsteer.eval.concepts import (
    Concept,
    ConceptSet,
    available_concepts,
    concept_set,
    load_concepts,
)
from vsteer.eval.harness import Cell, load_records, run_eval, summarize
from vsteer.eval.methods import (
    MethodUnavailableError,
    SteeringMethod,
    available_methods,
    build_spec,
    get_method,
    register_method,
)
from vsteer.eval import sae_methods  # noqa: F401,I001  (registers "sae", "sae-ts" and "sas" with methods)
from vsteer.eval.scorers import (
    JudgeError,
    JudgeParseError,
    JudgeResponseError,
    JudgeScorer,
    JudgeUnreachableError,
    LocalScorer,
    Score,
    ScoreItem,
    Scorer,
    parse_score,
)

__all__ = [
    "Cell",
    "Concept",
    "ConceptSet",
    "JudgeError",
    "JudgeParseError",
    "JudgeResponseError",
    "JudgeScorer",
    "JudgeUnreachableError",
    "LocalScorer",
    "MethodUnavailableError",
    "Score",
    "ScoreItem",
    "Scorer",
    "SteeringMethod",
    "available_concepts",
    "available_methods",
    "build_spec",
    "concept_set",
    "get_method",
    "load_concepts",
    "load_records",
    "parse_score",
    "register_method",
    "run_eval",
    "summarize",
]
