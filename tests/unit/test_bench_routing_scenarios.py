"""The routing scenarios: prefix-reuse-shared, doc-qa, many-tenants: their shape, their
determinism, and fingerprints pinned so that a change to their requests is seen."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.workload import (DocQAConfig, ManyTenantsConfig, PrefixReuseConfig,
                            SharedPromptsConfig, build_workload)

PINNED = {  # sha256 of the workload with these parameters, as of the scenarios' introduction
    ("prefix-reuse-shared", (("conversations", 5), ("seed", 1))):
        "b25a077c659afa0a7b2b0c6f820427ca0ea21898c5cc2e3af7f47171232062ff",
    ("doc-qa", (("questions", 10), ("seed", 2))):
        "a6321b3b882607087f8ef981980b1d6f53749013eadcc6e5d1c1eea5c54f696b",
    ("many-tenants", (("requests", 10), ("seed", 3))):
        "043bb2eff21861d7adc63d85f2a37827cc49a34cf50e51cb50776940016052b6",
}


def test_fingerprints_pinned() -> None:
    for (name, params), sha in PINNED.items():
        assert build_workload(name, **dict(params)).fingerprint() == sha, name


def test_shared_prompts_is_prefix_reuse_with_few_prompts_every_cache_holds() -> None:
    cfg = SharedPromptsConfig()
    w = cfg.build()
    assert w.scenario == "prefix-reuse-shared"
    assert cfg.conversations % 2 and cfg.conversations % 3  # no accidental round-robin affinity
    systems = {r.messages[0][1] for r in w.requests}
    assert len(systems) == cfg.system_prompts == 2
    # its requests are exactly prefix-reuse's with the same fields
    same = PrefixReuseConfig(**{k: v for k, v in cfg.model_dump().items()
                                if k in PrefixReuseConfig.model_fields}).build()
    assert same.requests == w.requests


def test_doc_qa_shape() -> None:
    cfg = DocQAConfig(seed=4)
    w = cfg.build()
    assert len(w.requests) == cfg.questions and w.conversations == cfg.questions
    docs = [cfg.document(k) for k in range(cfg.documents)]
    used = Counter()
    for r in w.requests:
        assert r.after is None and r.max_tokens == cfg.osl
        user = r.messages[-1][1]
        (k,) = [k for k, d in enumerate(docs) if user.startswith(d)]  # one document, first
        used[k] += 1
        question = user[len(docs[k]):]
        assert question.startswith("\n\nQuestion: ")
        assert len(question.split()) - 1 == cfg.question_words
    assert set(used) == set(range(cfg.documents))  # every document is asked about
    # the document dwarfs the question: most of each prompt is a shared prefix
    assert min(len(d.split()) for d in docs) > 50 * cfg.question_words


def test_many_tenants_little_sharing() -> None:
    cfg = ManyTenantsConfig(seed=5)
    w = cfg.build()
    systems = Counter(r.messages[0][1] for r in w.requests)
    assert len(w.requests) == cfg.requests
    assert len(systems) > cfg.tenants // 2  # most tenants appear
    assert max(systems.values()) <= 6  # no system prompt dominates
    assert len({r.messages[1][1] for r in w.requests}) == cfg.requests  # fresh user messages


def test_prompts_fit_the_built_in_context() -> None:
    from bench.workload import _prompt_words

    for cls in (SharedPromptsConfig, DocQAConfig, ManyTenantsConfig):
        w = cls().build()
        assert max(_prompt_words(r.messages) for r in w.requests) <= cls().max_prompt_words
    with pytest.raises(ValueError, match="max_prompt_words"):
        DocQAConfig(doc_words=3000).build()
    with pytest.raises(ValueError, match="max_prompt_words"):
        SharedPromptsConfig(turns=20).build()
