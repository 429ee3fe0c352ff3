"""Seeded workloads: the list of requests one benchmark run sends, in arrival order.

A workload is plain data, built before any request is sent from a scenario config and a seed.
The same config and seed give byte-identical requests on every run and every machine: all text
comes from :class:`random.Random` instances seeded with strings (string seeds go through
SHA-512, so they do not depend on ``PYTHONHASHSEED``), and nothing depends on what a server
answers. That is what lets ``--compare`` send the identical workload to each cluster.

Scenarios are pydantic configs registered in :data:`SCENARIOS` under their name; adding one is
a subclass with its fields and a ``build`` method, decorated with :func:`scenario`.

Lengths are in words of a fixed English vocabulary. With the built-in model's tokenizer one
word is about one token (a little more with punctuation); with other tokenizers it is about
1.2-1.4 tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Api = Literal["chat", "completions"]

# A fixed vocabulary of common English and programming words (about one token each with the
# built-in tokenizer, which was trained on Python docstrings).
WORDS: tuple[str, ...] = tuple("""
the a an of to in for on with by from as at is are be was this that these those it its
return returns value values object objects function functions method methods class classes
module modules file files name names list lists string strings number numbers integer
default argument arguments parameter parameters result results error errors exception type
types data buffer stream streams line lines path paths directory key keys item items element
elements index start end size length time date format encoding text byte bytes character
instance instances attribute attributes call calls called create created new old first last
next previous current given optional required true false none empty single multiple each
every all any other same different specified used using use set get add remove update read
write open close check test run raise raised print load save copy move find search match
pattern sequence order sort sorted count total input output source target local global
system process thread threads lock queue task tasks event events signal handler handlers
server client request response message messages header headers body content address port
socket connection timeout mode flag flags option options config configuration setting
settings state status code codes level log logging debug warning info table row column
field fields record records tree node nodes parent child children root base block blocks
cache memory size limit limits range step steps loop condition expression statement
variable variables constant scope context manager resource resources handle handles
""".split())

T = TypeVar("T", bound="ScenarioConfig")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    index: int
    """position in arrival order (requests are dispatched in this order)"""
    max_tokens: int
    """output length; sent with `ignore_eos`, so every request generates exactly this many"""
    messages: tuple[tuple[str, str], ...] | None = None
    """chat requests: (role, content) pairs, sent to /v1/chat/completions"""
    prompt: str | None = None
    """completion requests: the prompt text, sent to /v1/completions"""
    conversation: int = 0
    """conversation (session) this request belongs to"""
    turn: int = 0
    """turn number within its conversation (0 first)"""
    after: int | None = None
    """index of the request that must have finished before this one is sent (previous turn)"""
    arrival_s: float | None = None
    """open-loop arrival: sent this many seconds after the run starts (None: as soon as the
    concurrency limit and request rate allow)"""
    tag: str = ""
    """request class the report breaks figures down by (e.g. mixed: chat / long)"""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a request has either messages or a prompt")

    @property
    def api(self) -> Api:
        """Which endpoint serves it."""
        return "chat" if self.messages is not None else "completions"

    def payload(self) -> dict[str, Any]:
        """The request body's workload part (model and sampling options are the client's)."""
        body: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


_OPTIONAL: dict[str, Any] = {"arrival_s": None, "tag": ""}


@dataclass(frozen=True)
class Workload:
    """A scenario's requests and the config that built them."""

    scenario: str
    config: dict[str, Any]
    requests: tuple[BenchRequest, ...]

    def fingerprint(self) -> str:
        """SHA-256 over the requests: equal fingerprints mean byte-identical workloads."""
        # Fields at their defaults are left out, so adding a field keeps older fingerprints.
        rows = [{k: v for k, v in asdict(r).items() if k not in _OPTIONAL or v != _OPTIONAL[k]}
                for r in self.requests]
        blob = json.dumps(rows, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def conversations(self) -> int:
        return len({r.conversation for r in self.requests})

    @property
    def tags(self) -> list[str]:
        """The request classes present, in order of first appearance ([] when untagged)."""
        return list(dict.fromkeys(r.tag for r in self.requests if r.tag))


def words(rng: random.Random, n: int) -> str:
    """`n` words of deterministic text, with a sentence break every 8 to 15 words."""
    out: list[str] = []
    until_stop = rng.randint(8, 15)
    for i in range(n):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        until_stop -= 1
        if until_stop == 0 or i == n - 1:
            out[-1] += "."
            until_stop = rng.randint(8, 15)
    return " ".join(out)


def rng_for(seed: int, *parts: object) -> random.Random:
    """An independent generator per (seed, purpose, ids): adding requests never shifts others."""
    return random.Random(":".join(map(str, (seed, *parts))))


class ScenarioConfig(BaseModel):
    """Base of every scenario's config."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str]

    seed: int = Field(0, description="seed of every random choice; same seed, same requests")

    def build(self) -> Workload:  # pragma: no cover - abstract
        raise NotImplementedError

    def _workload(self, requests: list[BenchRequest]) -> Workload:
        return Workload(self.name, self.model_dump(mode="json"), tuple(requests))


SCENARIOS: dict[str, type[ScenarioConfig]] = {}
"""Scenario name -> its config class."""


def scenario(cls: type[T]) -> type[T]:
    """Register a scenario config class under its `name`."""
    SCENARIOS[cls.name] = cls
    return cls


@scenario
class SyntheticConfig(ScenarioConfig):
    """Independent single-turn requests: random prompts of ISL ± spread words, OSL tokens."""

    name: ClassVar[str] = "synthetic"

    requests: int = Field(32, ge=1, description="number of requests")
    isl: int = Field(256, ge=1, description="mean prompt length in words (≈ tokens)")
    isl_spread: int = Field(64, ge=0, description="prompt lengths are uniform in isl ± spread")
    osl: int = Field(32, ge=1, description="mean output tokens per request")
    osl_spread: int = Field(0, ge=0, description="output lengths are uniform in osl ± spread")
    api: Api = Field("completions", description="endpoint: completions (prompt) or chat")

    @model_validator(mode="after")
    def _spread(self) -> "SyntheticConfig":
        if self.isl_spread >= self.isl:
            raise ValueError("isl_spread must be smaller than isl")
        if self.osl_spread >= self.osl:
            raise ValueError("osl_spread must be smaller than osl")
        return self

    def build(self) -> Workload:
        reqs = []
        for i in range(self.requests):
            rng = rng_for(self.seed, "synthetic", i)
            text = words(rng, rng.randint(self.isl - self.isl_spread, self.isl + self.isl_spread))
            osl = self.osl
            if self.osl_spread:  # drawn only with a spread: older workloads keep their bytes
                osl = rng_for(self.seed, "synthetic-osl", i).randint(self.osl - self.osl_spread,
                                                                     self.osl + self.osl_spread)
            if self.api == "chat":
                reqs.append(BenchRequest(i, osl, messages=(("user", text),), conversation=i))
            else:
                reqs.append(BenchRequest(i, osl, prompt=text, conversation=i))
        return self._workload(reqs)


@scenario
class PrefixReuseConfig(ScenarioConfig):
    """Multi-turn chats sharing long system prompts, growing turn by turn, arriving interleaved.

    Conversation `c` uses system prompt `c % system_prompts`. Its turn `t` sends the system
    prompt, every earlier user message and assistant reply, and a new user message; it is sent
    only after turn `t-1` finished (a user answers after reading the reply). Requests are listed
    turn-major (turn 0 of every conversation, then turn 1, ...), so with a concurrency limit
    below the number of conversations, conversations take turns round-robin.

    The assistant replies in the history are synthetic (deterministic text), not the text the
    server returned: every run, on every cluster, sends byte-identical prompts, whatever the
    model generates. The price: a server's cache of its own generated tokens is not reused by
    the next turn, only everything up to the previous turn's generation prompt.
    """

    name: ClassVar[str] = "prefix-reuse"

    conversations: int = Field(8, ge=1, description="number of conversations")
    turns: int = Field(3, ge=1, description="turns (requests) per conversation")
    system_prompts: int = Field(2, ge=1, description="distinct shared system prompts")
    system_min_words: int = Field(300, ge=1, description="shortest system prompt, in words")
    system_max_words: int = Field(500, ge=1, description="longest system prompt, in words")
    user_words: int = Field(40, ge=1, description="words per user message")
    reply_words: int = Field(24, ge=1, description="words per synthetic assistant reply")
    osl: int = Field(16, ge=1, description="output tokens per request")

    @model_validator(mode="after")
    def _lengths(self) -> "PrefixReuseConfig":
        if self.system_min_words > self.system_max_words:
            raise ValueError("system_min_words must not exceed system_max_words")
        return self

    def system_prompt(self, k: int) -> str:
        """Shared system prompt number `k`."""
        rng = rng_for(self.seed, "system", k)
        n = rng.randint(self.system_min_words, self.system_max_words)
        return f"You are assistant number {k}. " + words(rng, n)

    def build(self) -> Workload:
        systems = [self.system_prompt(k) for k in range(self.system_prompts)]
        history: list[list[tuple[str, str]]] = [
            [("system", systems[c % self.system_prompts])] for c in range(self.conversations)]
        reqs: list[BenchRequest] = []
        last: dict[int, int] = {}
        for t in range(self.turns):
            for c in range(self.conversations):
                user = words(rng_for(self.seed, "user", c, t), self.user_words)
                msgs = (*history[c], ("user", user))
                reqs.append(BenchRequest(len(reqs), self.osl, messages=msgs, conversation=c,
                                         turn=t, after=last.get(c)))
                last[c] = len(reqs) - 1
                reply = words(rng_for(self.seed, "reply", c, t), self.reply_words)
                history[c] = [*msgs, ("assistant", reply)]
        return self._workload(reqs)


@scenario
class MixedConfig(ScenarioConfig):
    """A steady stream of short chat turns while long-prompt requests arrive: the interference
    that disaggregation removes.

    Chat turns (tag `chat`) arrive open-loop as a Poisson process of `chat_rate` requests/s;
    long-prompt requests (tag `long`) arrive evenly spaced over the same span, the first half a
    gap in. In aggregated mode a long prompt's prefill runs in the same engine steps as the
    chats' decodes and stalls their token streams; in disaggregated mode it runs on the
    prefill worker. Read the `chat` ITL tail (and the run's output throughput).

    A p99 sees the stalls only if more than 1% of an engine's steps carry a long prefill, so
    the defaults send long prompts often (about 3.7/s of ~850 tokens, against 6 chat turns/s of
    64 tokens each): about a third of one core's prefill capacity with the built-in model.
    """

    name: ClassVar[str] = "mixed"

    chat_requests: int = Field(64, ge=1, description="number of chat turns")
    chat_rate: float = Field(6.0, gt=0, description="chat turns per second (Poisson)")
    chat_isl: int = Field(48, ge=1, description="mean chat prompt length in words (± 25%)")
    chat_osl: int = Field(64, ge=1, description="output tokens per chat turn")
    long_requests: int = Field(40, ge=0, description="number of long-prompt requests")
    long_isl: int = Field(700, ge=1, description="long prompt length in words (± 5%)")
    long_osl: int = Field(8, ge=1, description="output tokens per long-prompt request")

    def build(self) -> Workload:
        arrivals = rng_for(self.seed, "mixed", "arrivals")
        reqs: list[tuple[float, str, str, int]] = []
        t = 0.0
        for i in range(self.chat_requests):
            rng = rng_for(self.seed, "mixed", "chat", i)
            spread = self.chat_isl // 4
            reqs.append((t, "chat", words(rng, rng.randint(self.chat_isl - spread,
                                                            self.chat_isl + spread)),
                         self.chat_osl))
            t += arrivals.expovariate(self.chat_rate)
        span = self.chat_requests / self.chat_rate
        for j in range(self.long_requests):
            rng = rng_for(self.seed, "mixed", "long", j)
            spread = self.long_isl // 20
            n = rng.randint(self.long_isl - spread, self.long_isl + spread)
            reqs.append(((j + 0.5) * span / self.long_requests, "long", words(rng, n),
                         self.long_osl))
        reqs.sort(key=lambda r: (r[0], r[1]))
        return self._workload([
            BenchRequest(i, osl, messages=(("user", text),), conversation=i,
                         arrival_s=round(at, 6), tag=tag)
            for i, (at, tag, text, osl) in enumerate(reqs)])


CONTEXT_WORDS = 1500
"""Default limit on a prompt's length in words for the routing scenarios below: the built-in
model's context is 2,048 tokens, and these prompts come to about 1.2 tokens a word with its
tokenizer and chat template (doc-qa's 1,281 words: 1,522 tokens), plus the output."""


def _prompt_words(messages: tuple[tuple[str, str], ...]) -> int:
    return sum(len(text.split()) for _, text in messages)


def _check_context(reqs: list[BenchRequest], limit: int, name: str) -> None:
    longest = max((_prompt_words(r.messages or ()) for r in reqs), default=0)
    if longest > limit:
        raise ValueError(f"{name}: the longest prompt has {longest} words, more than "
                         f"max_prompt_words={limit} (the built-in model's context is 2,048 "
                         "tokens; raise it for a model with a longer one)")


@scenario
class SharedPromptsConfig(PrefixReuseConfig):
    """prefix-reuse with a few shared system prompts that fit every worker's cache: after
    the first turns every worker holds every system prompt, and what a router can still win
    is each conversation's own history (and the timing: not queueing cached turns behind
    cold ones). The conversation count is not a multiple of 2 or 3 workers, so round robin
    gets no accidental affinity."""

    name: ClassVar[str] = "prefix-reuse-shared"

    conversations: int = Field(13, ge=1, description="number of conversations")
    turns: int = Field(4, ge=1, description="turns (requests) per conversation")
    system_prompts: int = Field(2, ge=1, description="distinct shared system prompts")
    max_prompt_words: int = Field(CONTEXT_WORDS, ge=1, description=(
        "refuse a workload whose longest prompt is longer (in words)"))

    def build(self) -> Workload:
        w = super().build()
        _check_context(list(w.requests), self.max_prompt_words, self.name)
        return w


@scenario
class DocQAConfig(ScenarioConfig):
    """Long-document Q&A: a few huge shared documents, many short questions about them.

    Request `i` asks question `i` about document `d(i)`, drawn at random (seeded) with every
    document equally likely; the document comes first in the prompt, so all questions about
    one document share its whole length as a prefix, and the part each request must compute
    is its question. Single-turn, independent requests.
    """

    name: ClassVar[str] = "doc-qa"

    documents: int = Field(3, ge=1, description="distinct shared documents")
    doc_words: int = Field(1200, ge=1, description="words per document (± 5%)")
    questions: int = Field(48, ge=1, description="number of requests (one question each)")
    question_words: int = Field(16, ge=1, description="words per question")
    osl: int = Field(16, ge=1, description="output tokens per request")
    max_prompt_words: int = Field(CONTEXT_WORDS, ge=1, description=(
        "refuse a workload whose longest prompt is longer (in words)"))

    def document(self, k: int) -> str:
        """Document number `k`."""
        rng = rng_for(self.seed, "doc", k)
        spread = self.doc_words // 20
        return f"Document {k}. " + words(rng, rng.randint(self.doc_words - spread,
                                                          self.doc_words + spread))

    def build(self) -> Workload:
        docs = [self.document(k) for k in range(self.documents)]
        pick = rng_for(self.seed, "doc-qa", "pick")
        reqs = []
        for i in range(self.questions):
            d = pick.randrange(self.documents)
            q = words(rng_for(self.seed, "question", i), self.question_words)
            msgs = (("system", "Answer the question from the document."),
                    ("user", f"{docs[d]}\n\nQuestion: {q}"))
            reqs.append(BenchRequest(i, self.osl, messages=msgs, conversation=i))
        _check_context(reqs, self.max_prompt_words, self.name)
        return self._workload(reqs)


@scenario
class ManyTenantsConfig(ScenarioConfig):
    """Many tenants, little sharing: each request comes from one of many tenants at random
    (seeded), with that tenant's own system prompt and a fresh user message. With as many
    tenants as requests / 2, a system prompt is reused about once: a router gains little from
    the cache and must not lose on load."""

    name: ClassVar[str] = "many-tenants"

    tenants: int = Field(32, ge=1, description="distinct tenants (system prompts)")
    requests: int = Field(64, ge=1, description="number of requests")
    system_min_words: int = Field(200, ge=1, description="shortest system prompt, in words")
    system_max_words: int = Field(400, ge=1, description="longest system prompt, in words")
    user_words: int = Field(60, ge=1, description="words per user message")
    osl: int = Field(16, ge=1, description="output tokens per request")
    max_prompt_words: int = Field(CONTEXT_WORDS, ge=1, description=(
        "refuse a workload whose longest prompt is longer (in words)"))

    @model_validator(mode="after")
    def _lengths(self) -> "ManyTenantsConfig":
        if self.system_min_words > self.system_max_words:
            raise ValueError("system_min_words must not exceed system_max_words")
        return self

    def system_prompt(self, k: int) -> str:
        """Tenant `k`'s system prompt."""
        rng = rng_for(self.seed, "tenant", k)
        n = rng.randint(self.system_min_words, self.system_max_words)
        return f"You are the assistant of tenant {k}. " + words(rng, n)

    def build(self) -> Workload:
        pick = rng_for(self.seed, "many-tenants", "pick")
        prompts: dict[int, str] = {}
        reqs = []
        for i in range(self.requests):
            t = pick.randrange(self.tenants)
            system = prompts.setdefault(t, self.system_prompt(t))
            user = words(rng_for(self.seed, "tenant-user", i), self.user_words)
            reqs.append(BenchRequest(i, self.osl, messages=(("system", system), ("user", user)),
                                     conversation=i))
        _check_context(reqs, self.max_prompt_words, self.name)
        return self._workload(reqs)


def scenario_config(name: str, params: dict[str, Any]) -> ScenarioConfig:
    """Validate `params` for scenario `name` (unknown names and fields raise ValueError)."""
    try:
        cls = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
    unknown = set(params) - set(cls.model_fields)
    if unknown:
        raise ValueError(f"scenario {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes: {', '.join(cls.model_fields)}")
    return cls.model_validate(params)


def build_workload(name: str, **params: Any) -> Workload:
    """The workload of scenario `name` with `params` (e.g. seed=1, conversations=4)."""
    return scenario_config(name, params).build()


