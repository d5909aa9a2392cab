"""GET /metrics of a real daemon, parsed with prometheus_client's own parser; the sample
alert rules and Grafana dashboard shipped in contrib/ are checked against the names it exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from support import DaemonProc, free_port, write_config
from support.metrics import scrape, value

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "bastion-alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "bastion-dashboard.json"


def test_metrics_after_backup_startbu_and_sql(daemon, bank):
    # no credentials, wrong credentials: refused like the admin API
    assert httpx.get(f"http://127.0.0.1:{daemon.port}/metrics").status_code == 401
    assert daemon.api("GET", "/metrics", token="wrong").status_code == 401

    m = scrape(daemon)
    assert value(m, "bastion_cluster_role", role="active") == 1.0
    assert value(m, "bastion_files_protected", database="bank") == 2.0
    assert "bastion_backup_last_success_age_seconds" not in m      # no backup yet: absent, not 0

    t0 = time.time()
    r = daemon.cli("backup", "bank", "--json")
    assert r.code == 0, r.err
    r = daemon.cli("verify", "--all", "--json")
    assert r.code == 0, r.err + r.out
    bank.start(60)
    try:
        assert daemon.cli("startbu", "bank").code == 0
        time.sleep(1.0)                       # the application writes into the held delta meanwhile
        base = f"http://127.0.0.1:{daemon.port}/v1/sql/bank"
        hdr = {"Authorization": f"Bearer {daemon.token}"}
        for _ in range(5):
            ok = httpx.post(base, json={"statements": ["SELECT count(*) FROM accounts"]}, headers=hdr)
            assert ok.status_code == 200, ok.text
        for _ in range(3):
            bad = httpx.post(base, json={"statements": ["SELECT * FROM nope"]}, headers=hdr)
            assert bad.status_code == 400
        tx = httpx.post(base + "/transactions", json={}, headers=hdr)
        assert tx.status_code == 200, tx.text

        m = scrape(daemon)
        age = value(m, "bastion_backup_last_success_age_seconds", database="bank")
        assert 0 <= age <= time.time() - t0 + 5
        assert value(m, "bastion_backup_last_success_timestamp_seconds", database="bank") >= t0 - 5
        assert value(m, "bastion_verify_last_ok", database="bank", mode="quick") == 1.0
        assert value(m, "bastion_contops_sessions", database="bank", status="active") == 2.0
        assert value(m, "bastion_contops_delta_bytes", database="bank") > 0
        assert value(m, "bastion_freeze_holds", database="bank", status="active") == 0.0
        assert value(m, "bastion_sql_requests_total", database="bank", operation="batch", code="200") >= 5
        assert value(m, "bastion_sql_requests_total", database="bank", operation="batch", code="400") == 3
        assert value(m, "bastion_sql_errors_total", database="bank", operation="batch") >= 3
        assert value(m, "bastion_sql_request_duration_seconds_count", database="bank", operation="batch") >= 8
        assert value(m, "bastion_sql_requests_total", database="bank", operation="begin", code="200") == 1
        assert value(m, "bastion_sql_open_transactions", database="bank") == 1.0
        tid = tx.json()["transaction"]
        assert httpx.post(f"{base}/transactions/{tid}/rollback", headers=hdr).status_code == 200
    finally:
        daemon.cli("endbu", "bank")
        bank.stop()
    m = scrape(daemon)
    assert value(m, "bastion_contops_sessions", database="bank", status="active") == 0.0
    assert value(m, "bastion_sql_open_transactions", database="bank") == 0.0
    assert value(m, "bastion_sql_requests_total", database="bank", operation="rollback", code="200") == 1
    assert value(m, "bastion_scrape_errors_total") == 0.0


def test_group_commit_batches_are_counted(tmp_path, bank):
    port = free_port()
    cfg = write_config(tmp_path, port, {"bank": [str(bank.bank), str(bank.audit)]})
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        hdr = {"Authorization": f"Bearer {d.token}"}
        for _i in range(4):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/sql/bank", headers=hdr, json={"statements": [
                {"sql": "UPDATE meta SET value = value WHERE key = 'transfers'"}]})
            assert r.status_code == 200, r.text
        m = scrape(d)
        commits = value(m, "bastion_sql_group_commit_batch_size_sum", database="bank")
        fsyncs = value(m, "bastion_sql_group_commit_fsyncs_total", database="bank")
        assert commits == 4 and 1 <= fsyncs <= 4
        assert value(m, "bastion_sql_group_commit_batch_size_count", database="bank") == fsyncs
    finally:
        d.stop()


def _exported_names() -> set[str]:
    src = (ROOT / "src" / "bastion" / "metrics.py").read_text()
    names = set(re.findall(r'"(bastion_[a-z_]+)"', src))
    out = set()
    for n in names:
        out |= {n, n + "_total", n + "_bucket", n + "_sum", n + "_count"}
    return out


def test_alert_rules_are_valid_and_use_exported_metrics():
    text = RULES.read_text()
    promtool = shutil.which("promtool")
    if promtool:
        p = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    import yaml  # a test-only dependency (PyYAML comes with uvicorn[standard])
    doc = yaml.safe_load(text)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 6 and all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in rules)
    known = _exported_names()
    for r in rules:
        used = set(re.findall(r"\bbastion_[a-z_]+", r["expr"]))
        assert used and used <= known, (r["alert"], used - known)


def test_grafana_dashboard_queries_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    known = _exported_names()
    for e in exprs:
        used = set(re.findall(r"\bbastion_[a-z_]+", e))
        assert used and used <= known, (e, used - known)
