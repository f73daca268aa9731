// The libvirt domain XML of a pod VM, written with libxml2's writer (never by string pasting).
#pragma once

#include <string>

#include "common/base/result.h"
#include "sandboxer/vm_backend.h"

namespace peapod::sandboxer {

// q35, direct kernel boot, serial console to a file, the virtio-serial agent channel on a unix
// socket QEMU listens on, a virtio-scsi controller for hot-added disks, the pod's 9p share.
Result<std::string> DomainXml(const VmSpec& spec);

// The <disk> element of one SCSI disk, for hot-attach and detach (and inside DomainXml).
Result<std::string> DiskXml(const DiskSpec& disk);

// "sda", "sdb", ... "sdz", "sdaa": the libvirt target name of the disk at a unit.
std::string ScsiTargetName(unsigned unit);

}  // namespace peapod::sandboxer
