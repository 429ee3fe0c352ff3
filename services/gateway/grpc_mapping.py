"""The gRPC API's messages (proto/splitserve/v1/inference.proto) as vLLM's OpenAI request bodies,
and vLLM's streamed OpenAI chunks as the API's CompletionChunk messages: what lets the gRPC API
be served by vLLM's own serving layer (services/gateway/grpc_api.py), with vLLM's meaning
of every parameter."""

from __future__ import annotations

import json
import struct
from typing import Any, Iterator

from splitserve_sdk.proto.v1 import inference_pb2 as ipb


class MappingError(ValueError):
    """A message that has no OpenAI request body (e.g. tool parameters that are not JSON)."""


# proto field -> the OpenAI body's field of the same meaning, for the optional scalars
_SCALARS = ("max_tokens", "temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "min_tokens", "n")


def f32(value: float) -> float:
    """The shortest decimal that a proto float (32 bits) was written from: 0.9, not the
    0.899999976 its bits read as, so that a parameter means over gRPC what it means in JSON."""
    bits = struct.pack("<f", value)
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == bits:
            return short
    return value


def sampling_fields(s: ipb.SamplingParams, chat: bool) -> dict[str, Any]:
    """The sampling parameters as the OpenAI body's fields (unset ones left out: vLLM's
    defaults)."""
    out: dict[str, Any] = {}
    for name in _SCALARS:
        if s.HasField(name):
            value = getattr(s, name)
            out[name] = f32(value) if isinstance(value, float) else value
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    if s.ignore_eos:
        out["ignore_eos"] = True
    if s.include_stop_str_in_output:
        out["include_stop_str_in_output"] = True
    if s.logit_bias:
        out["logit_bias"] = {str(k): f32(v) for k, v in s.logit_bias.items()}
    if s.HasField("logprobs"):
        if chat:
            out["logprobs"], out["top_logprobs"] = True, s.logprobs
        else:
            out["logprobs"] = s.logprobs
    if s.HasField("structured_output"):
        out["structured_outputs"] = _structured(s.structured_output)
    return out


def _structured(so: ipb.StructuredOutput) -> dict[str, Any]:
    kind = so.WhichOneof("kind")
    if kind is None:
        raise MappingError("sampling.structured_output names no constraint")
    if kind == "json_schema":
        return {"json": _json(so.json_schema, "sampling.structured_output.json_schema")}
    if kind == "choice":
        return {"choice": list(so.choice.values)}
    return {kind: getattr(so, kind)}


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingError(f"{where} is not JSON: {exc}") from None


_STREAMED = {"stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}


def completion_body(req: ipb.CompleteRequest) -> dict[str, Any]:
    """The OpenAI /v1/completions body of a Complete call (streamed, with usage)."""
    body: dict[str, Any] = {"model": req.model, **sampling_fields(req.sampling, chat=False)}
    which = req.WhichOneof("prompt")
    if which == "text":
        body["prompt"] = req.text
    elif which == "token_ids":
        body["prompt"] = list(req.token_ids.ids)
    return {**body, **_STREAMED}


def _message(m: ipb.ChatMessage) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": m.role,
                           "content": None if m.tool_calls and not m.content else m.content}
    if m.name:
        msg["name"] = m.name
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return msg


def _tool(i: int, t: ipb.Tool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": t.name}
    if t.description:
        fn["description"] = t.description
    if t.parameters_json:
        fn["parameters"] = _json(t.parameters_json, f"tools[{i}].parameters_json")
    return {"type": "function", "function": fn}


def chat_body(req: ipb.ChatRequest) -> dict[str, Any]:
    """The OpenAI /v1/chat/completions body of a Chat call (streamed, with usage)."""
    body: dict[str, Any] = {"model": req.model, "messages": [_message(m) for m in req.messages],
                            **sampling_fields(req.sampling, chat=True)}
    if req.tools:
        body["tools"] = [_tool(i, t) for i, t in enumerate(req.tools)]
    choice = req.tool_choice.WhichOneof("choice") if req.HasField("tool_choice") else None
    if choice == "mode":
        body["tool_choice"] = req.tool_choice.mode
    elif choice == "function":
        body["tool_choice"] = {"type": "function",
                               "function": {"name": req.tool_choice.function}}
    return {**body, **_STREAMED}


def usage(u: dict[str, Any]) -> ipb.Usage:
    """An OpenAI usage object as the API's Usage (cached tokens where vLLM reports them:
    its `enable_prompt_tokens_details` server setting)."""
    details = u.get("prompt_tokens_details") or {}
    return ipb.Usage(prompt_tokens=u.get("prompt_tokens") or 0,
                     completion_tokens=u.get("completion_tokens") or 0,
                     total_tokens=u.get("total_tokens") or 0,
                     cached_tokens=details.get("cached_tokens") or 0)


def _chat_logprobs(lp: dict[str, Any] | None) -> list[ipb.TokenLogprob]:
    return [ipb.TokenLogprob(token=e["token"], logprob=e["logprob"],
                             top=[ipb.TopLogprob(token=t["token"], logprob=t["logprob"])
                                  for t in e.get("top_logprobs") or ()])
            for e in (lp or {}).get("content") or ()]


def _completion_logprobs(lp: dict[str, Any] | None) -> list[ipb.TokenLogprob]:
    if not lp:
        return []
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return [ipb.TokenLogprob(token=tok, logprob=p if p is not None else 0.0,
                             top=[ipb.TopLogprob(token=t, logprob=v)
                                  for t, v in (top or {}).items()])
            for tok, p, top in zip(lp["tokens"], lp["token_logprobs"], tops)]


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[ipb.ToolCallDelta]:
    out = []
    for c in calls or ():
        fn = c.get("function") or {}
        out.append(ipb.ToolCallDelta(index=c.get("index") or 0, id=c.get("id") or "",
                                     name=fn.get("name") or "",
                                     arguments=fn.get("arguments") or ""))
    return out


def chunks(event: dict[str, Any], request_id: str) -> Iterator[ipb.CompletionChunk]:
    """The API's chunks of one streamed vLLM chunk (chat or completion), a choice each; the
    usage-only last chunk gives one chunk with `usage` set."""
    for c in event.get("choices") or ():
        delta = c.get("delta") or {}
        chat = "delta" in c
        out = ipb.CompletionChunk(
            id=request_id, index=c.get("index") or 0, token_ids=c.get("token_ids") or (),
            text=(delta.get("content") if chat else c.get("text")) or "",
            reasoning=delta.get("reasoning") or delta.get("reasoning_content") or "",
            tool_calls=_tool_calls(delta.get("tool_calls")),
            logprobs=(_chat_logprobs if chat else _completion_logprobs)(c.get("logprobs")))
        if c.get("finish_reason"):
            out.finish_reason = c["finish_reason"]
        yield out
    if event.get("usage") and not event.get("choices"):
        yield ipb.CompletionChunk(id=request_id, usage=usage(event["usage"]))
