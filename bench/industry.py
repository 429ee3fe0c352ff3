"""An industry benchmark client (guidellm) against the gateway, next to `splitserve bench`.

    scripts/run_industry_bench.sh [--url URL --model-dir DIR] [--json out.json] ...

Shows two things in one run against one server: that an outside tool drives the gateway's
OpenAI API without errors (compatibility), and that `splitserve bench`'s figures agree with
the outside tool's on the same load (the same request count, concurrency, prompt and output
lengths, streaming chat completions with `ignore_eos`).

Like for like: guidellm's ITL is per request, (last token time - first token time) / (output
tokens - 1), summarised over requests; `splitserve bench` reports the same per-request figure
as TPOT (its ITL is the distribution of gaps between stream chunks, which this cannot compare).
TTFT is send -> first token in both. guidellm measures prompt lengths in tokens of the model's
tokenizer (a local directory: nothing is downloaded) and sends every prompt at that length;
`splitserve bench` draws prompts in words of its vocabulary, so its word count is calibrated
with the same tokenizer (`matched_words`) to give the same number of tokens per prompt, with no
spread (both clients' mean prompt lengths are reported).

After one unmeasured pass (engine warm-up), `--rounds` rounds. With `--schedule together` (the
default) both clients run at the same time, each with half the streams and requests, so they
measure one server in one state: on a machine whose cores the clients share with the server, a
client that needs more CPU slows the server it measures, and taking turns would compare two
different server states. With `--schedule alternate` they take turns, alternating which goes
first. Each client's figures are the mean over its rounds (per-round figures are kept), next
to the gateway's own TTFT and ITL means for the same window, read from its /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench import json_text
from bench.client import ClientConfig, run_workload, warm_up
from bench.stats import summarize
from bench.workload import SyntheticConfig

REPO = Path(__file__).resolve().parents[1]
TOOL_VENV = REPO / ".cache" / "tools" / "guidellm"


class Figures(BaseModel):
    """What both clients report, in milliseconds and tokens/s."""

    requests: int
    errors: int
    ttft_p50_ms: float | None
    ttft_mean_ms: float | None
    itl_p50_ms: float | None = Field(description="per-request ITL (TPOT), median over requests")
    itl_mean_ms: float | None = Field(description="per-request ITL (TPOT), mean over requests")
    output_tok_s: float | None
    prompt_tokens_mean: float | None = Field(None, description="prompt length, in tokens")
    gateway_ttft_mean_ms: float | None = Field(
        None, description="the same requests' mean TTFT as the gateway measured it (arrival to "
        "first chunk sent), from its Prometheus histogram")
    gateway_itl_mean_ms: float | None = Field(
        None, description="the gateway's mean gap between the chunks it sent")


GATEWAY_HISTOGRAMS = {"ttft": "splitserve_gateway_time_to_first_token_seconds",
                      "itl": "splitserve_gateway_inter_token_latency_seconds"}


def gateway_totals(url: str) -> dict[str, tuple[float, float]] | None:
    """(sum, count) of the gateway's TTFT and ITL histograms, over all routes; None when the
    server is not a splitserve gateway."""
    import httpx

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return None
    out: dict[str, tuple[float, float]] = {}
    for key, name in GATEWAY_HISTOGRAMS.items():
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
        out[key] = (total, count)
    return out if any(c for _, c in out.values()) or GATEWAY_HISTOGRAMS["ttft"] in text else None


def gateway_means(before: dict | None, after: dict | None) -> dict[str, float | None]:
    """Mean TTFT and ITL (ms) the gateway measured between two `gateway_totals` readings."""
    out: dict[str, float | None] = {"gateway_ttft_mean_ms": None, "gateway_itl_mean_ms": None}
    if before is None or after is None:
        return out
    for key in GATEWAY_HISTOGRAMS:
        d_sum = after[key][0] - before[key][0]
        d_count = after[key][1] - before[key][1]
        out[f"gateway_{key}_mean_ms"] = d_sum / d_count * 1000 if d_count > 0 else None
    return out


def matched_words(model_dir: Path, prompt_tokens: int, requests: int, seed: int) -> int:
    """The `splitserve bench` prompt length in words whose chat messages have, on average,
    `prompt_tokens` tokens of the model's tokenizer (what guidellm puts in each message)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = SyntheticConfig(requests=min(requests, 32), isl=prompt_tokens, isl_spread=0,
                            api="chat", seed=seed).build()
    counts = [len(tok(r.messages[0][1], add_special_tokens=False)["input_ids"])
              for r in probe.requests]
    per_word = sum(counts) / len(counts) / prompt_tokens
    return max(1, round(prompt_tokens / per_word))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_splitserve(url: str, model: str | None, wl: SyntheticConfig, concurrency: int,
                   warm: bool = True) -> Figures:
    from bench.stats import tpot_s

    cfg = ClientConfig(base_url=url, model=model, concurrency=concurrency)
    if warm:
        asyncio.run(warm_up(cfg, 1))
    before = gateway_totals(url)
    run = asyncio.run(run_workload(wl.build(), cfg))
    server = gateway_means(before, gateway_totals(url))
    s = summarize(run)
    ok = [r for r in run.results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tpots = [t * 1000 for r in ok if (t := tpot_s(r)) is not None]
    return Figures(requests=s.requests, errors=s.errors, ttft_p50_ms=s.ttft_ms.p50,
                   ttft_mean_ms=_mean(ttfts), itl_p50_ms=s.tpot_ms.p50, itl_mean_ms=_mean(tpots),
                   output_tok_s=s.output_tok_s,
                   prompt_tokens_mean=_mean([float(r.prompt_tokens) for r in ok
                                             if r.prompt_tokens is not None]), **server)


def guidellm_command(url: str, model: str, tokenizer_dir: Path, prompt_tokens: int,
                     output_tokens: int, requests: int, concurrency: int, out: Path,
                     seed: int = 0) -> list[str]:
    """guidellm's command line for the same load (guidellm 0.8 `run` syntax)."""
    return [str(TOOL_VENV / "bin" / "guidellm"), "run",
            "--backend", f"kind=openai_http,target={url},model={model}",
            "--profile", f"kind=concurrent,streams={concurrency}",
            "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                      f"output_tokens={output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
            "--seed", f"kind=static,value={seed}",
            "--output", f"kind=json,path={out}",
            "--disable-console-interactive"]


def _stat(metric: dict[str, Any], key: str) -> float | None:
    """A statistic of a guidellm metric's successful-request distribution."""
    dist = metric.get("successful") or {}
    if key == "p50":
        pct = dist.get("percentiles") or {}
        v = pct.get("p50", dist.get("median"))
    else:
        v = dist.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def parse_guidellm(doc: dict[str, Any]) -> Figures:
    """The figures of guidellm's (only) benchmark in its JSON report."""
    (bm,) = doc["benchmarks"]
    m = bm["metrics"]
    totals = m.get("request_totals") or {}
    return Figures(
        requests=int(totals.get("total", 0)),
        errors=int(totals.get("errored", 0)) + int(totals.get("incomplete", 0)),
        ttft_p50_ms=_stat(m["time_to_first_token_ms"], "p50"),
        ttft_mean_ms=_stat(m["time_to_first_token_ms"], "mean"),
        itl_p50_ms=_stat(m["inter_token_latency_ms"], "p50"),
        itl_mean_ms=_stat(m["inter_token_latency_ms"], "mean"),
        output_tok_s=_stat(m["output_tokens_per_second"], "mean"),
        prompt_tokens_mean=_stat(m["prompt_token_count"], "mean"),
    )


def agreement(ours: Figures, theirs: Figures) -> dict[str, float | None]:
    """ours / theirs for each latency figure (1.0 = identical)."""
    out: dict[str, float | None] = {}
    for k in ("ttft_p50_ms", "ttft_mean_ms", "itl_p50_ms", "itl_mean_ms"):
        a, b = getattr(ours, k), getattr(theirs, k)
        out[k] = a / b if a is not None and b else None
    return out


FIGURES = ("ttft_p50_ms", "ttft_mean_ms", "itl_p50_ms", "itl_mean_ms", "output_tok_s",
           "prompt_tokens_mean", "gateway_ttft_mean_ms", "gateway_itl_mean_ms")


def mean_of(rounds: list[Figures]) -> Figures:
    """Each figure's mean over rounds; request and error counts summed."""
    def avg(k: str) -> float | None:
        vals = [getattr(f, k) for f in rounds]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    return Figures(requests=sum(f.requests for f in rounds),
                   errors=sum(f.errors for f in rounds), **{k: avg(k) for k in FIGURES})


def markdown(res: dict[str, Any]) -> str:
    rows = ["| client | rounds | requests | errors | prompt tokens | TTFT p50 ms | TTFT mean ms "
            "| ITL p50 ms | ITL mean ms | output tok/s | gateway's TTFT mean ms "
            "| gateway's ITL mean ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("splitserve", "guidellm"):
        f = Figures(**res[name])
        rows.append(f"| {name} | {len(res['rounds'][name])} | {f.requests} | {f.errors} | "
                    + " | ".join("-" if v is None else f"{v:.1f}" for v in (
                        f.prompt_tokens_mean, f.ttft_p50_ms, f.ttft_mean_ms, f.itl_p50_ms,
                        f.itl_mean_ms, f.output_tok_s, f.gateway_ttft_mean_ms,
                        f.gateway_itl_mean_ms)) + " |")
    a = res["agreement"]
    rows.append("| splitserve / guidellm | | | | | " + " | ".join(
        "-" if a[k] is None else f"{a[k]:.3f}" for k in
        ("ttft_p50_ms", "ttft_mean_ms", "itl_p50_ms", "itl_mean_ms")) + " | | | |")
    return "\n".join(rows) + "\n"


def run_guidellm(cmd: list[str], env: dict[str, str], work: Path, r: int) -> Figures | None:
    """Run guidellm to the end; its figures, or None (printed why) when it failed."""
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=1800)
    return _guidellm_result(proc.returncode, proc.stdout + proc.stderr, cmd, work, r)


def _guidellm_result(code: int, output: str, cmd: list[str], work: Path, r: int
                     ) -> Figures | None:
    (work / f"guidellm-{r}.log").write_text(output)
    out = Path(cmd[cmd.index("--output") + 1].split("path=", 1)[1])
    if code != 0 or not out.exists():
        print(f"guidellm failed ({code}):\n{output[-3000:]}", file=sys.stderr)
        return None
    return parse_guidellm(json.loads(out.read_text()))


def run_together(url: str, model: str | None, wl: SyntheticConfig, concurrency: int,
                 cmd: list[str], env: dict[str, str], work: Path, r: int
                 ) -> tuple[Figures, Figures] | None:
    """Both clients load the server at the same time, each with half the streams: they measure
    the same server in the same state, so what differs is how they measure. splitserve bench
    starts once guidellm's first requests reach the gateway (guidellm takes seconds to start)."""
    import time

    before = gateway_totals(url)
    start_count = before["ttft"][1] if before else 0.0
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            now = gateway_totals(url)
            if now is None or now["ttft"][1] > start_count:
                break
            time.sleep(0.05)
        ours = run_splitserve(url, model, wl, concurrency, warm=False)
        try:
            code = proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.seek(0)
        theirs = _guidellm_result(code, log.read(), cmd, work, r)
    if theirs is None:
        return None
    server = gateway_means(before, gateway_totals(url))
    return ours.model_copy(update=server), theirs.model_copy(update=server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="server to load (default: start a cluster with --up-args)")
    p.add_argument("--model-dir", type=Path, help="with --url: the model directory (tokenizer)")
    p.add_argument("--model", help="served model name (default: the server's first)")
    p.add_argument("--up-args", default="", help="`splitserve up` flags of the cluster")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per client")
    p.add_argument("--schedule", choices=("together", "alternate"), default="together",
                   help="together: both clients at once, half the streams and requests each "
                   "(one server state, two measurements); alternate: one after the other, "
                   "each with all of them")
    p.add_argument("--guidellm-processes", type=int, default=1,
                   help="guidellm's worker processes (its default is one per stream, up to 10)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    ns = p.parse_args(argv)
    if not (TOOL_VENV / "bin" / "guidellm").exists():
        print(f"guidellm is not installed in {TOOL_VENV}: run scripts/run_industry_bench.sh",
              file=sys.stderr)
        return 2
    if ns.url and not ns.model_dir:
        p.error("--url needs --model-dir (guidellm's tokenizer)")
    cluster = None
    work = Path(tempfile.mkdtemp(prefix="splitserve-industry-"))
    try:
        if ns.url:
            url, model_dir = ns.url, ns.model_dir
        else:
            from bench.vllm_server import engine_config
            from services.controller.config import default_cache_dir
            from services.controller.launcher import start_cluster

            up_args = ns.up_args.split()
            model_dir = Path(engine_config(up_args, default_cache_dir()).model)
            try:
                cluster = start_cluster(up_args, work / "run", default_cache_dir())
            except (RuntimeError, TimeoutError) as exc:
                print(f"bench.industry: the cluster did not start: {str(exc)[-2000:]}",
                      file=sys.stderr)
                return 1
            url = cluster.http
        import httpx

        model = ns.model or httpx.get(url.rstrip("/") + "/v1/models",
                                      trust_env=False).json()["data"][0]["id"]
        isl = matched_words(model_dir, ns.prompt_tokens, ns.requests, ns.seed)
        print(f"splitserve bench prompts: {isl} words ≈ {ns.prompt_tokens} tokens",
              file=sys.stderr, flush=True)
        wl = SyntheticConfig(requests=ns.requests, isl=isl, isl_spread=0,
                             osl=ns.output_tokens, api="chat", seed=ns.seed)
        cmd: list[str] = []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(work / "hf"),
               # guidellm runs one worker process per stream by default (up to 10), each
               # polling its loop every 0.1 ms: on a small machine they take the cores the
               # server under test needs. splitserve bench is one process.
               "GUIDELLM__MAX_WORKER_PROCESSES": str(ns.guidellm_processes)}
        # Every pass sends prompts of its own (seeds differ): a prompt the server has seen
        # would be a prefix-cache hit for one client and not for the other.
        print("warm-up pass (not measured) ...", file=sys.stderr, flush=True)
        run_splitserve(url, model, wl.model_copy(update={"seed": ns.seed + 1000}),
                       ns.concurrency)
        rounds: dict[str, list[Figures]] = {"splitserve": [], "guidellm": []}
        for r in range(ns.rounds):
            if ns.schedule == "together":
                print(f"round {r + 1}/{ns.rounds}: both clients at once ...", file=sys.stderr,
                      flush=True)
                half = max(1, ns.concurrency // 2)
                both_wl = wl.model_copy(update={"requests": max(1, ns.requests // 2),
                                                "seed": ns.seed + r})
                cmd = guidellm_command(url, model, model_dir, ns.prompt_tokens,
                                       ns.output_tokens, max(1, ns.requests // 2), half,
                                       work / f"guidellm-{r}.json", ns.seed + r)
                got = run_together(url, model, both_wl, half, cmd, env, work, r)
                if got is None:
                    return 1
                rounds["splitserve"].append(got[0])
                rounds["guidellm"].append(got[1])
                continue
            for client in (("splitserve", "guidellm") if r % 2 == 0
                           else ("guidellm", "splitserve")):
                print(f"round {r + 1}/{ns.rounds}: {client} ...", file=sys.stderr, flush=True)
                if client == "splitserve":
                    rounds[client].append(run_splitserve(
                        url, model, wl.model_copy(update={"seed": ns.seed + r}), ns.concurrency))
                    continue
                cmd = guidellm_command(url, model, model_dir, ns.prompt_tokens,
                                       ns.output_tokens, ns.requests, ns.concurrency,
                                       work / f"guidellm-{r}.json", ns.seed + r)
                before = gateway_totals(url)
                theirs = run_guidellm(cmd, env, work, r)
                if theirs is None:
                    return 1
                rounds[client].append(theirs.model_copy(
                    update=gateway_means(before, gateway_totals(url))))
    finally:
        if cluster is not None:
            cluster.stop()
    ours, theirs = mean_of(rounds["splitserve"]), mean_of(rounds["guidellm"])
    res: dict[str, Any] = {
        "load": {"requests": ns.requests, "concurrency": ns.concurrency,
                 "guidellm_processes": ns.guidellm_processes, "schedule": ns.schedule,
                 "prompt_tokens": ns.prompt_tokens, "output_tokens": ns.output_tokens,
                 "api": "/v1/chat/completions (stream, ignore_eos)"},
        "guidellm_command": cmd[1:], "splitserve": ours.model_dump(),
        "guidellm": theirs.model_dump(), "agreement": agreement(ours, theirs),
        "rounds": {k: [f.model_dump() for f in v] for k, v in rounds.items()}}
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json_text.dumps(res))
    table = markdown(res)
    if ns.markdown:
        ns.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
