#!/usr/bin/python3
"""bench/results/<date>.json -> <date>.md + <date>-*.png (bench/README.md).

  bench/report.py RESULTS.json [--out-dir DIR]

Only reads the JSON: a rerun regenerates the same report. Plots need Debian's
python3-matplotlib (run with /usr/bin/python3); without it the report is written with no plots.
"""
import argparse
import json
import os
import re
import sys

# Frames that only pass control on (threads, std::function, main): hidden from "top functions"
# lists, which would otherwise start with ten wrappers at ~100 %.
WRAPPER = re.compile(
    r"start_thread|clone\.S|\(below main\)|__libc_start|^main$|:main$|std::thread::_State_impl|"
    r"std::_Function_handler|_M_invoke|_M_run|libstdc\+\+.*0x|std::__invoke|"
    r"_dl_catch_exception|_dl_start|_dl_sysdep_start|dl_main|^\?\?\?:0x")


# The order a pod start runs its steps in (the log line's JSON keys are sorted by name).
STEP_ORDER = ["containerd_cni", "scratch_disk", "tap_create", "vm_define_start", "tap_attach",
              "boot_to_agent", "guest_network", "guest_setup", "port_forwarder"]


def ordered_steps(keys):
    keys = [k for k in keys if k not in ("sandboxer_total", "runp_total")]
    return [k for k in STEP_ORDER if k in keys] + [k for k in keys if k not in STEP_ORDER]


def fmt_ms(v):
    if v is None:
        return "–"
    return f"{v / 1000:.2f} s" if v >= 10000 else f"{v:.0f} ms"


def spread(s, unit="ms", digits=0):
    """'median (min–max)' of a stats dict."""
    if not s or not s.get("n"):
        return "–"
    f = (lambda v: fmt_ms(v)) if unit == "ms" else (lambda v: f"{v:.{digits}f}")
    tail = f" {unit}" if unit not in ("ms", "") else ""
    if s["n"] == 1:
        return f"{f(s['median'])}{tail}"
    return f"{f(s['median'])}{tail} ({f(s['min'])}–{f(s['max'])}, n={s['n']})"


def derived_gap(marks):
    """ready -> answered per boot, from the runs lists of an older JSON."""
    a = (marks.get("exec_to_agent_ms") or {}).get("runs")
    r = (marks.get("agent_ready_ms") or {}).get("runs")
    if not a or not r or len(a) != len(r):
        return None
    v = sorted(x - y for x, y in zip(a, r))
    n = len(v)
    med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"n": n, "median": med, "min": v[0], "max": v[-1]}


def ratio(r):
    return "–" if r is None else f"**{r:.2f}×**"


def short_fn(fn, n=90):
    fn = re.sub(r"^\S*?:(?=[A-Za-z_?(])", "", fn, count=1)  # the source file
    fn = re.sub(r"std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >",
                "std::string", fn)
    fn = re.sub(r"\(.*\)", "(…)", fn)
    return fn if len(fn) <= n else fn[: n - 1] + "…"


def top_rows(rows, n=10):
    out = [r for r in rows if not WRAPPER.search(r["fn"]) and not r["fn"].startswith("=>")]
    seen, uniq = set(), []
    for r in out:  # the same function listed under two source files (inlined parts)
        k = short_fn(r["fn"], 400)
        if k in seen:
            continue
        seen.add(k)
        uniq.append(r)
    return uniq[:n]


class Report:
    def __init__(self, d, out_dir, stem):
        self.d = d
        self.out_dir = out_dir
        self.stem = stem
        self.lines = []
        self.pngs = {}
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            self.plt = plt
        except ImportError:
            self.plt = None
            print("report: no matplotlib (use /usr/bin/python3 with python3-matplotlib): no plots",
                  file=sys.stderr)

    def w(self, s=""):
        self.lines.append(s)

    def png(self, fig, name, alt):
        path = f"{self.stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, path), dpi=110)
        self.plt.close(fig)
        self.w(f"![{alt}]({path})")
        self.w()

    # ------------------------------------------------------------ sections

    def header(self):
        d = self.d
        h, c, v = d.get("host", {}), d.get("config", {}), d.get("versions", {})
        self.w(f"# peapod benchmarks: {d.get('date', '?')}")
        self.w()
        self.w("Every figure is a ratio to a baseline measured in the same run (`bench/run.sh`); "
               "values are the median with (min–max) over the repeats. Regenerate this page from "
               "the JSON with `bench/report.py " + os.path.basename(self.stem) + ".json`.")
        self.w()
        self.w(f"* host: {h.get('cpus')} CPUs, {h.get('mem_total_mib')} MiB, kernel "
               f"{h.get('kernel')}, VMs with **{h.get('accel', '?').upper()}**"
               f"{' (pod QEMU: `-accel ' + h['pod_qemu_accel'] + '`)' if h.get('pod_qemu_accel') else ''}; load average at "
               f"start {' '.join(h.get('loadavg_at_start', []))} (the machine is shared: expect noise)")
        self.w(f"* {h.get('qemu', '')}; containerd {v.get('containerd2', '?')} and "
               f"{v.get('containerd16', '?')}; crictl {v.get('crictl', '?')}; runc "
               f"{v.get('runc', '?')}; peapod {h.get('peapod', '?')}")
        self.w(f"* repeats {c.get('repeat')}{' (--quick)' if c.get('quick') else ''}; "
               f"figures {', '.join(c.get('figures', []))}; wall time {d.get('wall_s', 0) / 60:.1f} min")
        if c.get("sandboxer_overrides"):
            self.w("* **sandboxer settings changed for this run** (`BENCH_SANDBOXER_CONFIG`): "
                   f"`{json.dumps(c['sandboxer_overrides'])}`; its figures measure those, not "
                   "the defaults")
        if d.get("error"):
            self.w(f"* **the run did not finish:** {d['error']}")
        self.w()

    def summary(self):
        d = self.d
        cs, fl = d.get("cold_start", {}), d.get("floor", {})
        self.w("## Summary")
        self.w()
        self.w("| figure | peapod | baseline | ratio |")
        self.w("| --- | --- | --- | --- |")
        if fl:
            self.w(f"| 1. boot floor: QEMU + guest kernel + agent, no libvirt | "
                   f"{spread(fl['exec_to_agent_ms'])} | – | 1 |")
        for k, name in (("containerd2", "containerd 2.x, sandbox API"),
                        ("containerd16", "containerd 1.6, classic CRI")):
            if k in cs:
                self.w(f"| 2. cold pod start (`crictl runp`), {name} | {spread(cs[k])} | "
                       f"floor {fmt_ms(d.get('floor_ms'))} | {ratio(cs[k].get('ratio_to_floor'))} |")
        if "runc" in cs:
            self.w(f"| 2. (reference) runc pod start | {spread(cs['runc'])} | floor | "
                   f"{ratio(cs['runc'].get('ratio_to_floor'))} |")
        if "warm_start" in d:
            ws = d["warm_start"]
            self.w(f"| 2. warm pod start (`crictl runp`, pool_size 1), containerd 2.x | "
                   f"{spread(ws)} | cold {fmt_ms(cs.get('containerd2', {}).get('median'))} | "
                   f"{ratio(ws.get('ratio_to_cold'))} (`warm_to_cold`) |")
        t = d.get("template", {})
        if "single" in t:
            self.w(f"| 2t. pod start from the VM template, no pool | {spread(t['single'])} | "
                   f"floor {fmt_ms(d.get('floor_ms'))} | {ratio(t['single'].get('ratio_to_floor'))} |")
        if "burst" in t:
            b = t["burst"]
            self.w(f"| 2t. {b['pods']} pods at once from the template, all ready | "
                   f"{fmt_ms(b['all_ready_ms'])} | one {fmt_ms(t['single']['median'])} | "
                   f"{ratio(b.get('ratio_to_single'))} |")
        if "pss_ratio" in t:
            self.w(f"| 2t. idle pod QEMU PSS, from the template | {t['pss_idle_template_mib']:.0f} MiB | "
                   f"booted {t['pss_idle_booted_mib']:.0f} MiB | {ratio(t['pss_ratio'])} |")
        if "warm_pool" in t:
            w = t["warm_pool"]
            self.w(f"| 2t. warm pod start, pool made from the template | {spread(w)} | runc "
                   f"{fmt_ms(cs.get('runc', {}).get('median'))} | {ratio(w.get('ratio_to_runc'))} |")
        if "container_start" in d:
            c = d["container_start"]
            self.w(f"| 3. container create + start in a running pod | {spread(c['peapod']['total'])} | "
                   f"runc {spread(c['runc']['total'])} | {ratio(c.get('ratio'))} |")
        if "exec" in d:
            e = d["exec"]
            self.w(f"| 4. exec round trip (`crictl exec -s … true`) | {spread(e['peapod'])} | "
                   f"runc {spread(e['runc'])} | {ratio(e.get('ratio'))} |")
        if "stdio" in d:
            s = d["stdio"]
            self.w(f"| 5. stdio throughput, {s['mib']} MiB through `crictl exec` | "
                   f"{spread(s['peapod'], 'MiB/s', 1)} | runc {spread(s['runc'], 'MiB/s', 1)} | "
                   f"{ratio(s.get('ratio'))} |")
        if "memory" in d:
            m = d["memory"]
            self.w(f"| 6. host memory (PSS) per idle pod | {spread(m['peapod']['total_mib'], 'MiB')} | "
                   f"runc {spread(m['runc']['total_mib'], 'MiB', 1)} | {ratio(m.get('ratio'))} |")
        k = d.get("ksm", {})
        if "ratio" in k:
            self.w(f"| 6b. idle pool VM PSS with KSM, {k['vms']} VMs | "
                   f"{spread(k['pss_after_mib'], 'MiB')} | without KSM "
                   f"{spread(k['pss_before_mib'], 'MiB')} | {ratio(k['ratio'])} (`ksm`) |")
        if "density" in d and d["density"]["pods"]:
            den = d["density"]
            last = den["pods"][-1]
            per_pod = den["settled_after_10s"]["our_pss_mib"] / den["max_pods"]
            self.w(f"| 7. density: {den['max_pods']} pods one by one ({den['stopped_because']}) | "
                   f"last start {fmt_ms(last['start_ms'])}; {per_pod:.0f} MiB PSS per pod | "
                   f"first start {fmt_ms(den['pods'][0]['start_ms'])} | "
                   f"{ratio(last.get('ratio_to_first'))} |")
        fl = d.get("flood", {})
        if "rss_ratio" in fl:
            self.w(f"| 9. hostile channel flood: sandboxer RSS / neighbour Check | "
                   f"{spread(fl['rss_flood_mib'], 'MiB', 1)} / {spread(fl['check_flood_ms'], '', 2)} ms | "
                   f"quiet {spread(fl['rss_idle_mib'], 'MiB', 1)} / "
                   f"{spread(fl['check_quiet_ms'], '', 2)} ms | {ratio(fl['rss_ratio'])} / "
                   f"{ratio(fl['latency_ratio'])} |")
        if "callgrind" in d and "skipped" in d["callgrind"]:
            self.w(f"| 8. instructions per pod lifecycle (callgrind) | skipped: "
                   f"{d['callgrind']['skipped']} | – | – |")
        elif "callgrind" in d:
            cg = d["callgrind"]
            self.w(f"| 8. instructions per pod lifecycle (callgrind, exact) | sandboxer "
                   f"{cg['sandboxer']['per_pod_ir'] / 1e6:.1f} M Ir, shims "
                   f"{cg['shim']['per_pod_ir'] / 1e6:.1f} M Ir | – | count |")
        self.w()

    def floor_and_cold(self):
        d = self.d
        fl, cs, bd = d.get("floor"), d.get("cold_start", {}), d.get("breakdown", {})
        if not fl and not cs:
            return
        self.w("## 1–2. Boot floor and cold pod start")
        self.w()
        if fl:
            self.w(f"The floor is `bench/floor.py`: the same kernel, initrd and command line started "
                   f"directly with qemu-system-x86_64 (the devices libvirt gives a pod: q35, virtio-scsi "
                   f"with a scratch disk, virtio-serial agent port on a unix socket, 9p, virtio-net, "
                   f"serial console to a file), timed from exec to the agent's first answer to a ttrpc "
                   f"`Check` sent every 20 ms: {spread(fl['exec_to_agent_ms'])}. Host-side times "
                   f"since QEMU's exec (the guest kernel is quiet: the agent's first console line is "
                   f"the one after it loaded its modules):")
            self.w()
            sbp = fl.get("sandboxer_polling", {})
            self.w("| mark | floor (Check every 20 ms) | same, polled like the sandboxer (1 s timeout, 200 ms retry) |")
            self.w("| --- | --- | --- |")
            for k, name in (("exec_to_socket_ms", "QEMU listens on the agent socket"),
                            ("console_first_line_ms", "agent: modules loaded (kernel boot + /init + 31 modules)"),
                            ("agent_ready_ms", "agent: ready (virtio-serial port open)"),
                            ("agent_host_connected_ms", "agent: host connected"),
                            ("exec_to_agent_ms", "**first Check answered**")):
                self.w(f"| {name} | {spread(fl.get(k))} | {spread(sbp.get(k))} |")
            self.w(f"| agent ready → first Check answered (per boot) | "
                   f"{spread(fl.get('ready_to_answer_ms') or derived_gap(fl))} | "
                   f"{spread(sbp.get('ready_to_answer_ms') or derived_gap(sbp))} |")
            self.w()
        if bd:
            keys = []
            for b in bd.values():
                keys += [k for k in b if k not in keys]
            keys = ordered_steps(keys)
            self.w("Where `crictl runp` goes (median ms; the sandboxer's steps are its "
                   "`start steps ms` log line; containerd+CNI is runp minus the sandboxer's total):")
            self.w()
            cols = list(bd)
            self.w("| step | " + " | ".join(cols) + " |")
            self.w("| --- |" + " --- |" * len(cols))
            for k in keys + ["sandboxer_total", "runp_total"]:
                row = []
                for c in cols:
                    s = bd[c].get(k)
                    tot = bd[c]["runp_total"]["median"]
                    row.append(f"{s['median']:.0f} ({100 * s['median'] / tot:.0f} %) [{s['min']:.0f}–{s['max']:.0f}]"
                               if s else "–")
                name = k.replace("_", " ")
                self.w(f"| {'**' + name + '**' if k.endswith('total') else name} | " + " | ".join(row) + " |")
            self.w()
            if self.plt:
                self.plot_breakdown(bd, fl)
        if "containerd2_stop_rm_ms" in cs:
            self.w(f"Removing a pod (`crictl stopp` + `rmp`), containerd 2.x: "
                   f"{spread(cs['containerd2_stop_rm_ms'])}.")
            self.w()

    def plot_breakdown(self, bd, fl):
        plt = self.plt
        fig, ax = plt.subplots(figsize=(9, 3.2 + 0.4 * len(bd)))
        names = list(bd)
        steps = ordered_steps(bd[names[0]])
        cmap = plt.get_cmap("tab20")
        for i, c in enumerate(names):
            left = 0
            for j, k in enumerate(steps):
                v = bd[c].get(k, {}).get("median", 0)
                ax.barh(i, v, left=left, color=cmap(j % 20), label=k.replace("_", " ") if i == 0 else None)
                left += v
        if fl:
            ax.axvline(fl["exec_to_agent_ms"]["median"], color="k", ls="--", label="boot floor")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("ms (median)")
        ax.set_title("cold pod start (crictl runp) by step")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        self.png(fig, "cold-start", "cold start breakdown")

    def running(self):
        d = self.d
        if "container_start" not in d:
            return
        c, e, s = d["container_start"], d.get("exec"), d.get("stdio")
        self.w("## 3–5. Containers in a running pod")
        self.w()
        self.w("One peapod pod and one runc pod on the same containerd 2.x; busybox containers.")
        self.w()
        self.w("| | peapod | runc | ratio |")
        self.w("| --- | --- | --- | --- |")
        for k in ("create", "start", "total"):
            self.w(f"| container {k} | {spread(c['peapod'][k])} | {spread(c['runc'][k])} | "
                   f"{ratio(c['peapod'][k]['median'] / c['runc'][k]['median'] if c['runc'][k]['median'] else None)} |")
        self.w(f"| first container in the pod (peapod: builds the EROFS layer) | "
               f"{fmt_ms(c['peapod']['first_ms'])} | {fmt_ms(c['runc']['first_ms'])} | |")
        if e:
            self.w(f"| exec `true` (n={e['peapod']['n']}) | {spread(e['peapod'])} | {spread(e['runc'])} | {ratio(e['ratio'])} |")
        if s:
            self.w(f"| stdio {s['mib']} MiB, MiB/s | {spread(s['peapod'], '', 1)} | {spread(s['runc'], '', 1)} | {ratio(s['ratio'])} |")
            loc = s.get("in_container_no_stdio")
            if loc:
                self.w(f"| control: same dd to /dev/null in the container, MiB/s | "
                       f"{spread(loc['peapod'], '', 1)} | {spread(loc['runc'], '', 1)} | |")
        self.w()
        self.w(f"Container start: {c['what']}. Exec: {e['what'] if e else ''}. Stdio: {s['what'] if s else ''}.")
        self.w()
        for name, fails in (("container start", c["peapod"].get("failures", []) + c["runc"].get("failures", [])),
                            ("exec", (e or {}).get("peapod", {}).get("failures", []) + (e or {}).get("runc", {}).get("failures", []))):
            if fails:
                first = fails[0]["error"] if isinstance(fails[0], dict) else fails[0]
                self.w(f"**{len(fails)} {name} failure(s)** (retried, not timed); the first: `{first.strip()[-400:]}`")
                self.w()
        if self.plt:
            plt = self.plt
            items = [("container\ncreate+start", c["peapod"]["total"], c["runc"]["total"], False)]
            if e:
                items.append(("exec\nround trip", e["peapod"], e["runc"], False))
            if s:
                items.append((f"stdio\nthroughput", s["peapod"], s["runc"], True))
            fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.4))
            if len(items) == 1:
                axes = [axes]
            for ax, (name, p, r, higher) in zip(axes, items):
                for i, (h, st) in enumerate((("peapod", p), ("runc", r))):
                    ax.bar(i, st["median"], color="C0" if h == "peapod" else "C2",
                           yerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]], capsize=4)
                ax.set_xticks([0, 1], ["peapod", "runc"])
                ax.set_ylabel("MiB/s (higher is better)" if higher else "ms (median, min–max)")
                rr = p["median"] / r["median"] if r["median"] else 0
                ax.set_title(f"{name}\n{rr:.2f}× runc", fontsize=9)
            self.png(fig, "running-pods", "container start, exec, stdio: peapod vs runc")

    def memory(self):
        m = self.d.get("memory")
        if not m:
            return
        p, r = m["peapod"], m["runc"]
        self.w("## 6. Memory of an idle pod")
        self.w()
        self.w(m["what"] + ".")
        self.w()
        self.w("| part | MiB (median, min–max) |")
        self.w("| --- | --- |")
        rows = [("peapod: QEMU", "qemu_pss_mib"),
                ("… of which guest RAM touched", "qemu_guest_ram_mib"),
                ("… of which guest RAM in transparent huge pages", "qemu_guest_ram_in_huge_pages_mib"),
                ("… of which TCG translation buffer", "qemu_tcg_buffer_mib"),
                ("… of which kernel + initrd files (page cache shared by pods)", "qemu_kernel_initrd_mib"),
                ("… of which QEMU itself (heap, libraries, devices)", "qemu_other_mib"),
                ("peapod: container shims", "shims_pss_mib"),
                ("peapod: sandboxer's PSS / its pods", "sandboxer_share_mib"),
                ("**peapod: total per pod**", "total_mib")]
        for name, k in rows:
            if k in p:
                self.w(f"| {name} | {spread(p[k], '', 1)} |")
        g = p.get("guest", {})
        if g:
            self.w(f"| guest's own view: MemTotal − MemAvailable (of {g['mem_total_mib']:.0f}) | {g['mem_used_mib']:.1f} |")
        self.w(f"| runc: shim | {spread(r['shim_pss_mib'], '', 1)} |")
        self.w(f"| runc: pause + container | {spread(r['pause_and_containers_pss_mib'], '', 1)} |")
        self.w(f"| **runc: total per pod** | {spread(r['total_mib'], '', 1)} |")
        self.w(f"| **ratio** | {ratio(m.get('ratio'))} |")
        self.w()
        tb = p.get("qemu_tcg_buffer_mib", {}).get("median")
        if tb:
            rest = p["total_mib"]["median"] - tb
            self.w(f"Without the TCG translation buffer (QEMU's code cache for emulated guest code, "
                   f"which grows with what the guest has run and does not exist under KVM) a pod "
                   f"costs {rest:.0f} MiB, {rest / r['total_mib']['median']:.0f}× a runc pod.")
            self.w()
        if self.plt:
            plt = self.plt
            fig, ax = plt.subplots(figsize=(7, 3))
            parts = [("guest RAM", "qemu_guest_ram_mib"), ("TCG buffer", "qemu_tcg_buffer_mib"),
                     ("kernel+initrd", "qemu_kernel_initrd_mib"), ("QEMU other", "qemu_other_mib"),
                     ("shims", "shims_pss_mib"), ("sandboxer share", "sandboxer_share_mib")]
            left = 0
            for j, (name, k) in enumerate(parts):
                v = p.get(k, {}).get("median", 0)
                ax.barh(1, v, left=left, color=f"C{j}", label=name)
                left += v
            ax.barh(0, r["total_mib"]["median"], color="C7", label="runc pod (shim+pause+container)")
            ax.set_yticks([0, 1], ["runc", "peapod"])
            ax.set_xlabel("host PSS, MiB (median)")
            ax.set_title(f"memory per idle pod: {m.get('ratio', 0):.0f}× runc")
            ax.legend(fontsize=7, loc="lower right")
            self.png(fig, "memory", "memory per pod")

    def template(self):
        t = self.d.get("template")
        if not t:
            return
        self.w("## 2t. Pods from the VM template")
        self.w()
        self.w("The sandboxer with `start_from` template: one VM booted and saved "
               f"({t.get('state_mib', '?')} MiB of state; build {t.get('build_s', '?')} s after the "
               "sandboxer started), and each pod's VM restored from it (QEMU loads the saved state, "
               "the agent is reseeded and gets the clock). Ratios against the boot floor and runc "
               "of section 1–2, same run.")
        self.w()
        self.w("| | peapod | baseline | ratio |")
        self.w("| --- | --- | --- | --- |")
        sg = t.get("single", {})
        if sg:
            self.w(f"| `crictl runp`, no pool | {spread(sg)} | boot floor "
                   f"{fmt_ms(self.d.get('floor_ms'))} | {ratio(sg.get('ratio_to_floor'))} |")
            self.w(f"| … against a booted pod (`crictl runp`) | | "
                   f"{fmt_ms(self.d.get('cold_start', {}).get('containerd2', {}).get('median'))} | "
                   f"{ratio(sg.get('ratio_to_booted'))} |")
        b = t.get("burst")
        if b:
            self.w(f"| {b['pods']} `crictl runp` at once, the last ready | {fmt_ms(b['all_ready_ms'])} "
                   f"(each {spread(b['each_ms'])}; {b['restored']} restored) | one pod "
                   f"{fmt_ms(sg.get('median'))} | {ratio(b.get('ratio_to_single'))} |")
        if "pss_ratio" in t:
            self.w(f"| QEMU PSS per idle pod (3 pods, 10 s idle) | {t['pss_idle_template_mib']:.0f} MiB | "
                   f"booted {t['pss_idle_booted_mib']:.0f} MiB | {ratio(t['pss_ratio'])} |")
        if t.get("pss_idle_template_ksm_mib") and t.get("pss_idle_booted_mib"):
            k = t["pss_idle_template_ksm_mib"]
            self.w(f"| … the same pods after KSM merged the burst's ten (`ksm` option) | {k:.0f} MiB | "
                   f"booted {t['pss_idle_booted_mib']:.0f} MiB | "
                   f"{ratio(round(k / t['pss_idle_booted_mib'], 2))} |")
        w = t.get("warm_pool")
        if w:
            self.w(f"| warm pool made from the template (pool_size 1; {t.get('pool_vms_restored')} "
                   f"pool VMs restored) | {spread(w)} | runc `crictl runp` "
                   f"{fmt_ms(self.d.get('cold_start', {}).get('runc', {}).get('median'))} | "
                   f"{ratio(w.get('ratio_to_runc'))} |")
        for what, bd in (("a template start", sg.get("breakdown")),
                         ("a warm start from the template-made pool",
                          (w or {}).get("breakdown"))):
            if bd:
                self.w()
                self.w(f"Where {what}'s time goes (median ms): " + ", ".join(
                    f"{k} {v['median']:.0f}" for k, v in bd.items()
                    if isinstance(v, dict) and "median" in v) + ".")
        self.w()

    def ksm(self):
        k = self.d.get("ksm")
        if not k:
            return
        self.w("## 6b. Pool VMs sharing memory (KSM)")
        self.w()
        if "skipped" in k:
            self.w(f"Not measured: {k['skipped']}.")
            self.w()
            return
        self.w(k["what"] + ".")
        self.w()
        self.w("| | without KSM | with KSM |")
        self.w("| --- | --- | --- |")
        self.w(f"| QEMU PSS per pool VM, MiB | {spread(k['pss_before_mib'], '', 1)} | "
               f"{spread(k['pss_after_mib'], '', 1)} |")
        self.w(f"| … of which guest RAM, MiB | {spread(k['guest_ram_before_mib'], '', 1)} | "
               f"{spread(k['guest_ram_after_mib'], '', 1)} |")
        self.w()
        self.w(f"Saved **{k['saved_per_vm_mib']:.0f} MiB per VM** (ratio {ratio(k['ratio'])}); KSM "
               f"reported {k['pages_sharing_mib']:.0f} MiB of pages sharing {k['pages_shared_mib']:.0f} "
               f"MiB; two full scans took {k['two_scans_s']:.0f} s and {k['ksmd_cpu_s']:.1f} s of "
               f"ksmd CPU at this fast scan rate.")
        self.w()

    def flood(self):
        fl = self.d.get("flood")
        if not fl:
            return
        self.w("## 9. A hostile guest flooding its channel")
        self.w()
        if "skipped" in fl:
            self.w(f"Not measured: {fl['skipped']}.")
            self.w()
            return
        self.w(fl["what"] + ".")
        self.w()
        self.w("| | quiet | under the flood | ratio |")
        self.w("| --- | --- | --- | --- |")
        self.w(f"| sandboxer RSS, MiB | {spread(fl['rss_idle_mib'], '', 1)} | "
               f"{spread(fl['rss_flood_mib'], '', 1)} | {ratio(fl['rss_ratio'])} |")
        self.w(f"| neighbour Check, ms | {spread(fl['check_quiet_ms'], '', 2)} | "
               f"{spread(fl['check_flood_ms'], '', 2)} | {ratio(fl['latency_ratio'])} |")
        self.w()

    def density(self):
        den = self.d.get("density")
        if not den or not den["pods"]:
            return
        rows = den["pods"]
        self.w("## 7. Density")
        self.w()
        st = den["settled_after_10s"]
        self.w(f"{den['what']}. Stopped: {den['stopped_because']}. After the last pod and 10 s of "
               f"idling: our processes' PSS {st['our_pss_mib']:.0f} MiB "
               f"(**{st['our_pss_mib'] / den['max_pods']:.0f} MiB per pod**), MemAvailable "
               f"{st['mem_available_drop_mib']:.0f} MiB lower "
               f"({st['mem_available_drop_mib'] / den['max_pods']:.0f} MiB per pod). Removing all of them took "
               f"{fmt_ms(den['remove_all_ms'])}. MemAvailable also moves with whatever else runs on "
               f"the machine; the PSS column counts only this run's processes.")
        self.w()
        fresh = "fresh_memory_ms" in rows[0]
        if fresh:
            self.w(f"The host's own cost of a page fault moves with what the pods hold: faulting in "
                   f"32 MiB of new anonymous memory took {fmt_ms(den.get('fresh_memory_ms_before'))} "
                   f"before the first pod and {fmt_ms(rows[-1]['fresh_memory_ms'])} after the last "
                   f"(column *fault 32 MiB*). Where it climbs, the host is a VM whose own host backs "
                   f"memory only once touched (its free pages reported back through a balloon), and "
                   f"each later pod's guest RAM, TCG buffer and QEMU heap pay that price; a runc pod "
                   f"touches little memory and does not.")
            self.w()
        head = "| pods | start | ×first | sandboxer | boot to agent | MemAvailable drop MiB | our PSS MiB | load |"
        self.w(head + (" fault 32 MiB |" if fresh else ""))
        self.w("| --- " * (9 if fresh else 8) + "|")
        for r in rows:
            self.w(f"| {r['pods']} | {fmt_ms(r['start_ms'])} | {r['ratio_to_first']:.2f} | "
                   f"{fmt_ms(r.get('sandboxer_ms'))} | {fmt_ms(r.get('boot_to_agent_ms'))} | "
                   f"{r['mem_available_drop_mib']:.0f} | {r['our_pss_mib']:.0f} | {r['loadavg']:.1f} |"
                   + (f" {fmt_ms(r.get('fresh_memory_ms'))} |" if fresh else ""))
        self.w()
        if self.plt:
            plt = self.plt
            fig, ax = plt.subplots(figsize=(7, 3.6))
            n = [r["pods"] for r in rows]
            ax.plot(n, [r["start_ms"] / 1000 for r in rows], "o-", color="C0", label="start (s)")
            ax.set_xlabel("pods running")
            ax.set_ylabel("crictl runp, s", color="C0")
            ax2 = ax.twinx()
            ax2.plot(n, [r["mem_available_drop_mib"] / 1024 for r in rows], "s--", color="C3",
                     label="MemAvailable drop")
            ax2.plot(n, [r["our_pss_mib"] / 1024 for r in rows], "^:", color="C1", label="our PSS")
            ax2.set_ylabel("host memory, GiB", color="C3")
            ax.set_ylim(bottom=0)
            ax2.set_ylim(bottom=0)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax2.legend(fontsize=7, loc="upper left")
            ax.set_title("density: start latency and host memory as pods accumulate")
            self.png(fig, "density", "density")

    def callgrind(self):
        cg = self.d.get("callgrind")
        if not cg or "skipped" in cg:
            return
        sb, sh = cg["sandboxer"], cg["shim"]
        self.w("## 8. Instructions (callgrind)")
        self.w()
        self.w("Exact instruction counts (Ir), not times. A pod lifecycle: `runp`, create + start a "
               "container, `exec true`, stop + rm it, `stopp`, `rmp`. The sandboxer runs under "
               "callgrind from start to exit twice, with one and with two lifecycles; the difference is "
               "the cost of one more pod (it also holds what a longer run costs by the clock: timers, "
               "the 10 s orphan sweep). Every shim process runs under callgrind too.")
        self.w()
        self.w(f"* sandboxer, one more pod: **{sb['per_pod_ir']:,} Ir**; a whole run with one pod "
               f"(start, first pod, exit): {sb['one_pod_run_ir']:,} Ir")
        self.w(f"* shims of one container: **{sh['per_pod_ir']:,} Ir** in {len(sh['processes'])} "
               f"processes (" + ", ".join(f"`{p['action']}` {p['ir'] / 1e6:.1f} M" for p in sh["processes"])
               + f"); {sh['ld_so_ir']:,} Ir ({100 * sh['ld_so_ir'] / max(1, sh['per_pod_ir']):.0f} %) "
               "in the dynamic loader (ld.so relocations and symbol lookup)")
        self.w()
        for title, rows, total in (
                ("Sandboxer, one more pod: top functions by inclusive cost", sb.get("per_pod_top_inclusive", []), sb["per_pod_ir"]),
                ("Sandboxer, one more pod: top functions by self cost", sb.get("per_pod_top_self", []), sb["per_pod_ir"]),
                ("Sandboxer, a whole run with one pod: top functions by inclusive cost", sb.get("one_pod_run_top_inclusive", []), sb["one_pod_run_ir"]),
                ("Shim `serve` process: top functions by inclusive cost", sh.get("serve_top_inclusive", []), None)):
            top = top_rows(rows)
            if not top:
                continue
            self.w(f"{title} (thread and std::function trampolines hidden):")
            self.w()
            self.w("| Ir | % | function | object |")
            self.w("| --- | --- | --- | --- |")
            for r in top:
                self.w(f"| {r['ir']:,} | {r['pct']:.1f} | `{short_fn(r['fn'])}` | {r['obj']} |")
            self.w()
        self.w(f"Raw profiles: `{cg.get('profiles_dir')}/` (gzipped: `gunzip -k FILE.gz; "
               f"callgrind_annotate --inclusive=yes FILE`); `sandboxer-1.out` is the run with one "
               f"pod, `sandboxer-2.out` the run with two.")
        self.w()

    def biggest(self):
        """The largest costs, ranked from the data."""
        d = self.d
        bd = d.get("breakdown", {}).get("containerd2")
        if not bd:
            return
        self.w("## Biggest costs in this run")
        self.w()
        tot = bd["runp_total"]["median"]
        steps = sorted(((k, v["median"]) for k, v in bd.items()
                        if k not in ("sandboxer_total", "runp_total")), key=lambda x: -x[1])
        fl = d.get("floor_ms")
        self.w("Cold start (containerd 2.x), largest steps: " + "; ".join(
            f"{k.replace('_', ' ')} {v:.0f} ms ({100 * v / tot:.0f} %)" for k, v in steps[:4]) + ".")
        if fl and "boot_to_agent" in bd:
            gap = bd["boot_to_agent"]["median"] + bd.get("vm_define_start", {}).get("median", 0) - fl
            self.w(f"VM define+start + boot to agent (medians) are {abs(gap):.0f} ms "
                   f"{'above' if gap >= 0 else 'below'} the boot floor (differences under ~0.5 s "
                   "are within this machine's noise).")
        self.w()

    def build(self):
        self.header()
        self.summary()
        self.biggest()
        self.floor_and_cold()
        self.template()
        self.running()
        self.memory()
        self.ksm()
        self.density()
        self.callgrind()
        self.flood()
        return "\n".join(self.lines).rstrip() + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--out-dir")
    a = p.parse_args()
    with open(a.results) as f:
        d = json.load(f)
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.results))
    stem = os.path.basename(a.results)[: -len(".json")]
    md = Report(d, out_dir, stem).build()
    path = os.path.join(out_dir, stem + ".md")
    with open(path, "w") as f:
        f.write(md)
    print(path)


if __name__ == "__main__":
    main()
