// What the service manager is told about this vmm (sd_notify(3), through
// libsystemd). Without $NOTIFY_SOCKET (not run by systemd as Type=notify)
// every call is a no-op.
//
//   READY=1       the VM runs (booted, or restored after an update) and the
//                 control socket answers
//   MAINPID=PID   a transfer update moved the VM to a new process: the
//                 service is that process from now on (sent by the old one,
//                 the main pid systemd knows, before it exits)
//   STOPPING=1    the vmm is shutting down
#pragma once

#include <sys/types.h>

#include <string>

namespace vmm {

void notify_ready(const std::string& vm_name);
void notify_main_pid(pid_t successor);
void notify_stopping(const std::string& reason);

}  // namespace vmm
