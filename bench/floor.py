#!/usr/bin/python3
"""The raw boot floor: the pod VM's kernel + initrd + cmdline started directly with
qemu-system-x86_64 (no libvirt, no sandboxer), timed from exec to the agent's first answer to a
ttrpc Check on the virtio-serial channel.

The QEMU command line mirrors what libvirt builds from sandboxer/domain_xml.cc (q35, TCG or KVM,
qemu64 CPU, 1 vCPU, 512 MiB, no defaults, PCIe root ports, virtio-scsi with a sparse scratch
disk, virtio-serial with the agent port "io.peapod.agent.0" on a unix socket QEMU listens on,
9p share, virtio-net, ISA serial console to a file, seccomp sandbox), minus libvirt's -S/cont
handshake and its monitor: what is left is the cost of QEMU + guest kernel + agent.

  floor.py --image-dir DIR --work DIR [--repeat N] [--accel tcg|kvm] [--memory-mib 512]
           [--tb-size-mib N]

  [--poll eager|sandboxer]

Prints one JSON object: {"runs": [{"exec_to_socket_ms": .., "exec_to_agent_ms": .., and the
host-side arrival times of the agent's console lines: console_first_line_ms,
agent_modules_loaded_ms, agent_ready_ms, agent_host_connected_ms}, ..]}.
Each QEMU is killed (and waited for) before the next starts, and on any exit.
"""
import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

SERVICE = "peapod.agent.v1.Agent"
PORT_NAME = "io.peapod.agent.0"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def check_request(stream_id, timeout_ns=1_000_000_000):
    """One ttrpc request frame: Request{service, method "Check", payload empty, timeout_nano}."""
    body = (field_bytes(1, SERVICE.encode()) + field_bytes(2, b"Check") + field_bytes(3, b"") +
            varint(4 << 3 | 0) + varint(timeout_ns))
    # 10-byte header: uint32 length, uint32 stream id, uint8 type (1 = request), uint8 flags.
    return struct.pack(">IIBB", len(body), stream_id, 1, 0) + body


class Console:
    """Host-side arrival times of the guest's console lines (the kernel is quiet: the first line
    is the agent's), polled from QEMU's console file."""
    MARKS = (("console_first_line_ms", ""), ("agent_modules_loaded_ms", "agent: loaded"),
             ("agent_ready_ms", "agent: ready"), ("agent_host_connected_ms", "agent: host connected"))

    def __init__(self, path, t0):
        self.path, self.t0, self.pos, self.part, self.marks = path, t0, 0, b"", {}

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        self.pos += len(data)
        ms = round((time.monotonic() - self.t0) * 1000, 1)
        lines = (self.part + data).split(b"\n")
        self.part = lines.pop()
        for line in lines:
            text = line.decode(errors="replace")
            for key, pat in self.MARKS:
                if key not in self.marks and pat in text:
                    self.marks[key] = ms


def qemu_argv(a, work, sock):
    with open(os.path.join(a.image_dir, "cmdline")) as f:
        cmdline = f.read().strip()
    scratch = os.path.join(work, "scratch.img")
    with open(scratch, "wb") as f:
        f.truncate(10 << 30)  # sparse, like the sandboxer's (unformatted: the guest does not mount it at boot)
    share = os.path.join(work, "share")
    os.makedirs(share, exist_ok=True)
    dev = lambda d: ["-device", json.dumps(d)]
    argv = ["qemu-system-x86_64", "-name", "guest=peapod-floor,debug-threads=on",
            "-machine", "q35,usb=off,dump-guest-core=off",
            "-accel", a.accel + (f",tb-size={a.tb_size_mib}" if a.tb_size_mib and a.accel == "tcg" else ""),
            "-cpu", "host" if a.accel == "kvm" else "qemu64", "-m", str(a.memory_mib),
            "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
            "-display", "none", "-no-user-config", "-nodefaults", "-rtc", "base=utc",
            "-boot", "strict=on",
            "-kernel", os.path.join(a.image_dir, "vmlinux"),
            "-initrd", os.path.join(a.image_dir, "initrd.img"), "-append", cmdline]
    for i, port in enumerate(range(8, 13)):
        d = {"driver": "pcie-root-port", "port": port, "chassis": i + 1, "id": f"pci.{i + 1}",
             "bus": "pcie.0", "addr": f"0x1.0x{i}" if i else "0x1"}
        if i == 0:
            d["multifunction"] = True
        argv += dev(d)
    argv += dev({"driver": "virtio-scsi-pci", "id": "scsi0", "bus": "pci.3", "addr": "0x0"})
    argv += dev({"driver": "virtio-serial-pci", "id": "virtio-serial0", "bus": "pci.4",
                 "addr": "0x0"})
    argv += ["-blockdev", json.dumps({"driver": "file", "filename": scratch,
                                      "node-name": "s0", "cache": {"direct": False,
                                                                   "no-flush": True},
                                      "discard": "unmap"}),
             "-blockdev", json.dumps({"node-name": "f0", "driver": "raw", "file": "s0",
                                      "cache": {"direct": False, "no-flush": True}})]
    argv += dev({"driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": 0,
                 "drive": "f0", "id": "scsi0-0-0-0", "write-cache": "on"})
    argv += ["-fsdev", f"local,security_model=passthrough,id=fsdev-fs0,path={share}"]
    argv += dev({"driver": "virtio-9p-pci", "id": "fs0", "fsdev": "fsdev-fs0",
                 "mount_tag": "peapod-share", "bus": "pci.1", "addr": "0x0"})
    # The pod's NIC is a TAP; the guest's driver and probe are the same with any backend.
    argv += ["-netdev", "user,id=hostnet0,restrict=on"]
    argv += dev({"driver": "virtio-net-pci", "netdev": "hostnet0", "id": "net0",
                 "mac": "06:00:00:00:00:01", "bus": "pci.2", "addr": "0x0"})
    argv += ["-chardev", f"file,id=charserial0,path={os.path.join(work, 'console.log')}"]
    argv += dev({"driver": "isa-serial", "chardev": "charserial0", "id": "serial0", "index": 0})
    argv += ["-chardev", f"socket,id=charchannel0,path={sock},server=on,wait=off"]
    argv += dev({"driver": "virtserialport", "bus": "virtio-serial0.0", "nr": 1,
                 "chardev": "charchannel0", "id": "channel0", "name": PORT_NAME})
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return argv


def one_boot(a, n):
    work = os.path.join(a.work, f"floor-{n}")
    os.makedirs(work, exist_ok=True)
    sock = os.path.join(work, "agent.sock")
    argv = qemu_argv(a, work, sock)
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(os.path.join(work, "qemu.log"), "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = t0 + a.timeout
        s = None
        while time.monotonic() < deadline:
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited {qemu.returncode}: see {work}/qemu.log")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                break
            except OSError:
                s.close()
                s = None
                time.sleep(0.002)
        if s is None:
            raise RuntimeError("QEMU's agent socket never appeared")
        t_sock = time.monotonic()
        s.setblocking(False)
        console = Console(os.path.join(work, "console.log"), t0)
        stream = 1
        next_send = 0.0
        pending = None  # sandboxer mode: (stream, deadline) of the one Check in flight
        buf = b""
        t_agent = None
        while t_agent is None:
            now = time.monotonic()
            console.poll()
            if now >= deadline:
                raise RuntimeError(f"the agent did not answer within {a.timeout} s ({work}/console.log)")
            if a.poll == "sandboxer" and pending and now >= pending[1]:
                # pods.cc WaitForAgent: a Check that times out (1 s) is retried 200 ms later.
                pending = None
                next_send = now + 0.200
            if now >= next_send and (a.poll == "eager" or pending is None):
                try:
                    s.send(check_request(stream))
                except BlockingIOError:
                    pass  # QEMU is not reading yet: the socket buffer is full
                if a.poll == "sandboxer":
                    pending = (stream, now + 1.0)
                    next_send = float("inf")
                else:
                    next_send = now + 0.020
                stream += 2
            wake = min(next_send, deadline, pending[1] if pending else deadline, now + 0.005)
            r, _, _ = select.select([s], [], [], max(0.0, wake - time.monotonic()))
            if r:
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("QEMU closed the agent socket")
                buf += data
                while len(buf) >= 10:
                    length, sid, typ, _ = struct.unpack(">IIBB", buf[:10])
                    if len(buf) < 10 + length:
                        break
                    buf = buf[10 + length:]
                    # Eager: any answer counts. Sandboxer mode: only the Check still in flight
                    # (a late answer to one that timed out is dropped, as the ttrpc client does).
                    if typ == 2 and (a.poll == "eager" or (pending and sid == pending[0])):
                        t_agent = time.monotonic()
                        break
        console.poll()
        s.close()
        out = {"exec_to_socket_ms": round((t_sock - t0) * 1000, 1),
               "exec_to_agent_ms": round((t_agent - t0) * 1000, 1), "poll": a.poll}
        out.update(console.marks)
        return out
    finally:
        try:
            os.killpg(qemu.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        qemu.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--image-dir", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--accel", default="tcg")
    p.add_argument("--memory-mib", type=int, default=512)
    p.add_argument("--tb-size-mib", type=int, default=0,
                   help="TCG translation cache (-accel tcg,tb-size=N), as the sandboxer's "
                        "tcg_tb_cache_mib; 0: QEMU's default")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--poll", choices=("eager", "sandboxer"), default="eager",
                   help="eager: a Check every 20 ms, any answer counts; sandboxer: as pods.cc "
                        "WaitForAgent does, one Check with a 1 s timeout, retried 200 ms after a timeout")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    for n in range(a.repeat):
        runs.append(one_boot(a, n))
        print(f"floor: run {n + 1}/{a.repeat}: {runs[-1]['exec_to_agent_ms']} ms", file=sys.stderr)
    json.dump({"runs": runs}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
