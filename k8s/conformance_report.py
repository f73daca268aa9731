#!/usr/bin/env python3
"""Writes docs/k8s-conformance.md from the node conformance suite's JUnit reports, one per
runtime handler: totals, every spec's result per handler, and the specs that fail or skip with
peapod only (their explanations live in k8s/conformance-notes.txt: "<spec name substring> |
why", one a line).

    conformance_report.py --out FILE HANDLER=junit.xml [HANDLER=junit.xml ...]
"""
import argparse
import datetime
import os
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))


def results(path):
    """spec name -> (status, message)"""
    out = {}
    if not os.path.exists(path):
        return out
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        if not name.startswith("[It]"):
            continue  # BeforeSuite, AfterSuite and reports
        name = name[len("[It]"):].strip()
        status = tc.get("status") or "passed"
        msg = ""
        for tag in ("failure", "error"):
            el = tc.find(tag)
            if el is not None:
                status = "failed"
                msg = (el.get("message") or el.text or "").strip().splitlines()[0:1]
                msg = msg[0] if msg else ""
        sk = tc.find("skipped")
        if sk is not None and status != "failed":
            # Ginkgo lists every spec the focus/skip filters left out as skipped with the bare
            # message "skipped"; a spec that ran and skipped itself says why after it.
            if (sk.get("message") or "").strip() == "skipped":
                continue
            status = "skipped"
            msg = (sk.get("message") or "").strip()
        out[name] = (status, msg)
    return out


def notes():
    path = os.path.join(HERE, "conformance-notes.txt")
    found = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "|" in line:
                key, why = line.split("|", 1)
                found.append((key.strip(), why.strip()))
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    runs = []
    for r in a.runs:
        h, path = r.split("=", 1)
        runs.append((h, results(path)))
    names = sorted(set().union(*[set(r) for _, r in runs]))
    why = notes()
    # The report compares against the first handler given: runc, the baseline.
    mark = {"passed": "pass", "failed": "**FAIL**", "skipped": "skip"}
    lines = ["# Kubernetes node conformance: runc and peapod side by side", "",
             f"Kubernetes' own node conformance suite (`test/e2e_node` of {open(os.path.join(HERE, 'VERSION')).read().strip()}, "
             "`[NodeConformance]` focus, without `[Serial]`, `[Slow]`, `[Flaky]`, `[Disruptive]` "
             "and `[Feature:…]` specs) against the one-node Kubernetes of `k8s/node.sh`, once per "
             "containerd default runtime handler. Made by `k8s/conformance.sh` on "
             f"{datetime.date.today()}; VMs under TCG.", "", "| handler | passed | failed | skipped |",
             "| --- | --- | --- | --- |"]
    for h, r in runs:
        c = {s: sum(1 for v in r.values() if v[0] == s) for s in ("passed", "failed", "skipped")}
        lines.append(f"| {h} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    if len(runs) > 1:
        base, other = runs[0], runs[-1]
        only = [n for n in names if other[1].get(n, ("missing", ""))[0] != "passed"
                and base[1].get(n, ("missing", ""))[0] == "passed"]
        lines += ["", f"## Specs that pass with {base[0]} and not with {other[0]}", ""]
        if not only:
            lines.append("None.")
        for n in only:
            st, msg = other[1].get(n, ("missing", ""))
            w = next((y for k, y in why if k in n), "not yet explained")
            lines.append(f"* `{n}`: {st}. {w}" + (f" (`{msg[:160]}`)" if msg else ""))
        better = [n for n in names if other[1].get(n, ("missing", ""))[0] == "passed"
                  and base[1].get(n, ("missing", ""))[0] == "failed"]
        lines += ["", f"## Specs that pass with {other[0]} and not with {base[0]}", ""]
        if not better:
            lines.append("None.")
        for n in better:
            w = next((y for k, y in why if k in n), "not yet explained")
            lines.append(f"* `{n}`: {w}")
        both = [n for n in names if all(r.get(n, ("missing", ""))[0] == "failed" for _, r in runs)]
        lines += ["", "## Specs that fail with every handler", "",
                  "Not peapod's: the node, the harness or the test images (built here from Debian "
                  "packages, without the network) differ from what the spec expects."]
        if both:
            lines.append("")
        for n in both:
            msg = other[1].get(n, ("", ""))[1]
            w = next((y for k, y in why if k in n), "not yet explained")
            lines.append(f"* `{n}`: {w}" + (f" (`{msg[:160]}`)" if msg else ""))
    lines += ["", "## Every spec", "", "| spec | " + " | ".join(h for h, _ in runs) + " |",
              "| --- |" + " --- |" * len(runs)]
    for n in names:
        cells = [mark.get(r.get(n, ("–", ""))[0], "–") for _, r in runs]
        lines.append(f"| {n.replace('|', '/')} | " + " | ".join(cells) + " |")
    open(a.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
