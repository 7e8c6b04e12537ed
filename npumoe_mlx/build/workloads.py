"""Calibration and benchmark text, generated offline from a seed, or read from files.

Expert popularity depends on what the model reads, so calibration needs text that
looks like the intended workload: long documents with a retrieval question at the
end, few-shot Q/A, code. Nothing is downloaded: word lists are built in and a numpy
rng picks from them, so a seed always gives the same text and different seeds give
different texts.

Lengths are in *approximate* tokens (about 4 characters per token, the usual
rate of BPE tokenizers on English); callers that need exact counts cap or use
:func:`prompt_of_tokens`.
"""

import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from ..planning.profiles import BATCH_SEQS, GENERATION_SIZES  # noqa: F401 (the planner sizes for them)

CHARS_PER_TOKEN = 4

_ADJ = (
    "quiet", "bright", "ancient", "narrow", "heavy", "silver", "hidden", "distant", "gentle",
    "broken", "golden", "crowded", "frozen", "hollow", "patient", "restless", "rusty", "sacred",
    "tiny", "vast", "wooden", "yellow", "crimson", "dusty", "elegant", "fragile", "humble",
)
_NOUN = (
    "river", "lantern", "market", "garden", "tower", "harbor", "library", "bridge", "forest",
    "village", "engine", "painter", "teacher", "sailor", "merchant", "orchard", "mountain",
    "violin", "carpet", "mirror", "clock", "letter", "window", "compass", "kettle", "falcon",
    "island", "workshop", "meadow", "castle", "station", "fountain",
)
_VERB = (
    "watched", "carried", "repaired", "painted", "crossed", "visited", "described", "measured",
    "followed", "remembered", "opened", "counted", "collected", "studied", "guarded", "sold",
)
_PLACE = (
    "near the old square", "beyond the hills", "under the bridge", "in the northern valley",
    "along the coast", "behind the station", "inside the museum", "at the edge of town",
    "across the lake", "on the second floor", "by the harbor wall", "in the quiet suburb",
)
_TIME = (
    "every morning", "last winter", "before sunrise", "during the festival", "after the storm",
    "in the late afternoon", "once a year", "on rainy days", "at midnight", "for many decades",
)
_CONNECT = ("Meanwhile,", "Later,", "As usual,", "In the end,", "Some say that", "Surprisingly,")
_COLOR = ("red", "blue", "green", "white", "black", "orange", "purple", "grey")
_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Spain", "Madrid"), ("Chile", "Santiago"), ("India", "New Delhi"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Brazil", "Brasilia"), ("Ireland", "Dublin"), ("Vietnam", "Hanoi"),
)
_CODE_VERB = ("load", "parse", "merge", "split", "count", "filter", "update", "build", "scan", "sort")
_CODE_NOUN = ("items", "records", "tokens", "rows", "config", "buffer", "graph", "cache", "batch", "nodes")
_CODE_OP = ("+", "-", "*", "//", "%")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _sentence(rng: np.random.Generator) -> str:
    """One filler sentence for the haystack."""
    kind = int(rng.integers(4))
    a, n1, n2 = _pick(rng, _ADJ), _pick(rng, _NOUN), _pick(rng, _NOUN)
    if kind == 0:
        s = f"The {a} {n1} {_pick(rng, _VERB)} the {n2} {_pick(rng, _PLACE)} {_pick(rng, _TIME)}."
    elif kind == 1:
        s = f"{_pick(rng, _CONNECT)} a {a} {n1} stood {_pick(rng, _PLACE)}, and nobody {_pick(rng, _VERB)} it."
    elif kind == 2:
        k = int(rng.integers(2, 999))
        s = f"There were {k} {n1}s {_pick(rng, _PLACE)}, each one more {a} than the {n2}."
    else:
        s = f"{_pick(rng, _TIME).capitalize()}, the {n1} {_pick(rng, _VERB)} a {a} {n2}."
    return s


def _filler(rng: np.random.Generator, n_chars: int) -> List[str]:
    """Sentences until about ``n_chars`` characters, grouped into paragraphs."""
    out, size = [], 0
    while size < n_chars:
        s = _sentence(rng)
        out.append(s)
        size += len(s) + 1
    return out


def _needle(rng: np.random.Generator) -> Tuple[str, str]:
    """(fact, question) for the retrieval test at the end of a long context."""
    a, n = _pick(rng, _ADJ), _pick(rng, _NOUN)
    code = int(rng.integers(1000, 99999))
    fact = f"Remember this: the secret number of the {a} {n} is {code}."
    question = f"\n\nQuestion: What is the secret number of the {a} {n}? Answer:"
    return fact, question


def _paragraphs(sentences: List[str], rng: np.random.Generator) -> str:
    paras, i = [], 0
    while i < len(sentences):
        j = i + int(rng.integers(3, 8))
        paras.append(" ".join(sentences[i:j]))
        i = j
    return "\n\n".join(paras)


def long_context(n_tokens_approx: int = 2048, seed: int = 0) -> str:
    """A long haystack of varied sentences with one needle fact, ending in its question."""
    rng = np.random.default_rng([seed, 1])
    fact, question = _needle(rng)
    sentences = _filler(rng, max(0, n_tokens_approx * CHARS_PER_TOKEN - len(fact) - len(question)))
    depth = int(rng.integers(len(sentences) // 4, 3 * len(sentences) // 4 + 1)) if sentences else 0
    sentences.insert(depth, fact)
    return _paragraphs(sentences, rng) + question


def _qa_pair(rng: np.random.Generator) -> Tuple[str, str]:
    kind = int(rng.integers(5))
    if kind == 0:
        a, b = (int(v) for v in rng.integers(2, 500, size=2))
        op = _pick(rng, ("plus", "minus", "times"))
        val = a + b if op == "plus" else a - b if op == "minus" else a * b
        return f"What is {a} {op} {b}?", str(val)
    if kind == 1:
        country, capital = _pick(rng, _CAPITALS)
        return f"What is the capital of {country}?", capital
    if kind == 2:
        n, c = _pick(rng, _NOUN), _pick(rng, _COLOR)
        return f"The {n} is painted {c}. What color is the {n}?", f"It is {c}."
    if kind == 3:
        km = int(rng.integers(1, 90))
        return f"How many meters are in {km} kilometers?", f"{km * 1000} meters."
    word = _pick(rng, _NOUN)
    return f"How do you spell '{word}' backwards?", word[::-1]


def few_shot_qa(n_tokens_approx: int = 2048, seed: int = 0) -> str:
    """Few-shot question/answer pairs (arithmetic, capitals, recall, units, spelling)."""
    rng = np.random.default_rng([seed, 2])
    parts, size = ["Answer each question briefly.\n"], 0
    while size < n_tokens_approx * CHARS_PER_TOKEN:
        q, a = _qa_pair(rng)
        parts.append(f"Q: {q}\nA: {a}\n")
        size += len(parts[-1]) + 1
    return "\n".join(parts)


def _function(rng: np.random.Generator) -> str:
    verb, noun = _pick(rng, _CODE_VERB), _pick(rng, _CODE_NOUN)
    arg, other = _pick(rng, _CODE_NOUN), _pick(rng, _CODE_NOUN)
    k, op = int(rng.integers(2, 64)), _pick(rng, _CODE_OP)
    kind = int(rng.integers(3))
    if kind == 0:
        body = (
            f"    result = []\n"
            f"    for i, item in enumerate({arg}):\n"
            f"        if i % {k} == 0:\n"
            f"            continue\n"
            f"        result.append(item {op} {k})\n"
            f"    return result\n"
        )
    elif kind == 1:
        body = (
            f"    counts = {{}}\n"
            f"    for key in {arg}:\n"
            f"        counts[key] = counts.get(key, 0) + 1\n"
            f"    return sorted(counts.items(), key=lambda kv: -kv[1])[:{k}]\n"
        )
    else:
        body = (
            f"    if not {arg}:\n"
            f"        raise ValueError(\"empty {arg}\")\n"
            f"    total = sum(len(x) for x in {arg})\n"
            f"    return total {op} len({other}) if {other} else total\n"
        )
    doc = f'    """{verb.capitalize()} the {noun} from {arg}."""\n'
    args = f"{arg}, {other}=None" if kind == 2 else arg
    return f"def {verb}_{noun}({args}):\n{doc}{body}"


def _class(rng: np.random.Generator) -> str:
    noun = _pick(rng, _CODE_NOUN)
    name = noun.capitalize().rstrip("s") + _pick(rng, ("Store", "Index", "Queue", "Table"))
    field = _pick(rng, _CODE_NOUN)
    return (
        f"class {name}:\n"
        f'    """Keeps {noun} by key."""\n\n'
        f"    def __init__(self, capacity={int(rng.integers(8, 4096))}):\n"
        f"        self.capacity = capacity\n"
        f"        self.{field} = {{}}\n\n"
        f"    def add(self, key, value):\n"
        f"        if len(self.{field}) >= self.capacity:\n"
        f"            self.{field}.pop(next(iter(self.{field})))\n"
        f"        self.{field}[key] = value\n"
    )


def code_like(n_tokens_approx: int = 2048, seed: int = 0) -> str:
    """Python-ish source: imports, functions and small classes."""
    rng = np.random.default_rng([seed, 3])
    parts = ["import json\nimport os\nfrom collections import defaultdict\n"]
    size = len(parts[0])
    while size < n_tokens_approx * CHARS_PER_TOKEN:
        parts.append(_class(rng) if rng.random() < 0.25 else _function(rng))
        size += len(parts[-1]) + 2
    return "\n\n".join(parts)


BUILTIN: Dict[str, Callable[[int, int], str]] = {
    "long-context": long_context,
    "qa": few_shot_qa,
    "code": code_like,
}


def _record_text(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj.get("prompt"), str):
        completion = obj.get("completion", "")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: 'completion' must be a string")
        return obj["prompt"] + completion
    if isinstance(obj.get("messages"), list):
        contents = [m.get("content") if isinstance(m, dict) else None for m in obj["messages"]]
        if not all(isinstance(c, str) for c in contents):
            raise ValueError(f"{where}: every message needs a string 'content'")
        return "\n".join(contents)
    raise ValueError(f"{where}: expected a 'text', 'prompt'/'completion' or 'messages' field")


def load_corpus_file(path) -> List[str]:
    """Documents of a ``.txt`` file (one document) or ``.jsonl`` file (one per line)."""
    p = Path(path)
    if p.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"corpus file {p}: expected a .txt or .jsonl file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read corpus file {p}: {getattr(e, 'strerror', None) or e}") from None
    if p.suffix == ".txt":
        if not text.strip():
            raise ValueError(f"corpus file {p} is empty")
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        doc = _record_text(obj, where)
        if doc:
            docs.append(doc)
    if not docs:
        raise ValueError(f"corpus file {p} has no documents")
    return docs


def corpus_documents(names_or_paths: List[str], tokens: int = 2048, seed: int = 0) -> Tuple[List[str], str]:
    """Documents for built-in corpus names and files, and a one-line description.

    The ``tokens`` budget is split evenly over the built-in generators; files are
    taken whole (the caller caps the total). No names means ``long-context``.
    """
    names = list(names_or_paths) or ["long-context"]
    n_builtin = sum(1 for n in names if n in BUILTIN)
    share = max(1, tokens // max(1, n_builtin))
    docs, desc = [], []
    for name in names:
        if name in BUILTIN:
            docs.append(BUILTIN[name](share, seed))
            desc.append(f"{name}(seed={seed}, ~{share} tokens)")
        elif Path(name).is_file():
            file_docs = load_corpus_file(name)
            docs.extend(file_docs)
            desc.append(f"file:{name} ({len(file_docs)} docs)")
        else:
            raise ValueError(
                f"unknown corpus {name!r}: not a built-in ({', '.join(BUILTIN)}) nor an existing file"
            )
    return docs, " + ".join(desc)


def prompt_of_tokens(tokenizer, n_tokens: int, seed: int = 0) -> List[int]:
    """Token ids of a long-context prompt of exactly ``n_tokens`` tokens.

    The needle sits at mid depth and the retrieval question is always the last
    tokens, so a benchmark at any length still reads like a real long prompt.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rng = np.random.default_rng([seed, 4])
    fact, question = _needle(rng)
    q_ids = list(tokenizer.encode(question, add_special_tokens=False))
    budget = n_tokens - len(q_ids)
    if budget <= 0:
        return q_ids[-n_tokens:]
    # Leading special tokens (BOS), if the tokenizer adds any, count too.
    special = len(tokenizer.encode(fact)) - len(tokenizer.encode(fact, add_special_tokens=False))
    # Filler before the needle: about half the budget, measured in real tokens.
    before, n_before = [], special
    while n_before < budget // 2:
        s = _sentence(rng)
        before.append(s)
        n_before += len(tokenizer.encode(" " + s, add_special_tokens=False))
    sentences = before + [fact]
    while True:
        ids = list(tokenizer.encode(" ".join(sentences)))
        if len(ids) >= budget:
            return ids[:budget] + q_ids
        sentences += _filler(rng, (budget - len(ids)) * CHARS_PER_TOKEN + 64)


# --- the calls generation makes (issue 23) ------------------------------------------------
# A plan sized for single-sequence prefill chunks meets other calls in real use: a server's chat
# requests prefill prompts of every size in one call each, batch_generate and the server's batch
# stack B prompts (right-padded to the longest) into one call, and a prompt cache leaves small
# remainders. Calibration and replay make these calls from the same documents / traces.

WORKLOADS = ("prefill", "chat", "batch")
CHAT_TOKENS = (20, 800)  # a chat request's new prompt tokens, prefilled in one call (log-uniform)
BATCH_TOKENS = (200, 800)  # each prompt's tokens in a batched call (uniform)


def workload_calls(lengths: List[int], kind: str, step: int = 2048, seed: int = 0) -> List[List[Tuple[int, int, int]]]:
    """The calls ``kind`` makes over documents of ``lengths`` tokens: each call a list of
    (document, start, tokens) segments, one per sequence it holds.

    prefill: each document in ``step``-token chunks (``mlx_lm.generate``); chat: each document as
    consecutive requests of log-uniform ``CHAT_TOKENS`` tokens (a conversation's turns, each
    prefilled in one call, at most ``step``); batch: the documents cut into prompts of uniform
    ``BATCH_TOKENS`` tokens, ``BATCH_SEQS`` of them per call (cycling), prefilled together
    ``step`` tokens of each at a time (``batch_generate``). Seeded: the same arguments give the same calls."""
    if kind not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {kind!r}")
    rng = np.random.default_rng([seed, 23])
    calls = []
    if kind in ("prefill", "chat"):
        for d, n in enumerate(lengths):
            start = 0
            while start < n:
                if kind == "prefill":
                    m = step
                else:
                    lo, hi = np.log(CHAT_TOKENS[0]), np.log(CHAT_TOKENS[1])
                    m = min(int(round(np.exp(rng.uniform(lo, hi)))), step)
                m = min(m, n - start)
                calls.append([(d, start, m)])
                start += m
        return calls
    prompts = []  # (document, start, tokens): consecutive pieces of BATCH_TOKENS tokens
    for d, n in enumerate(lengths):
        start = 0
        while start < n:
            m = min(int(rng.integers(BATCH_TOKENS[0], BATCH_TOKENS[1] + 1)), n - start)
            prompts.append((d, start, m))
            start += m
    i, b = 0, 0
    while i < len(prompts):
        B = BATCH_SEQS[b % len(BATCH_SEQS)]
        b += 1
        group, i = prompts[i : i + B], i + B
        for s in range(0, max(m for _, _, m in group), step):
            calls.append([(d, st + s, min(step, m - s)) for d, st, m in group if m > s])
    return calls
