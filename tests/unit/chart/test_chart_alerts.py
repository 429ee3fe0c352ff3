"""The PrometheusRule's alerts are valid PromQL (promtool check rules) and fire when they should
(promtool test rules on synthetic series). promtool comes with scripts/install_prometheus.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.chart import NAMESPACE, RELEASE, render_named

GATEWAY = f'namespace="{NAMESPACE}", service="{RELEASE}-splitserve-gateway"'
WORKERS = f'namespace="{NAMESPACE}", service="{RELEASE}-splitserve-workers"'


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/install_prometheus.sh"
    return path


def rules() -> dict:
    rule = render_named("gpu-production").get("PrometheusRule", f"{RELEASE}-splitserve")
    return {"groups": rule["spec"]["groups"]}


def annotations(alert: str, value: str = "", **labels: str) -> dict[str, str]:
    """The alert's annotations with {{ $labels.x }} and the formatted {{ $value }} filled in as
    Prometheus would."""
    r = next(r for g in rules()["groups"] for r in g["rules"] if r.get("alert") == alert)
    out = {}
    for k, v in r["annotations"].items():
        for name, label in labels.items():
            v = v.replace("{{ $labels.%s }}" % name, label)
        out[k] = v.replace("{{ $value | humanizePercentage }}", value)
    return out


def test_rules_are_valid_promql(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(rules()))
    proc = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout + proc.stderr


def test_alerts_fire_on_dead_workers_and_errors(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # decode workers vanish at minute 2; prefill stays
                {"series": f'splitserve_gateway_live_workers{{{GATEWAY}, pod="gw-0", role="decode"}}',
                 "values": "1 1 0 0 0 0 0 0"},
                {"series": f'splitserve_gateway_live_workers{{{GATEWAY}, pod="gw-0", role="prefill"}}',
                 "values": "1x7"},
                # 60 ok and 30 failed completions a minute: a third fail
                {"series": f'splitserve_gateway_requests_total{{{GATEWAY}, pod="gw-0", '
                           f'route="/v1/completions", status="200"}}', "values": "0+60x12"},
                {"series": f'splitserve_gateway_requests_total{{{GATEWAY}, pod="gw-0", '
                           f'route="/v1/completions", status="500"}}', "values": "0+30x12"},
                # scrapes of /metrics never count as errors or traffic
                {"series": f'splitserve_gateway_requests_total{{{GATEWAY}, pod="gw-0", '
                           f'route="/metrics", status="200"}}', "values": "0+1000x12"},
                {"series": f'up{{{GATEWAY}, pod="gw-0"}}', "values": "1x12"},
                {"series": f'up{{{WORKERS}, pod="decode-0"}}', "values": "1 1 0 0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "SplitserveNoLiveWorkers", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "SplitserveNoLiveWorkers", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "role": "decode"},
                    "exp_annotations": annotations("SplitserveNoLiveWorkers", role="decode")}]},
                {"eval_time": "5m", "alertname": "SplitserveWorkerDown", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": NAMESPACE,
                                   "service": f"{RELEASE}-splitserve-workers", "pod": "decode-0"},
                    "exp_annotations": annotations("SplitserveWorkerDown", pod="decode-0")}]},
                {"eval_time": "5m", "alertname": "SplitserveGatewayDown", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "SplitserveErrorRateHigh", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "SplitserveErrorRateHigh", "exp_alerts": [{
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": annotations("SplitserveErrorRateHigh", value="33.33%")}]},
            ],
        }],
    }
    f = tmp_path / "tests.yaml"
    f.write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool(), "test", "rules", str(f)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _promtool_test(tmp_path: Path, tests: dict) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    f = tmp_path / "tests.yaml"
    f.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                 "tests": [tests]}))
    proc = subprocess.run([promtool(), "test", "rules", str(f)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _audit_series(pod: str, per_min: dict[str, str]) -> list[dict[str, str]]:
    """A gateway's routing-audit counters, `values` per counter name."""
    return [{"series": f'splitserve_gateway_route_{name}_total{{{GATEWAY}, pod="{pod}"}}',
             "values": v} for name, v in per_min.items()]


def test_routing_precision_alert_fires_on_a_sustained_drop_with_traffic(tmp_path: Path) -> None:
    """Two gateways, 30 audited requests a minute each. Minutes 0-9: every predicted token is
    confirmed. From minute 10 gateway 0's engines confirm 60 of its 100 predicted tokens a
    minute (evictions behind the index): cluster precision (100+60)/(100+100) = 80% is not
    below 0.8; from minute 20 gateway 1's drop too (30 of 100): (60+30)/200 = 45%, held 10m
    (the chart's routeAuditFor) before it fires."""
    flat = "0+100x40"
    _promtool_test(tmp_path, {
        "interval": "1m",
        "input_series": [
            *_audit_series("gw-0", {"audited_requests": "0+30x40", "predicted_cached_tokens": flat,
                                    "matched_cached_tokens": "0+100x10 1060+60x30",
                                    "reported_cached_tokens": "0+100x10 1060+60x30"}),
            *_audit_series("gw-1", {"audited_requests": "0+30x40", "predicted_cached_tokens": flat,
                                    "matched_cached_tokens": "0+100x20 2030+30x20",
                                    "reported_cached_tokens": "0+100x20 2030+30x20"}),
        ],
        "alert_rule_test": [
            {"eval_time": "18m", "alertname": "SplitserveRoutingPrecisionLow", "exp_alerts": []},
            # below 0.8 from minute 21 (73%: the 5m rate catches gateway 1's drop at once),
            # pending 10m
            {"eval_time": "30m", "alertname": "SplitserveRoutingPrecisionLow", "exp_alerts": []},
            {"eval_time": "31m", "alertname": "SplitserveRoutingPrecisionLow", "exp_alerts": [{
                "exp_labels": {"severity": "warning"},
                "exp_annotations": annotations("SplitserveRoutingPrecisionLow", value="45%")}]},
            # what the engines hit, the index had foreseen: recall stays 1
            {"eval_time": "31m", "alertname": "SplitserveRoutingRecallLow", "exp_alerts": []},
        ],
    })


def test_routing_alerts_need_traffic_and_recall_catches_an_index_that_misses(
        tmp_path: Path) -> None:
    """A gateway with 2 audited requests a minute and nothing confirmed stays silent (below
    routeAuditMinRequests); one whose index predicts nothing while its engines hit 200 tokens
    a minute (e.g. a hash mismatch) raises the recall alert, not the precision one (nothing
    predicted: precision is undefined)."""
    _promtool_test(tmp_path, {
        "interval": "1m",
        "input_series": [
            *_audit_series("gw-0", {"audited_requests": "0+2x30",
                                    "predicted_cached_tokens": "0+100x30",
                                    "matched_cached_tokens": "0x30",
                                    "reported_cached_tokens": "0x30"}),
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "SplitserveRoutingPrecisionLow", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "SplitserveRoutingRecallLow", "exp_alerts": []},
        ],
    })
    _promtool_test(tmp_path, {
        "interval": "1m",
        "input_series": [
            *_audit_series("gw-0", {"audited_requests": "0+40x30",
                                    "predicted_cached_tokens": "0x30",
                                    "matched_cached_tokens": "0x30",
                                    "reported_cached_tokens": "0+200x30"}),
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "SplitserveRoutingPrecisionLow", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "SplitserveRoutingRecallLow", "exp_alerts": [{
                "exp_labels": {"severity": "warning"},
                "exp_annotations": annotations("SplitserveRoutingRecallLow", value="0%")}]},
        ],
    })


def test_index_replica_alert_fires_on_a_replica_unsynced_for_5m(tmp_path: Path) -> None:
    """Gateway 0's replica loses sync at minute 2 for good; gateway 1's for 3 minutes only
    (a failover it recovers from): only gateway 0's alert fires, 5m later."""
    _promtool_test(tmp_path, {
        "interval": "1m",
        "input_series": [
            {"series": f'splitserve_gateway_index_replica_synced{{{GATEWAY}, pod="gw-0"}}',
             "values": "1 1 0 0 0 0 0 0 0 0 0"},
            {"series": f'splitserve_gateway_index_replica_synced{{{GATEWAY}, pod="gw-1"}}',
             "values": "1 1 0 0 0 1 1 1 1 1 1"},
        ],
        "alert_rule_test": [
            {"eval_time": "6m", "alertname": "SplitserveIndexReplicaUnsynced", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "SplitserveIndexReplicaUnsynced", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "namespace": NAMESPACE,
                               "service": f"{RELEASE}-splitserve-gateway", "pod": "gw-0"},
                "exp_annotations": annotations("SplitserveIndexReplicaUnsynced", pod="gw-0")}]},
        ],
    })
