"""packaging/grafana/gpucostd-dashboard.json: the rows, variables and annotations a user relies
on; the fleet row reads only recorded series (cheap at any fleet size). Its queries run against
a real Prometheus in tests/test_prometheus.py."""
from __future__ import annotations

import json
import re

from conftest import REPO

DASH = json.loads((REPO / "packaging" / "grafana" / "gpucostd-dashboard.json").read_text())
RULES = (REPO / "packaging" / "prometheus" / "gpucostd-rules.yml").read_text()


def rows():
    out, current = {}, None
    for p in DASH["panels"]:
        if p["type"] == "row":
            current = p["title"].split()[0]
            out[current] = []
        else:
            out[current].append(p)
    return out


def test_variables_for_datasource_job_instance_and_gpu():
    names = [v["name"] for v in DASH["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "gpu"]
    gpu = DASH["templating"]["list"][3]
    assert gpu["multi"] and gpu["includeAll"] and gpu["allValue"] == ".*"
    for p in DASH["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            for t in p["targets"]:
                assert 'job="$job"' in t["expr"], (p["title"], t["expr"])


def test_fleet_row_uses_only_recorded_series_and_node_row_one_instance():
    r = rows()
    assert set(r) == {"Fleet", "Node"}
    recorded = set(re.findall(r"- record: (\S+)", RULES))
    for p in r["Fleet"]:
        for t in p["targets"]:
            names = set(re.findall(r"[a-z_]+:[a-z0-9_:]+", t["expr"]))
            assert names and names <= recorded, (p["title"], t["expr"])
    for p in r["Node"]:
        for t in p["targets"]:
            assert 'instance="$instance"' in t["expr"], (p["title"], t["expr"])
    titles = " ".join(p["title"] for p in r["Node"]).lower()
    for words in ("sm clock", "throttle reasons", "temperature", "power", "ecc", "remapping"):
        assert words in titles, words
    fleet = " ".join(p["title"] for p in r["Fleet"]).lower()
    for words in ("by reason", "worst nodes", "tokens per dollar", "idle", "unhealthy"):
        assert words in fleet, words


def test_events_are_annotations_and_panels_do_not_overlap():
    names = {a["name"] for a in DASH["annotations"]["list"]}
    assert {"Health changes", "Xid errors", "gpucostd alerts"} <= names
    cells = set()
    for p in DASH["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
    assert len({p["id"] for p in DASH["panels"]}) == len(DASH["panels"])
