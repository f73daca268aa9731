#!/usr/bin/env python3
"""Markdown conformance report from critest's (ginkgo's) JUnit reports, one per runtime handler.

    report.py --out FILE --junit runc=junit-runc.xml[:SECONDS] --junit peapod=...
              [--common-skips FILE] [--peapod-skips FILE] [--version NAME=VALUE]...
              [--title TEXT] [--note TEXT]
    report.py --check-no-failures --junit NAME=FILE...   # exit 1 if any spec failed
    (--only REGEX: only the specs a focused run selected)

Skip files hold one "<regex on the spec text><TAB><reason>" a line ('#' comments); the common
one lists what was skipped for every handler, peapod-skips.txt what only peapod skips.
"""

import argparse
import datetime
import re
import sys
import xml.etree.ElementTree as ET

FAILED = {"failed", "panicked", "timedout", "interrupted", "aborted"}
SUITE_NODES = re.compile(r"^\[(BeforeSuite|AfterSuite|SynchronizedBeforeSuite|"
                         r"SynchronizedAfterSuite|ReportBeforeSuite|ReportAfterSuite|DeferCleanup)")


def spec_name(raw):
    """'[It] [k8s.io] Container runtime ...' -> 'Container runtime ...'."""
    name = re.sub(r"^\[It\]\s*", "", raw)
    return re.sub(r"^\[k8s\.io\]\s*", "", name)


def first_line(text, limit=260):
    """critest's failure message on one line, without gomega's dumps of Go values."""
    lines = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith("In [") or re.match(r"^/.*\.go:\d+", line):
            break  # ginkgo's location line ends the message
        if line.endswith("{"):
            break  # a Go struct dump follows
        line = re.sub(r"^\[(FAILED|PANICKED|TIMEDOUT|INTERRUPTED)\]\s*", "", line)
        line = re.sub(r"^<[^>]*>:\s*", "", line)  # "<*errors.errorString | 0x…>:" type tags
        if line and line not in ("Unexpected error:", "occurred"):
            lines.append(line)
    msg = re.sub(r"[\x00-\x1f\x7f\ufffd]", " ", " ".join(lines))
    msg = re.sub(r"\s+", " ", msg).strip()
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def parse_junit(path):
    """{spec name: (status, message)}, and suite-level failures (BeforeSuite etc.)."""
    specs, suite_failures = {}, []
    for tc in ET.parse(path).iter("testcase"):
        raw = tc.get("name", "")
        status = tc.get("status", "")
        failure = tc.find("failure")
        error = tc.find("error")
        skipped = tc.find("skipped")
        if status in FAILED or failure is not None or error is not None:
            node = failure if failure is not None else error
            msg = ""
            if node is not None:
                msg = first_line(node.get("message")) or first_line(node.text)
            result = ("fail", msg)
        elif status == "skipped" or skipped is not None:
            msg = skipped.get("message", "") if skipped is not None else ""
            msg = re.sub(r"^skipped\s*-?\s*", "", msg).strip()
            result = ("skip", msg)
        elif status == "pending":
            result = ("skip", "pending")
        else:
            result = ("pass", "")
        if SUITE_NODES.match(raw):
            if result[0] == "fail":
                suite_failures.append((raw, result[1]))
            continue
        specs[spec_name(raw)] = result
    return specs, suite_failures


def read_skips(path):
    rules = []
    if not path:
        return rules
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            regex, _, reason = line.partition("\t")
            rules.append((re.compile(regex), reason.strip() or "(no reason given)", regex))
    return rules


def reason_for(rules, name):
    for rx, reason, _ in rules:
        if rx.search(name) or rx.search("[k8s.io] " + name):
            return reason
    return None


def md(text):
    return text.replace("|", "\\|")


def parse_junit_arg(arg):
    name, _, rest = arg.partition("=")
    path, secs = rest, None
    m = re.match(r"^(.*):(\d+)$", rest)
    if m:
        path, secs = m.group(1), int(m.group(2))
    return name, path, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--junit", action="append", default=[], help="NAME=FILE[:SECONDS]")
    ap.add_argument("--common-skips")
    ap.add_argument("--peapod-skips")
    ap.add_argument("--version", action="append", default=[], help="NAME=VALUE")
    ap.add_argument("--title", default="CRI conformance (critest)")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--only", help="report only the specs matching this regex (the run's focus)")
    ap.add_argument("--check-no-failures", action="store_true")
    a = ap.parse_args()

    handlers = []  # (name, specs, suite_failures, seconds)
    for arg in a.junit:
        name, path, secs = parse_junit_arg(arg)
        specs, suite_failures = parse_junit(path)
        handlers.append((name, specs, suite_failures, secs))

    if a.check_no_failures:
        bad = 0
        for name, specs, suite_failures, _ in handlers:
            fails = [n for n, (s, _) in specs.items() if s == "fail"]
            for n in fails:
                print(f"{name}: FAIL {n}", file=sys.stderr)
            for n, msg in suite_failures:
                print(f"{name}: FAIL {n} {msg}", file=sys.stderr)
            bad += len(fails) + len(suite_failures)
        return 1 if bad else 0

    common = read_skips(a.common_skips)
    peapod_rules = read_skips(a.peapod_skips)
    names = sorted({n for _, specs, _, _ in handlers for n in specs})
    if a.only:
        only = re.compile(a.only)
        names = [n for n in names if only.search("[k8s.io] " + n)]
    # critest skips its benchmarks unless run with -benchmark: not conformance, left out.
    benchmarks = [n for n in names if "benchmark" in n]
    names = [n for n in names if "benchmark" not in n]
    hnames = [h[0] for h in handlers]

    out = []
    w = out.append
    w(f"# {a.title}\n")
    w("Generated by `cri-tests/run.sh` on "
      f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: "
      "critest against a private containerd 2.x with one CRI runtime handler per column "
      "(`runc`: containerd's runc shim, the baseline; `peapod`: a QEMU VM per pod through "
      "peapod-sandboxer), images from a loopback registry built from Debian packages. "
      "How to run it and what it sets up: [cri-tests/README.md](../cri-tests/README.md).\n")
    for note in a.note:
        w(f"{note}\n")
    if a.version:
        w("| component | version |")
        w("| --- | --- |")
        for v in a.version:
            k, _, val = v.partition("=")
            w(f"| {md(k)} | {md(val) or 'unknown'} |")
        w("")

    w("## Totals\n")
    w("| handler | passed | failed | skipped | total | time |")
    w("| --- | --- | --- | --- | --- | --- |")
    for name, specs, suite_failures, secs in handlers:
        c = {"pass": 0, "fail": 0, "skip": 0}
        for n in names:
            if n in specs:
                c[specs[n][0]] += 1
        t = f"{secs // 60} min {secs % 60} s" if secs is not None else ""
        w(f"| {name} | {c['pass']} | {c['fail']} | {c['skip']} | {sum(c.values())} | {t} |")
    w("")
    for name, _, suite_failures, _ in handlers:
        for n, msg in suite_failures:
            w(f"**{name}: {md(n)} failed** — {md(msg)}\n")
    if benchmarks:
        w(f"Not counted: critest's {len(benchmarks)} benchmark specs, which it skips unless run "
          "with `-benchmark`.\n")

    w("## Results\n")
    w("| test | " + " | ".join(hnames) + " |")
    w("| --- | " + " | ".join("---" for _ in hnames) + " |")
    for n in names:
        cells = []
        for _, specs, _, _ in handlers:
            s = specs.get(n, ("—", ""))[0]
            cells.append("**fail**" if s == "fail" else s)
        w(f"| {md(n)} | " + " | ".join(cells) + " |")
    w("")

    # Skipped everywhere: this machine's or the setup's limits, with their reasons.
    everywhere = [n for n in names
                  if all(specs.get(n, ("skip",))[0] == "skip" for _, specs, _, _ in handlers)]
    if everywhere:
        w("## Skipped for every handler\n")
        w("| test | reason |")
        w("| --- | --- |")
        for n in everywhere:
            reason = reason_for(common, n)
            if reason is None:
                msgs = {specs[n][1] for _, specs, _, _ in handlers if n in specs and specs[n][1]}
                reason = "; ".join(sorted(msgs)) or "skipped by critest"
            w(f"| {md(n)} | {md(reason)} |")
        w("")

    if "peapod" in hnames:
        peapod = dict((h[0], h[1]) for h in handlers)["peapod"]
        others = [h for h in handlers if h[0] != "peapod"]
        w("## peapod skip list\n")
        w("Tests skipped (or expected to fail) for peapod but not for the other handlers, and why. "
          "The list that run.sh passes to critest is `cri-tests/peapod-skips.txt`; it holds only "
          "what cannot work in a VM runtime. Everything else that does not pass shows as a "
          "failure below.\n")
        rows = []
        for n in names:
            s, msg = peapod.get(n, ("—", ""))
            rule = reason_for(peapod_rules, n)
            skipped_elsewhere = any(h[1].get(n, ("",))[0] == "skip" for h in others)
            if s == "skip" and not skipped_elsewhere:
                rows.append((n, rule or (f"critest skipped it: {msg}" if msg else "skipped by critest")))
            elif rule is not None and s != "skip":
                rows.append((n, f"{rule} (listed, but ran: {s})"))
        if rows:
            w("| test | reason |")
            w("| --- | --- |")
            for n, reason in rows:
                w(f"| {md(n)} | {md(reason)} |")
        else:
            w("None: peapod runs every test that runc runs.")
        w("")

    any_fail = False
    for name, specs, _, _ in handlers:
        fails = [(n, specs[n][1]) for n in names if specs.get(n, ("",))[0] == "fail"]
        if not fails:
            continue
        if not any_fail:
            w("## Failures\n")
            any_fail = True
        w(f"### {name}\n")
        w("| test | critest's message |")
        w("| --- | --- |")
        for n, msg in fails:
            w(f"| {md(n)} | {md(msg)} |")
        w("")

    text = "\n".join(out).rstrip() + "\n"
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
