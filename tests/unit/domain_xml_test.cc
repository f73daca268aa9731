// The pod VM's libvirt domain XML.
#include <gtest/gtest.h>

#include "sandboxer/domain_xml.h"

namespace peapod::sandboxer {
namespace {

VmSpec Good() {
  VmSpec s;
  s.name = "peapod-abc";
  s.kernel = "/img/vmlinux";
  s.initrd = "/img/initrd.img";
  s.cmdline = "console=ttyS0 quiet";
  s.vcpus = 2;
  s.memory_mib = 768;
  s.agent_socket = "/run/peapod/pods/abc/vm-agent.sock";
  s.console_log = "/run/peapod/pods/abc/console.log";
  s.share_dir = "/run/peapod/pods/abc/share";
  return s;
}

TEST(DomainXmlTest, DescribesTheGuest) {
  auto xml = DomainXml(Good());
  ASSERT_TRUE(xml.ok()) << xml.error().ToString();
  for (const char* want :
       {"<domain type=\"qemu\" xmlns:qemu=", "<name>peapod-abc</name>",
        "<memory unit=\"MiB\">768</memory>", "<vcpu>2</vcpu>", "machine=\"q35\"",
        "<kernel>/img/vmlinux</kernel>", "<initrd>/img/initrd.img</initrd>",
        "<cmdline>console=ttyS0 quiet</cmdline>", "path=\"/run/peapod/pods/abc/vm-agent.sock\"",
        "name=\"io.peapod.agent.0\"", "model=\"virtio-scsi\"", "<target dir=\"peapod-share\"/>",
        "<on_poweroff>destroy</on_poweroff>",
        "<memballoon model=\"virtio\" freePageReporting=\"on\"/>",
        // O_APPEND, so that the sandboxer can cut the log while QEMU writes it.
        "<source path=\"/run/peapod/pods/abc/console.log\" append=\"on\"/>",
        // libvirt reads the guest CPU back with 2 monitor commands, not ~400 (domain_xml.cc).
        "<qemu:capabilities>\n    <qemu:del capability=\"cpu-unavailable-features\"/>"}) {
    EXPECT_NE(xml->find(want), std::string::npos) << want << " missing in\n" << *xml;
  }
  auto kvm = Good();
  kvm.kvm = true;
  EXPECT_NE(DomainXml(kvm)->find("<domain type=\"kvm\" "), std::string::npos);
  EXPECT_NE(DomainXml(kvm)->find("cpu-unavailable-features"), std::string::npos);
  // The TCG translation cache is capped when asked, and only for TCG.
  EXPECT_EQ(xml->find("tb-cache"), std::string::npos);
  auto tcg = Good();
  tcg.tcg_tb_cache_mib = 64;
  EXPECT_NE(DomainXml(tcg)->find("<tb-cache unit=\"MiB\">64</tb-cache>"), std::string::npos)
      << *DomainXml(tcg);
  kvm.tcg_tb_cache_mib = 64;
  EXPECT_EQ(DomainXml(kvm)->find("tb-cache"), std::string::npos);
}

TEST(DomainXmlTest, AConfinedVmRunsAsItsUidAndGetsItsShareFromTheShareServer) {
  auto s = Good();
  s.uid = 2013265921;
  s.gid = 2013265920;
  s.share_socket = "/run/peapod/vm/peapod-abc/9p";
  auto xml = DomainXml(s);
  ASSERT_TRUE(xml.ok()) << xml.error().ToString();
  for (const char* want :
       {"xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\"",
        "<seclabel type=\"static\" model=\"dac\" relabel=\"yes\">",
        "<label>+2013265921:+2013265920</label>",
        "<qemu:arg value=\"proxy,id=fsdev-share,socket=/run/peapod/vm/peapod-abc/9p\"/>",
        "mount_tag=peapod-share"}) {
    EXPECT_NE(xml->find(want), std::string::npos) << want << " missing in\n" << *xml;
  }
  // QEMU itself exports nothing: it could not give files the guest's owners.
  EXPECT_EQ(xml->find("<filesystem"), std::string::npos) << *xml;
  // A comma in the socket path cannot add QEMU options.
  s.share_socket = "/run/x,readonly=off/9p";
  EXPECT_NE(DomainXml(s)->find("socket=/run/x,,readonly=off/9p"), std::string::npos);
  s.share_socket.clear();
  EXPECT_FALSE(DomainXml(s).ok()) << "a confined VM with a share but no share server";
  // Unconfined: no seclabel, QEMU's own 9p.
  auto root = DomainXml(Good());
  EXPECT_EQ(root->find("seclabel"), std::string::npos);
  EXPECT_NE(root->find("<filesystem"), std::string::npos);
}

// A VM restored from a template: QEMU starts waiting for the state (the backend sends it), with
// the same devices as any pod VM; a confined one keeps its share proxy in the same element.
TEST(DomainXmlTest, ARestoredVmWaitsForItsState) {
  auto s = Good();
  EXPECT_EQ(DomainXml(s)->find("-incoming"), std::string::npos);
  s.restore_from = "/var/lib/peapod/templates/k/state";
  auto xml = DomainXml(s);
  ASSERT_TRUE(xml.ok()) << xml.error().ToString();
  EXPECT_NE(xml->find("<qemu:arg value=\"-incoming\"/>\n    <qemu:arg value=\"defer\"/>"),
            std::string::npos)
      << *xml;
  EXPECT_EQ(xml->find(s.restore_from), std::string::npos) << "QEMU never gets the path";
  s.uid = 2013265921;
  s.share_socket = "/run/peapod/vm/peapod-abc/9p";
  xml = DomainXml(s);
  ASSERT_TRUE(xml.ok());
  EXPECT_EQ(xml->find("<qemu:commandline>"), xml->rfind("<qemu:commandline>")) << *xml;
  EXPECT_NE(xml->find("-incoming"), std::string::npos);
  EXPECT_NE(xml->find("virtio-9p-pci"), std::string::npos);
}

TEST(DomainXmlTest, EscapesWhatComesFromRequests) {
  auto s = Good();
  s.cmdline = "a</cmdline><devices><disk/>&\"";
  s.share_dir = "/x\"/><hostdev";
  auto xml = DomainXml(s);
  ASSERT_TRUE(xml.ok());
  EXPECT_EQ(xml->find("<disk/>"), std::string::npos) << *xml;
  EXPECT_EQ(xml->find("<hostdev"), std::string::npos) << *xml;
  EXPECT_NE(xml->find("&lt;/cmdline&gt;"), std::string::npos) << *xml;
}

TEST(DomainXmlTest, RefusesAnIncompleteSpec) {
  auto s = Good();
  s.kernel.clear();
  EXPECT_EQ(DomainXml(s).error().code(), Code::kInvalidArgument);
}

TEST(DomainXmlTest, DisksSitOnTheScsiControllerAtTheirUnit) {
  EXPECT_EQ(ScsiTargetName(0), "sda");
  EXPECT_EQ(ScsiTargetName(25), "sdz");
  EXPECT_EQ(ScsiTargetName(26), "sdaa");
  EXPECT_EQ(ScsiTargetName(27), "sdab");
  auto layer = DiskXml({"/var/lib/peapod/layers/0123.erofs", 3, true});
  ASSERT_TRUE(layer.ok()) << layer.error().ToString();
  for (const char* want :
       {"<source file=\"/var/lib/peapod/layers/0123.erofs\"/>",
        "<target dev=\"sdd\" bus=\"scsi\"/>", "unit=\"3\"", "target=\"0\"", "<readonly/>"}) {
    EXPECT_NE(layer->find(want), std::string::npos) << want << " missing in\n" << *layer;
  }
  auto scratch = DiskXml({"/s/scratch.img", 0, false});
  ASSERT_TRUE(scratch.ok());
  EXPECT_EQ(scratch->find("<readonly/>"), std::string::npos);
  EXPECT_NE(scratch->find("cache=\"unsafe\""), std::string::npos);
  EXPECT_FALSE(DiskXml({"relative.img", 1, true}).ok());
  auto spec = Good();
  spec.disks.push_back({"/s/scratch.img", 0, false});
  auto xml = DomainXml(spec);
  ASSERT_TRUE(xml.ok());
  EXPECT_NE(xml->find("<source file=\"/s/scratch.img\"/>"), std::string::npos) << *xml;
}

}  // namespace
}  // namespace peapod::sandboxer
