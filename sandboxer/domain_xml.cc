#include "sandboxer/domain_xml.h"

#include <libxml/xmlwriter.h>

#include <memory>
#include <vector>

namespace peapod::sandboxer {

namespace {

// A thin RAII layer over libxml2's xmlTextWriter: it escapes text and attributes, so names and
// paths from requests cannot change the document's structure.
class Writer {
 public:
  Writer() : buf_(xmlBufferCreate()), w_(xmlNewTextWriterMemory(buf_, 0)) {
    xmlTextWriterSetIndent(w_, 1);
    xmlTextWriterSetIndentString(w_, BAD_CAST "  ");
  }
  ~Writer() {
    if (w_) xmlFreeTextWriter(w_);
    if (buf_) xmlBufferFree(buf_);
  }
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  Writer& Open(const char* name) {
    ok_ &= xmlTextWriterStartElement(w_, BAD_CAST name) >= 0;
    return *this;
  }
  Writer& Attr(const char* name, const std::string& value) {
    ok_ &= xmlTextWriterWriteAttribute(w_, BAD_CAST name, BAD_CAST value.c_str()) >= 0;
    return *this;
  }
  Writer& Text(const std::string& text) {
    ok_ &= xmlTextWriterWriteString(w_, BAD_CAST text.c_str()) >= 0;
    return *this;
  }
  Writer& Close() {
    ok_ &= xmlTextWriterEndElement(w_) >= 0;
    return *this;
  }
  // <name attrs...>text</name>
  Writer& Element(const char* name, const std::string& text) {
    return Open(name).Text(text).Close();
  }

  Result<std::string> Finish() {
    ok_ &= xmlTextWriterEndDocument(w_) >= 0;
    xmlFreeTextWriter(w_);
    w_ = nullptr;
    if (!ok_) return Error::Internal("building domain XML failed");
    return std::string(reinterpret_cast<const char*>(xmlBufferContent(buf_)));
  }

 private:
  xmlBufferPtr buf_;
  xmlTextWriterPtr w_;
  bool ok_ = true;
};

void WriteDisk(Writer& w, const DiskSpec& d) {
  w.Open("disk").Attr("type", "file").Attr("device", "disk");
  // The scratch disk dies with its pod: flushing it to the host disk buys nothing.
  w.Open("driver").Attr("name", "qemu").Attr("type", "raw");
  if (!d.readonly) w.Attr("cache", "unsafe").Attr("discard", "unmap");
  w.Close();
  w.Open("source").Attr("file", d.path).Close();
  w.Open("target").Attr("dev", ScsiTargetName(d.unit)).Attr("bus", "scsi").Close();
  // virtio-scsi: libvirt's target is the SCSI id, its unit the LUN; the agent looks for "0:<unit>".
  w.Open("address")
      .Attr("type", "drive")
      .Attr("controller", "0")
      .Attr("bus", "0")
      .Attr("target", "0")
      .Attr("unit", std::to_string(d.unit))
      .Close();
  if (d.readonly) w.Open("readonly").Close();
  w.Close();
}

Result<void> CheckDisk(const DiskSpec& d) {
  if (d.path.empty() || d.path[0] != '/') {
    return Error::Invalid("disk image path '{}' must be absolute", d.path);
  }
  // virtio-scsi LUNs go to 16383; libvirt's SCSI units for one target stop well before.
  if (d.unit > 16383) return Error::Invalid("disk unit {} is out of range", d.unit);
  return Ok();
}

}  // namespace

std::string ScsiTargetName(unsigned unit) {
  std::string suffix;
  for (unsigned n = unit + 1; n > 0; n = (n - 1) / 26)
    suffix.insert(suffix.begin(), char('a' + (n - 1) % 26));
  return "sd" + suffix;
}

Result<std::string> DiskXml(const DiskSpec& disk) {
  PP_TRY(CheckDisk(disk));
  Writer w;
  WriteDisk(w, disk);
  return w.Finish();
}

namespace {

// <os>, the power events and <features>: direct kernel boot on q35.
void WriteBoot(Writer& w, const VmSpec& s) {
  w.Open("os");
  w.Open("type").Attr("arch", "x86_64").Attr("machine", "q35").Text("hvm").Close();
  w.Element("kernel", s.kernel);
  w.Element("initrd", s.initrd);
  w.Element("cmdline", s.cmdline);
  w.Close();
  // Guest power-off ends the domain; so does a crash: the sandboxer decides what happens next.
  w.Element("on_poweroff", "destroy");
  w.Element("on_reboot", "destroy");
  w.Element("on_crash", "destroy");
  w.Open("features").Open("acpi").Close();
  if (!s.kvm && s.tcg_tb_cache_mib) {
    w.Open("tcg").Open("tb-cache").Attr("unit", "MiB");
    w.Text(std::to_string(s.tcg_tb_cache_mib)).Close().Close();
  }
  w.Close();
  if (s.kvm) {
    w.Open("cpu").Attr("mode", "host-passthrough").Close();
  }
}

// <devices>: console, agent channel, SCSI with the disks, NIC, and the share when QEMU serves
// it itself.
Result<void> WriteDevices(Writer& w, const VmSpec& s, bool proxy) {
  w.Open("devices");
  if (!s.emulator.empty()) w.Element("emulator", s.emulator);
  // Nothing by default that the pod does not need: no USB, graphics or sound. The balloon is
  // there only for free page reporting: the guest tells QEMU which pages it freed, and QEMU
  // gives them back to the host (a container that once used 400 MiB does not keep them
  // resident for the pod's life). Nothing inflates it; the guest can only report its own
  // pages, which QEMU then drops from its own memory.
  w.Open("controller").Attr("type", "usb").Attr("model", "none").Close();
  w.Open("memballoon").Attr("model", "virtio").Attr("freePageReporting", "on").Close();
  // append='on': libvirt opens the file O_APPEND for QEMU, so the sandboxer can cut it while
  // QEMU writes (console_log.h) and a restarted VM does not wipe what its last boot said.
  w.Open("serial").Attr("type", "file");
  w.Open("source").Attr("path", s.console_log).Attr("append", "on").Close();
  w.Open("target").Attr("port", "0").Close();
  w.Close();
  w.Open("channel").Attr("type", "unix");
  w.Open("source").Attr("mode", "bind").Attr("path", s.agent_socket).Close();
  w.Open("target").Attr("type", "virtio").Attr("name", "io.peapod.agent.0").Close();
  w.Close();
  // Hot-added layer and scratch disks go here.
  w.Open("controller").Attr("type", "scsi").Attr("index", "0").Attr("model", "virtio-scsi").Close();
  for (const auto& d : s.disks) {
    PP_TRY(CheckDisk(d));
    WriteDisk(w, d);
  }
  if (!s.tap.empty()) {
    w.Open("interface").Attr("type", "ethernet");
    if (!s.mac.empty()) w.Open("mac").Attr("address", s.mac).Close();
    w.Open("target").Attr("dev", s.tap).Attr("managed", "no").Close();
    w.Open("model").Attr("type", "virtio").Close();
    w.Close();
  }
  if (!s.share_dir.empty() && !proxy) {
    w.Open("filesystem").Attr("type", "mount").Attr("accessmode", "passthrough");
    w.Open("driver").Attr("type", "path").Close();
    w.Open("source").Attr("dir", s.share_dir).Close();
    w.Open("target").Attr("dir", "peapod-share").Close();
    w.Close();
  }
  w.Close();  // devices
  return Ok();
}

// Arguments libvirt has no element for go through its QEMU namespace, in one element:
// * the 9p proxy backend of a confined VM's share. The device sits at a fixed slot of the root
//   bus that libvirt's own address assignment (root ports from slot 1 up) does not reach; QEMU
//   option values double commas.
// * "-incoming defer" for a VM restored from a template: QEMU waits, vCPUs stopped, for the
//   backend's migrate-incoming (libvirt's own restore cannot start many VMs from one file).
bool NeedsQemuArgs(const VmSpec& s, bool proxy) { return proxy || !s.restore_from.empty(); }

void WriteQemuArgs(Writer& w, const VmSpec& s, bool proxy) {
  std::vector<std::string> args;
  if (proxy) {
    std::string sock;
    for (char c : s.share_socket) sock += c == ',' ? std::string(",,") : std::string(1, c);
    args.insert(args.end(), {"-fsdev", "proxy,id=fsdev-share,socket=" + sock, "-device",
                             "virtio-9p-pci,fsdev=fsdev-share,mount_tag=peapod-share,bus=pcie.0,"
                             "addr=0x1d"});
  }
  if (!s.restore_from.empty()) args.insert(args.end(), {"-incoming", "defer"});
  w.Open("qemu:commandline");
  for (const std::string& arg : args) w.Open("qemu:arg").Attr("value", arg).Close();
  w.Close();
}

}  // namespace

Result<std::string> DomainXml(const VmSpec& s) {
  if (s.name.empty() || s.kernel.empty() || s.initrd.empty() || s.agent_socket.empty()) {
    return Error::Invalid("VM spec needs a name, kernel, initrd and agent socket");
  }
  bool proxy = !s.share_dir.empty() && s.uid != 0;
  if (proxy && s.share_socket.empty()) {
    return Error::Invalid("VM {}: a confined VM's share needs the 9p server's socket", s.name);
  }
  Writer w;
  w.Open("domain").Attr("type", s.kvm ? "kvm" : "qemu");
  w.Attr("xmlns:qemu", "http://libvirt.org/schemas/domain/qemu/1.0");
  w.Element("name", s.name);
  w.Open("memory").Attr("unit", "MiB").Text(std::to_string(s.memory_mib)).Close();
  w.Element("vcpu", std::to_string(s.vcpus));
  WriteBoot(w, s);
  PP_TRY(WriteDevices(w, s, proxy));
  if (s.uid != 0) {
    // QEMU runs as this uid/gid with no capabilities. relabel: libvirt gives it its own
    // runtime files (monitor socket, domain dir); dynamic ownership is off in qemu.conf, so it
    // never chowns disks, kernel or initrd: the sandboxer owns those decisions.
    w.Open("seclabel").Attr("type", "static").Attr("model", "dac").Attr("relabel", "yes");
    w.Element("label", fmt::format("+{}:+{}", s.uid, s.gid));
    w.Close();
  }
  if (NeedsQemuArgs(s, proxy)) WriteQemuArgs(w, s, proxy);
  // libvirt 9.0 reads the guest CPU back after every start. Where QEMU reports
  // "unavailable-features" it does that with one qom-get per CPU property: about 400 monitor
  // commands, which QEMU's monitor reads one byte per read(2). That was 0.4 s of each start
  // (half of a restore from the template) and 0.3 s of QEMU's CPU. Without the capability
  // libvirt asks for two properties (feature-words, filtered-features); it checks nothing
  // else with it when the domain names no CPU model, as ours never does.
  w.Open("qemu:capabilities");
  w.Open("qemu:del").Attr("capability", "cpu-unavailable-features").Close();
  w.Close();
  w.Close();  // domain
  return w.Finish();
}

}  // namespace peapod::sandboxer
