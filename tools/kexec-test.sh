#!/usr/bin/env bash
# The kexec lab: boots a real Live Update Orchestrator (LUO) kernel inside
# QEMU TCG (this machine's own kernel has no /dev/liveupdate and must never
# kexec), runs the vmm in it on nested KVM, and kexecs that guest kernel.
#
#   tools/kexec-test.sh [--scenarios LIST] [--timeout SEC] [--vmm-bin DIR]
#                       [--luo-test PATH] [--out DIR] [--kernel-only]
#                       [--kvm-luo-patches DIR]
#
# Run as root (apt-get, the kernel build cache). Safe to rerun: the kernel
# source package and the built bzImage are cached in $VMM_LAB_CACHE (default
# /var/cache/vmm-kexec-lab), outside the repository, so a fresh clone on the
# same machine reuses them; VMM_LAB_REFRESH=1 looks for a newer source
# package. docs/kexec-lab.md describes the lab.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
lab=$repo/tests/kexec
cache=${VMM_LAB_CACHE:-/var/cache/vmm-kexec-lab}
out=$repo/build/kexec-lab
vmm_bin=$repo/build/bin
# ctest's test binaries land in build/bin/ (the top-level CMakeLists sets the
# runtime output directory), luo_test among them.
luo_test=$repo/build/bin/luo_test
scenarios=boot,luo-conformance,vm-run,binary-updates,gmem-refused,cancel-unloads,kexec-memfd,tsc-rate,kexec-again,kexec-paused,restore-retry,kexec-gmem,host-update,host-update-cancel,host-update-retry,host-update-again,kexec-self
timeout_s=900
kernel_only=0
patch_dir=""

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --scenarios) scenarios=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --vmm-bin) vmm_bin=$(realpath "$2"); shift 2 ;;
    --luo-test) luo_test=$(realpath "$2"); shift 2 ;;
    --out) out=$(realpath -m "$2"); shift 2 ;;
    --kernel-only) kernel_only=1; shift ;;
    --kvm-luo-patches) patch_dir=$(realpath "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "kexec-test: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "kexec-test: run as root (apt-get and $cache need it)" >&2
  exit 2
fi

say() { echo "kexec-test: $*"; }
die() { echo "kexec-test: ERROR: $*" >&2; exit 1; }

# Wall-clock time per step, printed as it ends and again in the summary.
declare -a step_times=()
step_start=0
step_name=""
step() { step_name=$1; step_start=$(date +%s.%N); say "== $step_name"; }
step_done() {
  local secs
  secs=$(echo "$(date +%s.%N) - $step_start" | bc)
  secs=$(printf '%.1f' "$secs")
  say "== $step_name: ${secs} s${1:+ ($1)}"
  step_times+=("$(printf '%-28s %8s s  %s' "$step_name" "$secs" "${1:-}")")
}

# --- packages -----------------------------------------------------------------
# What the kernel build and the lab really use: flex, bison, bc, libelf-dev
# (objtool), libssl-dev (scripts/ host tools include openssl headers when any
# signing option is on; cheap to have), make and gcc; cpio and xz-utils to
# unpack the source package and pack the initramfs; busybox-static as the
# guest's whole userland; qemu-system-x86 to run it; kexec-tools for the
# kexec-self scenario, the lab's own kexec without the vmm (the vmm calls
# kexec_file_load(2) and reboot(2) itself). Not needed: dwarves (pahole is
# only used for DEBUG_INFO_BTF, which the fragment leaves off).
packages=(flex bison bc libelf-dev libssl-dev make gcc cpio xz-utils busybox-static qemu-system-x86 kexec-tools)
install_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing ${missing[*]}"
  # The machine's normal sources (bookworm), the system's own apt state.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- kernel source ------------------------------------------------------------
# The Debian mirror this machine already uses, read at run time from its apt
# sources (deb822 .sources or one-line .list), so no host name is written into
# the repository. The first "deb" URI that is not a security archive wins.
mirror_uri() {
  local f
  {
    [[ -f /etc/apt/sources.list ]] && list_uris /etc/apt/sources.list
    for f in /etc/apt/sources.list.d/*.list; do [[ -f $f ]] && list_uris "$f"; done
    for f in /etc/apt/sources.list.d/*.sources; do [[ -f $f ]] && deb822_uris "$f"; done
    true
  } | awk '$1 !~ /security/ && $2 !~ /security/ && $1 ~ /^https?:/ { print $1; exit }'
}
# One-line format: "deb [options] URI suite component...": prints "URI suite".
list_uris() {
  awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }; print $i, $(i + 1) }' "$1"
}
# deb822: stanzas separated by blank lines; prints "URI suites" per URI.
deb822_uris() {
  awk '
    function flush() {
      if (types ~ /(^| )deb( |$)/ && enabled != "no") { n = split(uris, u, " "); for (k = 1; k <= n; k++) print u[k], suites }
      types = uris = suites = enabled = ""
    }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
      if (key == "types") types = $0; else if (key == "uris") uris = $0
      else if (key == "suites") suites = $0; else if (key == "enabled") enabled = tolower($0) }
    END { flush() }
  ' "$1"
}

# apt-get through a private configuration in $cache/apt: the system's
# /etc/apt, its lists and its archive cache stay untouched.
apt_dir=$cache/apt
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
  -o Acquire::Languages=none -o APT::Get::List-Cleanup=false
  # The private cache is root-owned; apt would warn that _apt cannot write it.
  -o APT::Sandbox::User=root
)
write_sources() { # suites...
  local uri=$1 s; shift
  : >"$apt_dir/sources.list"
  for s in "$@"; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $s main" >>"$apt_dir/sources.list"
  done
}

# Prints "PACKAGE VERSION" of the first linux-source-7.x that has LUO.
source_candidate() {
  local pkg v
  for pkg in linux-source-7.2 linux-source-7.3 linux-source-7.4 linux-source-7.1; do
    v=$(apt-cache "${apt_opts[@]}" policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if [[ -n $v && $v != "(none)" ]]; then echo "$pkg $v"; return 0; fi
  done
  return 1
}

fetch_source() {
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$cache/src"
  local uri cand=""
  # Once a source package is cached the lab sticks to it, so reruns (CI) need
  # no network and never start a surprise rebuild when Debian publishes a new
  # 7.2.x. VMM_LAB_REFRESH=1 looks for a newer one.
  if [[ ${VMM_LAB_REFRESH:-0} != 1 && -s $cache/src/current ]] &&
    [[ -f $cache/src/$(awk '{print $3}' "$cache/src/current") ]]; then
    read -r src_pkg src_version src_deb <"$cache/src/current"
    say "source: $src_pkg $src_version (cached; VMM_LAB_REFRESH=1 looks for a newer one)"
    return 0
  fi
  uri=$(mirror_uri) || true
  [[ -n $uri ]] || die "no Debian mirror URI found in /etc/apt/sources.list{,.d}"
  say "mirror (from the machine's apt sources): $uri"
  # trixie-backports (with trixie) first; sid as the fallback.
  local suites
  for suites in "trixie-backports trixie" "sid"; do
    # shellcheck disable=SC2086
    write_sources "$uri" $suites
    if ! apt-get "${apt_opts[@]}" update -qq >"$cache/apt/update.log" 2>&1; then
      say "apt-get update for $suites failed: $(tail -2 "$cache/apt/update.log" | tr '\n' ' ')"
    fi
    cand=$(source_candidate) && break
  done
  [[ -n $cand ]] || die "no linux-source-7.x in trixie-backports, trixie or sid (see $cache/apt/update.log)"
  read -r src_pkg src_version <<<"$cand"
  src_deb=""
  local f
  for f in "$cache/src/${src_pkg}_${src_version//:/%3a}_"*.deb; do [[ -f $f ]] && src_deb=$(basename "$f"); done
  if [[ -z $src_deb ]]; then
    say "downloading $src_pkg $src_version"
    (cd "$cache/src" && apt-get "${apt_opts[@]}" download -qq "$src_pkg=$src_version") \
      || die "apt-get download $src_pkg=$src_version failed"
    for f in "$cache/src/${src_pkg}_"*.deb; do
      [[ $f == *"${src_version//:/%3a}"* ]] && src_deb=$(basename "$f")
    done
    [[ -n $src_deb ]] || die "downloaded package not found in $cache/src"
  fi
  echo "$src_pkg $src_version $src_deb" >"$cache/src/current"
  say "source: $src_pkg $src_version"
}

# --- kernel -------------------------------------------------------------------
fragment=$lab/kernel.config
patches=()
# Bump when build_kernel changes what it builds (not for messages): the key
# then changes and every cached kernel is rebuilt.
recipe_version=1
# The cache key: source version, the fragment's settings (its comments do not
# change the kernel), the patches, the recipe.
kernel_key() {
  {
    echo "$src_pkg $src_version recipe $recipe_version"
    grep -Ev '^[[:space:]]*$|^#( |$)' "$fragment" || true
    grep -E '^# CONFIG_[A-Z0-9_]+ is not set' "$fragment" || true
    if ((${#patches[@]})); then cat "${patches[@]}"; fi
  } | sha256sum | cut -c1-16
}

build_kernel() {
  local key dir work tarball
  key=$(kernel_key)
  dir=$cache/kernels/$src_pkg-$src_version-${patch_dir:+kvm-luo-}$key
  bzimage=$dir/bzImage
  if [[ -s $bzimage ]]; then
    kernel_note="cache hit $dir"
    return 0
  fi
  work=$cache/work/$key
  rm -rf "$work"
  mkdir -p "$work"
  say "unpacking $src_deb"
  dpkg-deb --fsys-tarfile "$cache/src/$src_deb" | tar -x -C "$work" --wildcards '*.tar.xz'
  tarball=$(find "$work" -name 'linux-source-*.tar.xz' | head -1)
  [[ -n $tarball ]] || die "no source tarball in $src_deb"
  tar -xJf "$tarball" -C "$work"
  rm -f "$tarball"
  local tree
  tree=$(find "$work" -maxdepth 1 -type d -name 'linux-source-*' | head -1)
  [[ -d $tree/kernel/liveupdate ]] || die "$src_pkg $src_version has no kernel/liveupdate/"
  if ((${#patches[@]})); then
    say "applying ${#patches[@]} patches from $patch_dir"
    local p
    for p in "${patches[@]}"; do
      # --forward and no fuzz: a patch that does not apply cleanly is a result.
      patch -d "$tree" -p1 --forward --fuzz=0 --quiet <"$p" >"$work/patch.log" 2>&1 \
        || { cat "$work/patch.log" >&2; die "patch $(basename "$p") does not apply to $src_pkg $src_version"; }
      say "  applied $(basename "$p")"
    done
  fi
  local frag=$work/fragment.config
  cp "$fragment" "$frag"
  if ((${#patches[@]})); then echo "CONFIG_LIVEUPDATE_GUEST_MEMFD=y" >>"$frag"; fi
  # niced: other engineers compile on the same cores; the kernel takes the idle time.
  (cd "$tree" && make -s tinyconfig >/dev/null &&
    scripts/kconfig/merge_config.sh -m -O . .config "$frag" >"$work/merge.log" 2>&1 &&
    make -s olddefconfig >/dev/null) || die "kernel configuration failed (see $work/merge.log)"
  # olddefconfig silently drops an option whose dependencies are not met.
  local dropped=() line opt
  while read -r line; do
    [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=y$ ]] || continue
    opt=${BASH_REMATCH[1]}
    grep -qx "$opt=y" "$tree/.config" || dropped+=("$opt")
  done <"$frag"
  ((${#dropped[@]} == 0)) || die "the kernel config dropped required options: ${dropped[*]} (unmet dependencies; see $tree/.config)"
  say "building bzImage (nice -n 19 make -j$(nproc); about 13 minutes on 2 cores)"
  if ! (cd "$tree" && nice -n 19 make -j"$(nproc)" bzImage >"$work/build.log" 2>&1); then
    tail -30 "$work/build.log" >&2
    die "kernel build failed (log: $work/build.log)"
  fi
  mkdir -p "$dir"
  cp "$tree/arch/x86/boot/bzImage" "$dir/bzImage.tmp"
  cp "$tree/.config" "$dir/config"
  mv "$dir/bzImage.tmp" "$bzimage"
  rm -rf "$work"
  kernel_note="built $dir"
}

# --- main ---------------------------------------------------------------------
if [[ -n $patch_dir ]]; then
  # The order the series' README gives: the LUO prerequisites stand-in, then
  # v3 1..9. local-10 only serves the series' selftest and is left out.
  patches=("$patch_dir"/local-00-*.patch)
  for i in 01 02 03 04 05 06 07 08 09; do patches+=("$patch_dir/v3-$i.patch"); done
  for p in "${patches[@]}"; do [[ -f $p ]] || die "missing patch $p"; done
fi

step packages
install_packages
step_done
mkdir -p "$cache"
# One fetch or kernel build at a time per cache (CI and a developer may share
# it): a second run waits here, then finds the kernel the first one built.
exec 9>"$cache/lock"
if ! flock -n 9; then
  say "waiting for another kexec-test.sh that holds $cache/lock"
  flock 9
fi
step fetch
fetch_source
step_done "$src_pkg $src_version"
step kernel
build_kernel
step_done "$kernel_note"
flock -u 9
say "kernel: $bzimage ($(stat -c %s "$bzimage") bytes)"
if ((kernel_only)); then exit 0; fi

# --- initramfs ----------------------------------------------------------------
# Two concatenated newc archives (the kernel unpacks both): the first holds
# busybox, the init, the vmm's binaries with every shared library they load,
# and the kernel image; the second adds /lab/initrd.cpio, a copy of the first,
# which is the initrd a kexec inside the guest boots with. So the kexec'd
# kernel comes up with the same init and binaries (minus that copy).
add_binary() { # src dest-in-root
  local root=$1 src=$2 dest=$3 lib
  mkdir -p "$root$(dirname "$dest")"
  # Debug info is most of a RelWithDebInfo binary; the guest has no debugger.
  objcopy --strip-debug "$src" "$root$dest" 2>/dev/null || cp "$src" "$root$dest"
  chmod 755 "$root$dest"
  # ldd lists the loader and each library by the path it resolves to.
  while read -r lib; do
    [[ -e $root$lib ]] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$src" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }')
}

pack_initramfs() {
  local root=$out/root bin
  rm -rf "$root" && mkdir -p "$root"/{bin,sbin,lab,dev,proc,sys,tmp,run,etc}
  cp /bin/busybox "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  # The kernel opens /dev/console for init before init can mount devtmpfs:
  # without the node, init's output (our results) goes nowhere.
  mknod -m 600 "$root/dev/console" c 5 1
  install -m 755 "$lab/init" "$root/init"
  install -m 644 "$lab/host-update.sh" "$root/lab/host-update.sh"
  for bin in vmm vmmctl; do
    [[ -x $vmm_bin/$bin ]] || die "$vmm_bin/$bin not found: build the vmm first (tools/build.sh) or pass --vmm-bin"
    add_binary "$root" "$vmm_bin/$bin" "/bin/$bin"
  done
  luo_note="luo_test: not found at $luo_test (luo-conformance reports NOT-RUN)"
  if [[ -x $luo_test ]]; then
    add_binary "$root" "$luo_test" /lab/luo_test
    # The cross-exec tests run the helper by the absolute path compiled into
    # luo_test (LUO_EXEC_HELPER): put it at that same path.
    local helper
    helper=$(strings "$luo_test" | grep -m1 '/luo_exec_helper$' || true)
    [[ -n $helper && -x $helper ]] && add_binary "$root" "$helper" "$helper"
    luo_note="luo_test: $luo_test${helper:+, helper $helper}"
  fi
  # The test build's vmm, for the scenario that injects a failure (cancel-unloads).
  [[ -x $vmm_bin/vmm-faults ]] && add_binary "$root" "$vmm_bin/vmm-faults" /lab/vmm-faults
  [[ -x /sbin/kexec ]] && add_binary "$root" /sbin/kexec /sbin/kexec
  cp "$bzimage" "$root/lab/bzImage"
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$out/initrd-1.cpio"
  local extra=$out/root2
  rm -rf "$extra" && mkdir -p "$extra/lab"
  cp "$out/initrd-1.cpio" "$extra/lab/initrd.cpio"
  (cd "$extra" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$out/initrd-2.cpio"
  cat "$out/initrd-1.cpio" "$out/initrd-2.cpio" >"$out/initrd.cpio"
  rm -rf "$root" "$extra" "$out/initrd-1.cpio" "$out/initrd-2.cpio"
  say "$luo_note"
}

# --- boot ---------------------------------------------------------------------
# Scenarios expected to fail on a kernel, with the reason (open bugs):
# "SCENARIO KERNEL MATCH REASON...", KERNEL being mainline, kvm-luo or any,
# MATCH an extended regex the failed result's values must contain (spaces
# are "_" there), so a different failure is not mistaken for the known one.
xfail_file=$lab/expected-failures
kernel_kind=mainline
[[ -n $patch_dir ]] && kernel_kind=kvm-luo
xfail_entry() { # scenario: prints "MATCH REASON..."
  [[ -f $xfail_file ]] || return 1
  awk -v s="$1" -v k="$kernel_kind" '
    /^[ \t]*(#|$)/ { next }
    $1 == s && ($2 == k || $2 == "any") { $1 = $2 = ""; sub(/^ +/, ""); print; found = 1; exit }
    END { exit !found }' "$xfail_file"
}

# Scenarios that only one kind of kernel can run: NOT-RUN on the other is
# the right result (kexec-gmem needs the KVM LUO series; gmem-refused checks
# the refusal on a kernel without it).
not_applicable() {
  case $kernel_kind:$1 in mainline:kexec-gmem|kvm-luo:gmem-refused) return 0 ;; esac
  return 1
}

# Runs QEMU under a timeout; every serial line gets the host's wall-clock
# time in front (for the boot and kexec times), into $out/serial.log.
boot_guest() {
  # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer
  # check misses its ticks, and a kexec'd kernel then panics ("IO-APIC +
  # timer doesn't work!") or crawls through its fallbacks. The kexec'd
  # kernel's command line is this one with lab.* replaced.
  local append="console=ttyS0 kho=on liveupdate=on panic=-1 loglevel=4 no_timer_check lab.kernel=$kernel_kind lab.stage=1 lab.scenarios=$scenarios"
  say "qemu: -append '$append' (timeout ${timeout_s} s, log $out/serial.log)"
  : >"$out/serial.log"
  local rc=0
  set +e
  # -d cpu_reset: QEMU logs a triple fault of the lab guest itself (and the
  # CPU state then) to qemu-debug.log; with -no-reboot it then exits 0.
  # thread=single (one host thread runs both vCPUs): with multi-threaded TCG
  # (QEMU 7.2, nested SVM) the lab guest triple-faulted in about half the
  # runs that start several VMs at once, and never with single (docs/kexec-lab.md).
  timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 -accel "tcg,thread=${VMM_LAB_TCG_THREAD:-single}" -cpu max -smp 2 -m 2G \
    -nographic -nodefaults -no-reboot -serial stdio -monitor none -d cpu_reset,guest_errors -D "$out/qemu-debug.log" \
    -kernel "$bzimage" -initrd "$out/initrd.cpio" -append "$append" </dev/null 2>"$out/qemu.stderr" |
    while IFS= read -r line; do
      line=${line%$'\r'}
      # A terminal reset the guest's console emits at boot can prefix the
      # first line: a lab line starts at its tag.
      case $line in
        LAB-*|LUO-TEST*) ;;
        *LAB-*) line="LAB-${line#*LAB-}" ;;
        *LUO-TEST*) line="LUO-TEST${line#*LUO-TEST}" ;;
      esac
      printf '%s %s\n' "$EPOCHREALTIME" "$line" >>"$out/serial.log"
      # Progress on the terminal: the lab's own lines and the kernel's alarms.
      case $line in
        LUO-TEST*) ;;
        *LAB-*|*"Kernel panic"*|*"Starting new kernel"*|*"Freeze failed"*) echo "  guest: $line" ;;
      esac
    done
  rc=${PIPESTATUS[0]}
  set -e
  qemu_rc=$rc
}

# The host's summary: one row per scenario, from the LAB-RESULT lines.
declare -A result_of=() values_of=()
summarize() {
  local failed=0 s status entry match reason note line t_begin t_end log=$out/serial.log
  # Host wall-clock per guest milestone.
  local t_qemu t_stage1 t_kexec
  t_qemu=$qemu_start
  t_stage1=$(awk '/LAB-STAGE 1 start/ { print $1; exit }' "$log")
  [[ -n $t_stage1 ]] && step_times+=("$(printf '%-28s %8.1f s  %s' "guest boot to init" "$(echo "$t_stage1 - $t_qemu" | bc)" "qemu start to LAB-STAGE 1")")
  # Each kexec that happened: from the live-update request to the next
  # stage's init (a request that failed has its half=before result between).
  local k t_next
  while read -r t_kexec k t_next; do
    step_times+=("$(printf '%-28s %8.1f s  %s' "kexec to init ($k)" "$(echo "$t_next - $t_kexec" | bc)" "kexec request to the next stage's init")")
  done < <(awk '
    $2 == "LAB-KEXEC" { t = $1; k = $3 }
    $2 == "LAB-RESULT" && $3 == k && / half=before / { k = "" }
    $2 == "LAB-STAGE" && $4 == "start" && k != "" { print t, k, $1; k = "" }' "$log")
  # Why a scenario may have no result: the guest was killed, panicked, or
  # stopped early.
  local why="qemu exit $qemu_rc" panic
  ((qemu_rc == 124 || qemu_rc == 137)) && why="QEMU killed after the --timeout of $timeout_s s"
  panic=$(grep -m1 -o 'Kernel panic.*' "$log" || true)
  [[ -n $panic ]] && why+="; guest: $panic"
  grep -q "Triple fault" "$out/qemu-debug.log" 2>/dev/null &&
    why+="; the lab guest's own CPU triple-faulted (QEMU TCG; CPU state in $out/qemu-debug.log)"
  # Each scenario: from its LAB-BEGIN to its last LAB-RESULT (host clock).
  for s in ${scenarios//,/ }; do
    t_begin=$(awk -v s="$s" '$2 == "LAB-BEGIN" && $3 == s { print $1; exit }' "$log")
    t_end=$(awk -v s="$s" '$2 == "LAB-RESULT" && $3 == s { t = $1 } END { print t }' "$log")
    if [[ -n $t_begin && -n $t_end ]]; then
      step_times+=("$(printf '%-28s %8.1f s' "scenario $s" "$(echo "$t_end - $t_begin" | bc)")")
    fi
    # The last result counts (stage 2's for a scenario that crosses a kexec).
    line=$(awk -v s="$s" '$2 == "LAB-RESULT" && $3 == s { l = $0 } END { print l }' "$log")
    if [[ -z $line ]]; then
      result_of[$s]=FAIL
      values_of[$s]="no result from the guest ($why; see $log)"
    else
      read -r _ _ _ status rest <<<"$line"
      result_of[$s]=$status
      values_of[$s]=$rest
    fi
  done
  echo
  echo "== kexec lab summary (kernel $src_pkg $src_version, $kernel_kind)"
  printf '%-16s %-8s %s\n' scenario result values
  for s in ${scenarios//,/ }; do
    status=${result_of[$s]}
    note=""
    if entry=$(xfail_entry "$s"); then
      read -r match reason <<<"$entry"
      if [[ $status == FAIL && ${values_of[$s]} =~ $match ]]; then
        status=XFAIL; note="expected to fail for now: $reason"
      elif [[ $status == FAIL ]]; then
        failed=1; note="listed as an expected failure, but not with /$match/: a different failure"
      elif [[ $status == PASS ]]; then
        status=XPASS; failed=1; note="passed but is listed in tests/kexec/expected-failures: remove it there"
      else
        failed=1
      fi
    elif [[ $status == NOT-RUN ]] && not_applicable "$s"; then
      note="not applicable on a $kernel_kind kernel"
    elif [[ $status != PASS ]]; then
      failed=1
    fi
    # Long values (error texts) are cut here: the exact text follows below
    # for a failure, and every line is in the serial log.
    line=${values_of[$s]}
    ((${#line} > 240)) && line="${line:0:240}..."
    printf '%-16s %-8s %s\n' "$s" "$status" "$line"
    if [[ -n $note ]]; then printf '%-16s %-8s %s\n' "" "" "$note"; fi
    # A failure's details as the guest printed them (exact error texts).
    if [[ $status != PASS ]]; then
      awk -v s="$s" '$2 == "LAB-INFO" && $3 == s { $1 = $2 = $3 = ""; sub(/^ +/, ""); print }' "$log" |
        while IFS= read -r line; do printf '%-16s %-8s | %s\n' "" "" "$line"; done
    fi
  done
  echo
  echo "== wall-clock time per step"
  printf '%s\n' "${step_times[@]}"
  echo "serial log: $log"
  return $failed
}

# A kexec scenario ends its stage when it works: the ones that kexec run
# after the others, in their own order (the host updates and their riders
# after the single-VM kexecs, kexec-self last).
kexecs() { [[ $1 == kexec-* || $1 == host-update* ]]; }
ordered=""
for s in ${scenarios//,/ }; do kexecs "$s" || ordered+=",$s"; done
for s in ${scenarios//,/ }; do kexecs "$s" && [[ $s != kexec-self ]] && ordered+=",$s"; done
for s in ${scenarios//,/ }; do [[ $s == kexec-self ]] && ordered+=",$s"; done
scenarios=${ordered#,}

mkdir -p "$out"
step initramfs
pack_initramfs
step_done "$(stat -c %s "$out/initrd.cpio") bytes"
step "qemu (boot + scenarios)"
qemu_start=$EPOCHREALTIME
boot_guest
step_done "qemu exit $qemu_rc"
summarize
