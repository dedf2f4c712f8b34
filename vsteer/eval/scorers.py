"""Scoring steered completions for behaviour (does the text show the concept?) and coherence.

Two scorers, both returning scores in [0, 1] and describing themselves in every result:

- ``LocalScorer``: no network. Uses the UNSTEERED default model in the same vLLM engine that
  generated the texts (unsteered requests: plain vLLM).

  * behaviour: the text is followed by a question, ``"<text>\\n\\nThe text above is about"``, and
    the model's log-probability of each concept word as the next word is read from the engine
    (``SamplingParams.logprob_token_ids``; words of several tokens are completed with extra
    prefix-cached requests). ``lp = log mean_w p(w)`` over the concept's words. It is mapped to
    [0, 1] against two references scored the same way: ``lo`` = mean ``lp`` of off-topic texts
    (the concept's negative texts and the shared neutral texts), ``hi`` = mean ``lp`` of the
    concept's positive texts: ``behaviour = sigmoid(sharpness * ((lp - lo) / (hi - lo) - 1/2))``,
    so a typical off-topic text scores ~0.02 and a typical on-topic one ~0.98 (sharpness 8).
  * coherence: the mean negative log-likelihood per token of the completion under the unsteered
    model (``prompt_logprobs``), mapped linearly between ``nll_ok`` (mean NLL of unsteered
    completions of the same prompt: 1) and ``nll_bad`` (mean NLL of the same completions with
    their words shuffled: 0), clipped to [0, 1], times the fraction of distinct token 3-grams of
    the completion (perplexity alone rewards repetition loops, which the unsteered model
    predicts well). The reference completions are the run's own unsteered samples (``run_eval``
    passes them with ``set_reference``), or ones the scorer samples itself (SAE-TS settings). Why
    not human-written references: to a 135M model, natural human text is as improbable (~4 nats
    per token) as visibly broken steered text, while its own samples sit at ~1.2 nats.

- ``JudgeScorer``: any OpenAI-compatible chat-completions endpoint (URL + model), for instance a
  ``vsteer serve`` of a larger model. The prompts are versioned files,
  ``vsteer/eval/prompts/judge_{behaviour,coherence}_v1.txt``; the judge answers 1..10, which is
  normalised as ``(s - 1) / 9``. Unreachable endpoints and HTTP errors raise ``JudgeError``s;
  replies without a number are retried and then recorded as a parse error (or raised with
  ``strict=True``).
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vsteer._errors import VsteerError
from vsteer.eval.concepts import Concept, concept_set

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
LOCAL_SCORER_VERSION = "local-v1"
DEFAULT_QUESTION = "\n\nThe text above is about"
_MAX_IDS_PER_REQUEST = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS


class JudgeError(VsteerError):
    """The judge endpoint could not be used."""


class JudgeUnreachableError(JudgeError):
    """The judge endpoint did not answer (connection refused, DNS, timeout)."""


class JudgeResponseError(JudgeError):
    """The judge answered with an HTTP error or a body that is not a chat completion."""


class JudgeParseError(JudgeError):
    """The judge's reply contains no score 1..10."""

    def __init__(self, message: str, *, reply: str) -> None:
        self.reply = reply
        super().__init__(message)


@dataclass(frozen=True)
class ScoreItem:
    """One text to score against one concept. ``completion_ids``/``prompt_ids``, when given,
    are used as they are (the generated tokens) instead of re-tokenizing the text."""

    prompt: str
    completion: str
    concept: Concept
    prompt_ids: tuple[int, ...] | None = None
    completion_ids: tuple[int, ...] | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass
class Score:
    """Behaviour and coherence in [0, 1] (None where the scorer failed), plus raw details."""

    behaviour: float | None
    coherence: float | None
    details: dict[str, Any] = field(default_factory=dict)


class Scorer(Protocol):
    """What ``run_eval`` needs from a scorer."""

    def describe(self) -> dict[str, Any]:
        """Name, version and settings; recorded in every result."""
        ...

    def score(self, items: Sequence[ScoreItem]) -> list[Score]:
        """One Score per item, in order."""
        ...


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logmeanexp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values) / len(values))


def distinct_ngram_fraction(ids: Sequence[int], n: int = 3) -> float:
    """Distinct n-grams / n-grams of a token sequence (1.0 when it has fewer than n tokens)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@dataclass
class _Measure:
    nll: float  # mean NLL per scored token (nan when none)
    num_tokens: int
    word_lp: dict[tuple[int, ...], float]


@dataclass(frozen=True)
class _Calibration:
    lo: float
    hi: float


class LocalScorer:
    """Behaviour from the concept-word log-probability, coherence from the unsteered perplexity.

    Args:
        llm: a ``vsteer.LLM`` (the same engine that generates; its requests here are unsteered).
            Its ``logprobs_mode`` must be vLLM's default ``raw_logprobs``.
        question: the text appended after the scored text before the concept words.
        sharpness: slope of the behaviour sigmoid in units of the calibration gap (hi - lo).
        concepts_path: concepts file whose neutral texts calibrate (default: the shipped one).
        reference_n, reference_tokens, reference_sampling, reference_seed: how the scorer samples
            its own unsteered reference completions for a prompt that ``set_reference`` did not
            cover (default: 32 x 30 tokens, temperature 1, top_p 0.3, top_k 50, as SAE-TS).

    Example:
        >>> scorer = LocalScorer(llm)
        >>> [s] = scorer.score([ScoreItem("I think", " the bride looked lovely.", wedding)])
        >>> s.behaviour, s.coherence
    """

    def __init__(self, llm: Any, *, question: str = DEFAULT_QUESTION, sharpness: float = 8.0,
                 concepts_path: str | None = None, reference_n: int = 32, reference_tokens: int = 30,
                 reference_sampling: dict[str, Any] | None = None, reference_seed: int = 0) -> None:
        mode = getattr(getattr(getattr(llm, "engine", None), "llm_engine", None), "model_config", None)
        mode = getattr(mode, "logprobs_mode", "raw_logprobs")
        if str(mode) != "raw_logprobs":
            raise ValueError(f"LocalScorer needs an engine with logprobs_mode='raw_logprobs', not {mode!r}")
        self.llm = llm
        self.tok = llm.get_tokenizer()
        self.question = question
        self.sharpness = float(sharpness)
        self._concepts = concept_set(concepts_path)
        self.neutral = self._concepts.neutral
        self.reference_n = int(reference_n)
        self.reference_tokens = int(reference_tokens)
        self.reference_sampling = dict(reference_sampling or {"temperature": 1.0, "top_p": 0.3, "top_k": 50})
        self.reference_seed = int(reference_seed)
        self._q_ids = tuple(self.tok(question, add_special_tokens=False)["input_ids"])
        self._calib: dict[str, _Calibration] = {}
        self._reference: dict[str, tuple[float, float]] = {}
        self._word_ids: dict[tuple[str, tuple[str, ...]], list[tuple[int, ...]]] = {}

    # --- public -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "name": "local",
            "version": LOCAL_SCORER_VERSION,
            "model": getattr(getattr(self.llm, "model_shape", None), "name", None),
            "question": self.question,
            "sharpness": self.sharpness,
            "behaviour": "sigmoid(sharpness*((lp-lo)/(hi-lo)-0.5)); lp = log mean_w p(concept word w | text + question); "
                         "lo/hi = mean lp of off-topic/on-topic reference texts",
            "coherence": "clip((nll_bad-nll)/(nll_bad-nll_ok), 0, 1) * distinct-3-gram fraction; nll = unsteered "
                         "mean NLL per completion token; nll_ok/nll_bad = unsteered completions of the same prompt "
                         "as they are / with their words shuffled",
        }

    def calibration(self, concept: Concept, prompt: str = "I think") -> dict[str, float]:
        """The behaviour anchors (lo, hi) of a concept and the coherence anchors of a prompt."""
        cal = self._calibrate([concept])[concept.name]
        ok, bad = self._anchors(prompt)
        return {"behaviour_lo": cal.lo, "behaviour_hi": cal.hi, "nll_ok": ok, "nll_bad": bad}

    def set_reference(self, prompt: str, samples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, float]:
        """Set the coherence anchors of ``prompt`` from unsteered (prompt ids, completion ids)
        samples: ``nll_ok`` = their mean NLL, ``nll_bad`` = that of the same completions with
        their words shuffled (fixed seed). Returns both."""
        samples = [(tuple(p), tuple(c)) for p, c in samples if len(c) > 0]
        if not samples:
            raise ValueError("set_reference needs at least one non-empty completion")
        rng = random.Random(0)
        shuffled = []
        for p, c in samples:
            words = self.tok.decode(list(c)).split()
            rng.shuffle(words)
            shuffled.append((p, self._ids(" " + " ".join(words), special=False)))
        ms = self._measure(samples + shuffled, [[] for _ in range(2 * len(samples))])
        ok = sum(m.nll for m in ms[: len(samples)]) / len(samples)
        bad = sum(m.nll for m in ms[len(samples):]) / len(samples)
        if not bad > ok + 0.5:
            raise ValueError(f"coherence anchors of {prompt!r} do not separate: {ok:.2f} vs shuffled {bad:.2f} nats")
        self._reference[prompt] = (ok, bad)
        return {"nll_ok": ok, "nll_bad": bad}

    def behaviour_logprob(self, texts: Sequence[str], concept: Concept) -> list[float]:
        """Raw ``lp = log mean_w p(w | text + question)`` for whole texts."""
        words = self._words(concept)
        measures = self._measure([((), self._ids(t)) for t in texts], [words] * len(texts))
        return [_logmeanexp([m.word_lp[w] for w in words]) for m in measures]

    def score(self, items: Sequence[ScoreItem]) -> list[Score]:
        """Score items; texts are measured once whatever the number of concepts they are scored for."""
        if not items:
            return []
        concepts = {it.concept.name: it.concept for it in items}
        calib = self._calibrate(list(concepts.values()))
        anchors = {it.prompt: self._anchors(it.prompt) for it in items}
        seqs: dict[tuple[tuple[int, ...], tuple[int, ...]], set[tuple[int, ...]]] = {}
        keys = []
        for it in items:
            p = it.prompt_ids if it.prompt_ids is not None else self._ids(it.prompt)
            c = it.completion_ids if it.completion_ids is not None else self._ids(it.completion, special=False)
            key = (tuple(p), tuple(c))
            seqs.setdefault(key, set()).update(self._words(it.concept))
            keys.append(key)
        order = list(seqs)
        measures = dict(zip(order, self._measure(order, [sorted(seqs[k]) for k in order])))
        out = []
        for it, key in zip(items, keys):
            m = measures[key]
            cal = calib[it.concept.name]
            nll_ok, nll_bad = anchors[it.prompt]
            lp = _logmeanexp([m.word_lp[w] for w in self._words(it.concept)])
            beh = _sigmoid(self.sharpness * ((lp - cal.lo) / (cal.hi - cal.lo) - 0.5))
            d3 = distinct_ngram_fraction(key[1])
            coh_ppl = 0.0 if m.num_tokens == 0 else min(1.0, max(0.0, (nll_bad - m.nll) / (nll_bad - nll_ok)))
            out.append(Score(beh, coh_ppl * d3, {"behaviour_logprob": lp, "nll": m.nll, "tokens": m.num_tokens,
                                                 "distinct3": d3}))
        return out

    # --- internals ----------------------------------------------------------------------------
    def _ids(self, text: str, special: bool = True) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=special)["input_ids"])

    def _words(self, concept: Concept) -> list[tuple[int, ...]]:
        """Token ids of the concept's words, each with a leading space (as a next word)."""
        key = (concept.name, concept.words)
        if key not in self._word_ids:
            out = []
            for w in concept.words:
                ids = tuple(self.tok(" " + w.strip(), add_special_tokens=False)["input_ids"])
                if not ids:
                    raise ValueError(f"concept {concept.name!r}: word {w!r} has no tokens")
                out.append(ids)
            self._word_ids[key] = out
        return self._word_ids[key]

    def _anchors(self, prompt: str) -> tuple[float, float]:
        if prompt not in self._reference:
            if not prompt:
                raise ValueError("LocalScorer scores completions of a non-empty prompt")
            from vllm import SamplingParams

            params = [SamplingParams(max_tokens=self.reference_tokens, seed=self.reference_seed + i,
                                     **self.reference_sampling) for i in range(self.reference_n)]
            outs = self.llm.generate([prompt] * self.reference_n, params)
            self.set_reference(prompt, [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs])
        return self._reference[prompt]

    def _calibrate(self, concepts: Sequence[Concept]) -> dict[str, _Calibration]:
        todo = [c for c in concepts if c.name not in self._calib]
        if todo:
            texts = sorted({t for c in todo for t in (*c.positive, *c.negative)} | set(self.neutral))
            words = sorted({w for c in todo for w in self._words(c)})
            ms = dict(zip(texts, self._measure([((), self._ids(t)) for t in texts], [words] * len(texts))))
            for c in todo:
                ws = self._words(c)
                lp = {t: _logmeanexp([ms[t].word_lp[w] for w in ws]) for t in ms}
                hi = sum(lp[t] for t in c.positive) / len(c.positive)
                off = [*c.negative, *self.neutral]
                lo = sum(lp[t] for t in off) / len(off)
                if hi - lo < 0.5:
                    raise ValueError(
                        f"concept {c.name!r}: its words {list(c.words)} barely separate on-topic from off-topic "
                        f"texts for this model (gap {hi - lo:.2f} nats); choose other words")
                self._calib[c.name] = _Calibration(lo, hi)
        return {c.name: self._calib[c.name] for c in concepts}

    def _measure(self, seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 words: Sequence[Sequence[tuple[int, ...]]]) -> list[_Measure]:
        """For each (prefix, text) pair: mean NLL of the text tokens given the prefix (prompt
        logprobs), and log p(word | prefix + text + question) for each of its words."""
        from vllm import SamplingParams

        limit = self.llm.max_model_len - 4
        prompts, first_sets = [], []
        for (p, c), ws in zip(seqs, words):
            ids = [*p, *c, *self._q_ids]
            longest = max((len(w) for w in ws), default=1)
            if len(ids) + longest > limit:
                raise ValueError(f"a scored text has {len(ids)} tokens with the question; the engine allows {limit}")
            prompts.append(ids)
            first_sets.append(sorted({w[0] for w in ws}))
        params = []
        for firsts in first_sets:
            head = firsts[:_MAX_IDS_PER_REQUEST]
            params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                         logprob_token_ids=head or None))
        outs = self.llm.generate(prompts, params)
        result = []
        follow_prompts, follow_params, follow_keys = [], [], []
        for i, ((p, c), ws, ids, out) in enumerate(zip(seqs, words, prompts, outs)):
            plp = out.prompt_logprobs
            start = max(len(p), 1)
            vals = [plp[j][ids[j]].logprob for j in range(start, len(p) + len(c))]
            nll = -sum(vals) / len(vals) if vals else float("nan")
            got = out.outputs[0].logprobs[0] if out.outputs[0].logprobs else {}
            lp: dict[tuple[int, ...], float] = {}
            firsts = first_sets[i]
            for w in ws:
                if w[0] in got and w[0] in firsts[:_MAX_IDS_PER_REQUEST]:
                    lp[w] = got[w[0]].logprob
                else:
                    follow_prompts.append(ids)
                    follow_params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                                        logprob_token_ids=[w[0]]))
                    follow_keys.append((i, w, 0))
                for k in range(1, len(w)):
                    follow_prompts.append(ids + list(w[:k]))
                    follow_params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                                        logprob_token_ids=[w[k]]))
                    follow_keys.append((i, w, k))
            result.append(_Measure(nll, len(vals), lp))
        if follow_prompts:  # extra tokens of multi-token words (prefix-cached), and overflow ids
            outs = self.llm.generate(follow_prompts, follow_params)
            for (i, w, k), out in zip(follow_keys, outs):
                value = out.outputs[0].logprobs[0][w[k]].logprob
                result[i].word_lp[w] = result[i].word_lp.get(w, 0.0) + value
        return result


# --- the judge ----------------------------------------------------------------------------------
_SCORE_PATTERNS = [
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"(?:score|rating|grade)\s*(?:is|of|:|=)?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
    re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\b"),
    re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])"),
]


def parse_score(reply: str) -> float | None:
    """The judge's score 1..10 from its reply, or None.

    Tries, in order: ``[[7]]``, ``Score: 7`` / ``Rating - 7``, ``7/10`` / ``7 out of 10``, a
    number at the start, then any standalone number; the first match in 1..10 wins.

    Example:
        >>> parse_score("Rating: [[8]]"), parse_score("I'd say 7/10."), parse_score("no idea")
        (8.0, 7.0, None)
    """
    if not isinstance(reply, str):
        return None
    for pattern in _SCORE_PATTERNS:
        for match in pattern.finditer(reply):
            value = float(match.group(1))
            if 1.0 <= value <= 10.0:
                return value
    return None


def load_judge_prompt(kind: str, version: str = "v1") -> str:
    """The versioned judge prompt ``judge_<kind>_<version>.txt`` (kind: behaviour | coherence)."""
    path = PROMPTS_DIR / f"judge_{kind}_{version}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no judge prompt {path.name} in {PROMPTS_DIR}")
    return path.read_text()


def _fill(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


class JudgeScorer:
    """Behaviour and coherence from an OpenAI-compatible chat-completions judge.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is
            appended; a URL with no path gets ``/v1``).
        model: the judge model name the endpoint serves.
        api_key: sent as ``Authorization: Bearer``; optional.
        prompt_version: which prompt files (``judge_<kind>_<version>.txt``).
        retries: extra attempts per call on connection errors, 429/5xx and unparsable replies.
        concurrency: parallel requests.
        strict: raise ``JudgeParseError`` when a reply has no score after all retries (default:
            record the score as None with the error in ``details``).
        temperature, max_tokens, timeout: request settings (retries of unparsable replies use
            temperature >= 0.7 so they can differ).

    Raises (from ``check`` / ``score``):
        JudgeUnreachableError: nothing answers at the URL.
        JudgeResponseError: an HTTP error (e.g. unknown model) or a body that is no chat completion.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, prompt_version: str = "v1",
                 retries: int = 2, concurrency: int = 4, strict: bool = False, temperature: float = 0.0,
                 max_tokens: int = 32, timeout: float = 60.0, backoff: float = 0.5) -> None:
        import httpx

        url = base_url.rstrip("/")
        if httpx.URL(url).path in ("", "/"):
            url += "/v1"
        self.base_url = url
        self.model = model
        self.prompt_version = prompt_version
        self.prompts = {k: load_judge_prompt(k, prompt_version) for k in ("behaviour", "coherence")}
        self.retries = int(retries)
        self.concurrency = max(1, int(concurrency))
        self.strict = strict
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.backoff = float(backoff)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self.requests_sent = 0

    def describe(self) -> dict[str, Any]:
        return {"name": "judge", "version": f"judge-{self.prompt_version}", "url": self.base_url, "model": self.model,
                "prompts": [f"judge_behaviour_{self.prompt_version}.txt", f"judge_coherence_{self.prompt_version}.txt"],
                "temperature": self.temperature, "normalisation": "(s-1)/9"}

    def close(self) -> None:
        self._client.close()

    def check(self) -> None:
        """Fail fast: one tiny chat request must come back as a chat completion."""
        self._chat("Reply with the number 5.", temperature=0.0)

    def judge(self, kind: str, item: ScoreItem) -> tuple[float | None, str, str | None]:
        """Ask for one score: returns (normalised score or None, last reply, error or None)."""
        prompt = _fill(self.prompts[kind], concept=item.concept.name, description=item.concept.description,
                       text=item.text)
        reply = ""
        for attempt in range(self.retries + 1):
            reply = self._chat(prompt, temperature=self.temperature if attempt == 0 else max(self.temperature, 0.7))
            value = parse_score(reply)
            if value is not None:
                return (value - 1.0) / 9.0, reply, None
        error = f"no score 1..10 in the judge's {kind} reply after {self.retries + 1} attempts: {reply[:200]!r}"
        if self.strict:
            raise JudgeParseError(error, reply=reply)
        return None, reply, error

    def score(self, items: Sequence[ScoreItem]) -> list[Score]:
        """Two judge calls per item (behaviour, coherence), ``concurrency`` at a time."""
        def one(item: ScoreItem) -> Score:
            b, b_reply, b_err = self.judge("behaviour", item)
            c, c_reply, c_err = self.judge("coherence", item)
            details: dict[str, Any] = {"behaviour_reply": b_reply, "coherence_reply": c_reply}
            errors = [e for e in (b_err, c_err) if e]
            if errors:
                details["errors"] = errors
            return Score(b, c, details)

        if self.concurrency == 1 or len(items) <= 1:
            return [one(it) for it in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, items))

    def _chat(self, prompt: str, *, temperature: float) -> str:
        import httpx

        url = self.base_url + "/chat/completions"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": temperature, "max_tokens": self.max_tokens}
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.requests_sent += 1
            try:
                resp = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                continue
            if resp.status_code >= 400:
                raise JudgeResponseError(f"judge {url} (model {self.model!r}) answered HTTP {resp.status_code}: "
                                         f"{resp.text[:300]}")
            try:
                data = resp.json()
                content = data["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"not a chat completion: {resp.text[:300]!r}"
                continue
            return content if isinstance(content, str) else json.dumps(content)
        if last.startswith(("HTTP", "not a chat")):
            raise JudgeResponseError(f"judge {url} (model {self.model!r}) failed after {self.retries + 1} attempts: {last}")
        raise JudgeUnreachableError(f"judge endpoint {url} is unreachable after {self.retries + 1} attempts: {last}")
