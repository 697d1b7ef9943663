# The kexec lab's host-update scenarios (busybox sh), sourced by /init: one
# host kernel upgrade under three VMs with `vmmctl host-update`, the LUO
# agent holding every session and restoring every VM after the kexec from
# its registry (docs/host-update.md).
#
#   host-update         three VMs (sizes and vCPUs differ; on the KVM LUO
#                       kernel one has guest_memfd RAM), one kexec, all back:
#                       0 mismatches, generation 1, host-report says 3
#   host-update-cancel  (rides on host-update, before its kexec) a vmm killed
#                       with SIGKILL once it prepared, and (mainline) a VM
#                       whose guest_memfd this kernel cannot preserve: each
#                       cancels the upgrade, the three VMs keep running,
#                       nothing stays loaded
#   host-update-retry   (rides on host-update, after its kexec) the agent's
#                       restore of one VM fails before it takes the VM's
#                       session (the folder of its control socket is not
#                       there yet): the session stays untouched in the
#                       kernel. Then a restore (test build) gives up after it
#                       took the session and rebuilt the VM: the agent keeps
#                       the session; the VM fd that restore retrieved is no
#                       other process's to use (KVM LUO kernel), so the last
#                       `vmm restore` builds a new VM around the same memfds.
#                       The VMs that came back run meanwhile, and hu2 comes
#                       back with its memory intact
#   host-update-again   a second upgrade from the restored vmms: generation 2

hu_dir=/run/vmm-hu
hu_agent_sock=/run/vmm/luo-agent.sock
hu_vms="hu0 hu1 hu2"
# hu2's control socket lives in a folder of its own, which each boot has to
# make again (linked into $hu_dir for the coordinator): the new kernel's
# agent starts hu2's restore before it exists, and that restore fails
# before it takes the session (host-update-retry).
hu2_sock_dir=/run/hu2-socket
hu_socket_of() { # name: the path the vmm serves
  if [ "$1" = hu2 ]; then echo "$hu2_sock_dir/hu2.sock"; else echo "$hu_dir/$1.sock"; fi
}
hu2_make_socket_dir() { mkdir -p "$hu2_sock_dir" "$hu_dir"; ln -sf "$hu2_sock_dir/hu2.sock" "$hu_dir/hu2.sock"; }

hu_spec() { # name: "backing memory vcpus"
  case $1 in
    hu0) echo "memfd 64M 2" ;;
    hu1) if [ "$(arg kernel mainline)" = mainline ]; then echo "memfd 32M 1"; else echo "guest_memfd 32M 1"; fi ;;
    hu2) echo "memfd 48M 1" ;;
    hu-victim) echo "memfd 16M 1" ;;
    hu-gmem) echo "guest_memfd 16M 1" ;;
  esac
}
hu_ctl() { # vm args...: vmmctl on that VM's socket
  vm=$1; shift
  timeout 100 /bin/vmmctl --timeout 90 -s "$hu_dir/$vm.sock" "$@"
}
agent_ctl() { timeout 100 /bin/vmmctl --timeout 90 -s "$hu_agent_sock" raw "$1"; }

hu_start_agent() { # extra args
  mkdir -p /run/vmm /tmp/hu
  rm -f "$hu_agent_sock"
  /bin/vmm agent --socket "$hu_agent_sock" --restore-log-dir /tmp/hu "$@" >/tmp/hu/agent.log 2>&1 &
  hu_agent_pid=$!
  i=0; while [ ! -S "$hu_agent_sock" ] && [ $i -lt 300 ] && kill -0 $hu_agent_pid 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
  [ -S "$hu_agent_sock" ]
}

hu_start_vm() { # name
  # shellcheck disable=SC2046 # three words
  set -- "$1" $(hu_spec "$1")
  mkdir -p "$hu_dir"
  [ "$1" = hu2 ] && hu2_make_socket_dir
  /bin/vmm run --name "$1" --memory-backing "$2" --memory "$3" --vcpus "$4" --cmdline "$lab_guest_cmdline" \
    --control-socket "$(hu_socket_of "$1")" --console "/tmp/hu/$1.console" >"/tmp/hu/$1.log" 2>&1 &
  eval "hu_pid_$(echo "$1" | tr -c 'a-z0-9\n' _)=$!"
  i=0; while [ ! -S "$hu_dir/$1.sock" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  [ -S "$hu_dir/$1.sock" ]
}

hu_heartbeat() { hu_ctl "$1" --json guest 2>/dev/null | json_num heartbeat; }
# Waits until the VM's guest beats and runs; "" on timeout.
hu_wait_running() { # name timeout_s
  t=$(now)
  while [ "$(elapsed "$t" | cut -d. -f1)" -lt "$2" ]; do
    g=$(hu_ctl "$1" --json guest 2>/dev/null)
    if [ "$(echo "$g" | json_str phase)" = running ]; then echo "$g" | json_num heartbeat; return 0; fi
    sleep 0.2
  done
  return 1
}
hu_mismatches() { hu_ctl "$1" --json verify 2>&1 | json_num mismatches; }
# How many of the three VMs beat on over two seconds.
hu_all_beating() {
  n=0
  for vm in $hu_vms; do
    a=$(hu_heartbeat "$vm"); sleep 0.7; b=$(hu_heartbeat "$vm")
    [ "${b:-0}" -gt "${a:-0}" ] 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

# One host-update expected to be cancelled; prints "rc reason".
hu_cancelled_update() {
  out=$(timeout 400 /bin/vmmctl host-update --kernel /lab/bzImage --dir "$hu_dir" --prepare-timeout 240 2>/tmp/hu/cancel.err)
  rc=$?
  echo "$rc $(echo "$out" | json_str status) $(echo "$out" | json_str reason | tr ' ' _)"
}

hu_cancel_checks() { # sets cancel_ok and cancel_values
  cancel_ok=yes; cancel_values=""
  # a. SIGKILL of a vmm that has prepared: the coordinator sees its
  # connection close and cancels the upgrade for everyone.
  hu_start_vm hu-victim || { cancel_ok=no; cancel_values="error=victim_did_not_start"; return; }
  hu_wait_running hu-victim 180 >/dev/null
  timeout 400 /bin/vmmctl host-update --kernel /lab/bzImage --dir "$hu_dir" --prepare-timeout 240 \
    >/tmp/hu/kill.out 2>/tmp/hu/kill.err &
  coordinator=$!
  t=$(now); waited=none
  while [ "$(elapsed "$t" | cut -d. -f1)" -lt 240 ]; do
    w=$(hu_ctl hu-victim --json update-status 2>/dev/null | json_str waiting)
    if [ "$w" = freeze ]; then waited=freeze; break; fi
    kill -0 $coordinator 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$hu_pid_hu_victim" 2>/dev/null
  wait $coordinator; krc=$?
  kstatus=$(json_str status </tmp/hu/kill.out)
  released=no; grep -q "released the session of 'hu-victim'" /tmp/hu/kill.err && released=yes
  beating=$(hu_all_beating)
  loaded=$(cat /sys/kernel/kexec_loaded)
  held=$(agent_ctl '{"execute":"list-sessions"}' | tr -d ' \n' | grep -o '"name":"hu[^"]*"' | cut -d'"' -f4 | tr '\n' , | sed 's/,$//')
  cancel_values="kill_victim_at=$waited kill_rc=$krc kill_status=${kstatus:-none} victim_session_released=$released kill_vms_beating=$beating/3 kill_kexec_loaded=$loaded sessions_held_after=${held:-none}"
  [ "$waited" = freeze ] && [ $krc = 1 ] && [ "$kstatus" = cancelled ] && [ $released = yes ] && [ "$beating" = 3 ] &&
    [ "$loaded" = 0 ] || { cancel_ok=no; info host-update-cancel "$(cat /tmp/hu/kill.err | tail -15)"; }
  rm -f "$hu_dir/hu-victim.sock"
  # b. A VM this kernel cannot carry (guest_memfd on mainline): refused in
  # its prepare, so the upgrade never loads a kernel.
  if [ "$(arg kernel mainline)" = mainline ]; then
    hu_start_vm hu-gmem && hu_wait_running hu-gmem 180 >/dev/null
    set -- $(hu_cancelled_update)
    grc=$1; gstatus=$2; greason=$3
    names_vm=no; echo "$greason" | grep -q "hu-gmem" && names_vm=yes
    beating=$(hu_all_beating)
    gmem_state=$(hu_ctl hu-gmem --json status | json_str status)
    kill "$hu_pid_hu_gmem" 2>/dev/null; wait "$hu_pid_hu_gmem" 2>/dev/null; rm -f "$hu_dir/hu-gmem.sock"
    loaded=$(cat /sys/kernel/kexec_loaded)
    cancel_values="$cancel_values gmem_rc=$grc gmem_status=${gstatus:-none} gmem_reason_names_the_vm=$names_vm gmem_vm=$gmem_state gmem_vms_beating=$beating/3 gmem_kexec_loaded=$loaded"
    [ "$grc" = 1 ] && [ "$gstatus" = cancelled ] && [ $names_vm = yes ] && [ "$beating" = 3 ] && [ "$loaded" = 0 ] &&
      [ "$gmem_state" = running ] || { cancel_ok=no; info host-update-cancel "$(cat /tmp/hu/cancel.err | tail -15)"; }
  fi
}

# First half: the VMs (new ones for host-update, the restored ones for
# host-update-again), then the upgrade. Returns only when it failed.
host_update_before() { # scenario rest-of-scenarios
  hu_name=$1; t0=$(now)
  fail_hu() {
    for vm in $hu_vms; do
      for log in /tmp/hu/$vm.log /tmp/hu/$vm.restore.log /tmp/hu/$vm.gave-up.log /tmp/hu/$vm.retry.log; do
        [ -s "$log" ] && info "$hu_name" "$log: $(tail -6 "$log" | one_line)"
      done
    done
    result "$hu_name" FAIL half=before "$@"
    hu_stop_all
    if [ "$hu_name" = host-update ]; then
      [ "$cancel_done" = yes ] || result host-update-cancel FAIL "reason=host-update_failed_before"
      result host-update-retry FAIL "reason=host-update_failed_before_its_kexec"
    fi
  }
  cancel_done=no
  if [ "$hu_name" = host-update ]; then
    [ -n "$vmm_pid" ] && { kill "$vmm_pid" 2>/dev/null; wait "$vmm_pid" 2>/dev/null; vmm_pid=""; }
    echo "LAB-INFO $hu_name starting the LUO agent"
    hu_start_agent || { fail_hu "$(kv error "vmm agent: $(tail -1 /tmp/hu/agent.log)")"; return; }
    # One after the other, each running before the next starts: under TCG
    # nested SVM, VMs created at once have crashed the lab guest itself.
    for vm in $hu_vms; do
      echo "LAB-INFO $hu_name starting $vm: $(hu_spec "$vm")"
      hu_start_vm "$vm" || { fail_hu "$(kv error "$vm: $(tail -1 /tmp/hu/$vm.log)")"; return; }
      hu_wait_running "$vm" 180 >/dev/null
    done
  fi
  carry=""
  for vm in $hu_vms; do
    hb=$(hu_wait_running "$vm" 180) || {
      info "$hu_name" "$vm: $(hu_ctl "$vm" --json guest 2>&1 | one_line); $(tail -5 /tmp/hu/$vm.log /tmp/hu/$vm.restore.log 2>/dev/null | one_line)"
      fail_hu "error=${vm}_no_heartbeat"; return
    }
    m=$(hu_mismatches "$vm")
    [ "$m" = 0 ] || { fail_hu "error=${vm}_verify_before:${m:-no_answer}"; return; }
    carry="$carry lab.carry.$vm=$(hu_heartbeat "$vm")"
  done
  if [ "$hu_name" = host-update ]; then
    hu_cancel_checks
    if [ $cancel_ok = yes ]; then result host-update-cancel PASS $cancel_values; else result host-update-cancel FAIL $cancel_values; fi
    cancel_done=yes
  fi
  echo "LAB-KEXEC $hu_name"
  initrd=$(next_initrd)
  out=$(timeout 600 /bin/vmmctl host-update --kernel /lab/bzImage --initrd "$initrd" --dir "$hu_dir" \
    --cmdline "$(kexec_cmdline "$hu_name" "$2" "$carry")" 2>/tmp/hu/update.err)
  rc=$?
  info "$hu_name" "$out"
  info "$hu_name" "$(tail -20 /tmp/hu/update.err)"
  fail_hu rc=$rc "$(kv error "$(echo "$out" | json_str reason)")" "vms_beating=$(hu_all_beating)/3" \
    "kexec_loaded=$(cat /sys/kernel/kexec_loaded)" "secs=$(elapsed "$t0")"
}

# Second half, in the new kernel: the agent restores every VM from its
# registry; hu2 only once its KVM device is there (host-update-retry, first
# upgrade only; the second makes it before the agent starts).
host_update_after() { # scenario
  hu_name=$1; t0=$(now)
  generation=1; [ "$hu_name" = host-update-again ] && generation=2
  mkdir -p "$hu_dir"
  # The second upgrade's agent restores hu2 too; the first's fails it once.
  if [ "$hu_name" = host-update-again ]; then hu2_make_socket_dir; else ln -sf "$hu2_sock_dir/hu2.sock" "$hu_dir/hu2.sock"; fi
  hu_start_agent --restore-vms || {
    result "$hu_name" FAIL half=after "$(kv error "vmm agent: $(tail -3 /tmp/hu/agent.log)")"
    [ "$hu_name" = host-update ] && result host-update-retry FAIL reason=no_agent
    return
  }
  retry_values=""; retry_ok=yes
  if [ "$hu_name" = host-update ]; then
    # hu2's restore, started by the agent, fails before it takes the
    # session: no folder for its control socket yet.
    t=$(now); state=""
    while [ "$(elapsed "$t" | cut -d. -f1)" -lt 180 ]; do
      r=$(agent_ctl '{"execute":"list-restores"}' | tr -d ' \n' | grep -o '{[^{}]*"name":"hu2"[^{}]*}' | head -1)
      state=$(echo "$r" | json_str state)
      [ -n "$state" ] && [ "$state" != running ] && break
      sleep 0.5
    done
    untouched=no; grep -q "session 'hu2' is untouched" /tmp/hu/hu2.restore.log 2>/dev/null && untouched=yes
    held_first=no; agent_ctl '{"execute":"list-sessions"}' | tr -d ' \n' | grep -q '"name":"hu2"' && held_first=yes
    hu2_make_socket_dir
    # A restore that gives up once it took the session and rebuilt the VM.
    if [ -x /lab/vmm-faults ]; then
      timeout 180 /lab/vmm-faults restore --session hu2 --luo-agent "$hu_agent_sock" --x-inject give-up-after-rebuild \
        --control-socket "$(hu_socket_of hu2)" --console /tmp/hu/hu2.console >/tmp/hu/hu2.gave-up.log 2>&1
      gave_up_rc=$?
    else
      gave_up_rc=none
    fi
    held=no; agent_ctl '{"execute":"list-sessions"}' | tr -d ' \n' | grep -q '"name":"hu2"' && held=yes
    /bin/vmm restore --session hu2 --luo-agent "$hu_agent_sock" \
      --control-socket "$(hu_socket_of hu2)" --console /tmp/hu/hu2.console >/tmp/hu/hu2.retry.log 2>&1 &
    retry_values="first_restore=${state:-unknown} session_untouched=$untouched agent_held_it_first=$held_first"
    retry_values="$retry_values gave_up_rc=$gave_up_rc agent_holds_the_session=$held"
    [ "$state" = exited ] && [ $untouched = yes ] && [ $held_first = no ] && [ "$gave_up_rc" = 1 ] &&
      [ $held = yes ] || retry_ok=no
  fi
  all_ok=yes; values=""; longest=0
  for vm in $hu_vms; do
    i=0; while [ ! -S "$hu_dir/$vm.sock" ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    hb=$(hu_wait_running "$vm" 180) || hb=""
    m=$(hu_mismatches "$vm")
    u=$(hu_ctl "$vm" --json update-status 2>&1 | one_line)
    gen=$(echo "$u" | json_num generation); st=$(echo "$u" | json_str status)
    blackout=$(echo "$u" | json_num blackout_us); gap=$(echo "$u" | json_num guest_gap_us)
    before=$(carried "$vm")
    continued=no; [ -n "$hb" ] && [ "$hb" -ge "${before:-1}" ] 2>/dev/null && continued=yes
    values="$values ${vm}_mismatches=${m:-none} ${vm}_generation=${gen:-none} ${vm}_blackout_us=${blackout:-none} ${vm}_guest_gap_us=${gap:-none} ${vm}_heartbeat_continued=$continued"
    [ "$m" = 0 ] && [ "$gen" = "$generation" ] && [ "$st" = completed ] && [ $continued = yes ] || {
      all_ok=no; info "$hu_name" "$vm: $u"; info "$hu_name" "$(tail -5 /tmp/hu/$vm.restore.log 2>/dev/null)"
    }
    if [ "$vm" = hu2 ] && [ "$hu_name" = host-update ]; then
      # The KVM LUO kernel preserved the VM fd, which the test build's
      # restore took: the retry builds a new VM (mainline always does).
      rebuilt=no; grep -q "building a new VM around the same memfds" /tmp/hu/hu2.retry.log 2>/dev/null && rebuilt=yes
      retry_values="$retry_values mismatches=${m:-none} generation=${gen:-none} new_vm=$rebuilt"
      [ "$(arg kernel mainline)" = mainline ] || [ $rebuilt = yes ] || retry_ok=no
      [ "$m" = 0 ] && [ "$gen" = 1 ] || retry_ok=no
      beating=$(hu_all_beating)
      retry_values="$retry_values vms_beating=$beating/3"
    fi
  done
  timeout 120 /bin/vmmctl host-report --dir "$hu_dir" >/tmp/hu/report.json; rrc=$?
  report=$(tr -d ' \n' </tmp/hu/report.json)
  restored=$(echo "$report" | json_num restored)
  longest=$(echo "$report" | grep -o '"longest_blackout":{[^}]*}' | json_num blackout_us)
  set -- $values report_rc=$rrc restored=${restored:-none} longest_blackout_us=${longest:-none} "secs=$(elapsed "$t0")"
  [ "$restored" = 3 ] && [ $rrc = 0 ] || all_ok=no
  if [ $all_ok = yes ]; then result "$hu_name" PASS half=after "$@"; else result "$hu_name" FAIL half=after "$@"; fi
  if [ "$hu_name" = host-update ]; then
    if [ $retry_ok = yes ]; then result host-update-retry PASS $retry_values; else
      info host-update-retry "$(tail -4 /tmp/hu/hu2.restore.log /tmp/hu/hu2.gave-up.log /tmp/hu/hu2.retry.log 2>/dev/null)"; result host-update-retry FAIL $retry_values; fi
  fi
  # The scenarios after these run without an agent and without these VMs.
  [ "$hu_name" = host-update-again ] || [ $all_ok = no ] && hu_stop_all
}

# Every host-update VM and the agent, stopped (after the last scenario, or
# a failure: nothing of these may weigh on the scenarios after them).
hu_stop_all() {
  for vm in $hu_vms hu-victim hu-gmem; do [ -S "$hu_dir/$vm.sock" ] && hu_ctl "$vm" quit >/dev/null 2>&1; done
  sleep 1
  [ -n "$hu_agent_pid" ] && { kill "$hu_agent_pid" 2>/dev/null; wait "$hu_agent_pid" 2>/dev/null; }
  pkill -f "vmm restore --session hu" 2>/dev/null
  rm -rf "$hu_dir" "$hu2_sock_dir" "$hu_agent_sock"
  hu_agent_pid=""
}
