#include "machine/pvh.h"

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include <fmt/format.h>

#include "base/unique_fd.h"

namespace vmm::pvh {
namespace {

// Reads a T at `offset` in `bytes`, or fails if it does not fit.
template <class T>
Result<T> read_at(std::span<const uint8_t> bytes, uint64_t offset, std::string_view origin,
                  std::string_view what) {
  if (offset > bytes.size() || bytes.size() - offset < sizeof(T))
    return fail(std::string(origin) + " is truncated: its " + std::string(what) +
                " lies beyond the end of the file");
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

// "a FIFO", "a directory", ...: what a non-regular file is, for errors.
std::string file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "a special file";
}

constexpr uint64_t align4(uint64_t v) { return (v + 3) & ~uint64_t{3}; }

// Looks for the Xen PHYS32_ENTRY note inside one note area.
std::optional<uint32_t> find_pvh_note(std::span<const uint8_t> notes) {
  uint64_t pos = 0;
  while (pos + sizeof(Elf64_Nhdr) <= notes.size()) {
    Elf64_Nhdr header;
    std::memcpy(&header, notes.data() + pos, sizeof header);
    const uint64_t name_at = pos + sizeof header;
    const uint64_t desc_at = name_at + align4(header.n_namesz);
    const uint64_t next = desc_at + align4(header.n_descsz);
    if (next > notes.size()) break;
    const bool is_xen = header.n_namesz == 4 && std::memcmp(notes.data() + name_at, "Xen", 4) == 0;
    if (is_xen && header.n_type == kXenElfnotePhys32Entry && header.n_descsz >= 4) {
      uint32_t entry;  // 4 bytes, or the low half of 8 on some kernels
      std::memcpy(&entry, notes.data() + desc_at, sizeof entry);
      return entry;
    }
    pos = next;
  }
  return std::nullopt;
}

}  // namespace

Result<std::vector<uint8_t>> read_file(const std::string& path) {
  // O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer;
  // only a regular file is read, and for one the flag changes nothing.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) return fail_errno("cannot open kernel '" + path + "'");
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat kernel '" + path + "'");
  if (!S_ISREG(st.st_mode))
    return fail("kernel '" + path + "' is " + file_type_name(st.st_mode) +
                ", not a regular file: give the path of a PVH ELF kernel file");
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0)
    return fail_errno("cannot clear O_NONBLOCK on kernel '" + path + "'");
  constexpr off_t kMaxKernel = 512LL << 20;
  if (st.st_size > kMaxKernel) return fail("kernel '" + path + "' is larger than 512 MiB");
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("cannot read kernel '" + path + "'");
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

Result<Image> parse(std::span<const uint8_t> elf, std::string_view origin) {
  const std::string name(origin);
  if (elf.size() < EI_NIDENT || std::memcmp(elf.data(), ELFMAG, SELFMAG) != 0)
    return fail(name + " is not an ELF file; vmm boots PVH ELF kernels (a Linux vmlinux built "
                       "with CONFIG_PVH=y, or the embedded test guest)");
  if (elf[EI_CLASS] != ELFCLASS64 || elf[EI_DATA] != ELFDATA2LSB)
    return fail(name + " is not a little-endian 64-bit ELF");
  VMM_TRY_ASSIGN(header, read_at<Elf64_Ehdr>(elf, 0, name, "ELF header"));
  if (header.e_machine != EM_X86_64) return fail(name + " is not an x86-64 ELF");
  if (header.e_phentsize != sizeof(Elf64_Phdr) || header.e_phnum == 0)
    return fail(name + " has no usable program headers");

  Image image;
  std::optional<uint32_t> entry;
  for (unsigned i = 0; i < header.e_phnum; ++i) {
    VMM_TRY_ASSIGN(ph, read_at<Elf64_Phdr>(elf, header.e_phoff + uint64_t{i} * sizeof(Elf64_Phdr),
                                           name, "program header"));
    if (ph.p_offset > elf.size() || elf.size() - ph.p_offset < ph.p_filesz)
      return fail(name + " is truncated: segment " + std::to_string(i) +
                  " lies beyond the end of the file");
    if (ph.p_type == PT_NOTE && !entry) {
      entry = find_pvh_note(elf.subspan(ph.p_offset, ph.p_filesz));
    } else if (ph.p_type == PT_LOAD && ph.p_memsz > 0) {
      if (ph.p_filesz > ph.p_memsz)
        return fail(name + ": segment " + std::to_string(i) + " has more file bytes than memory");
      image.segments.push_back({ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz});
    }
  }
  if (!entry)
    return fail(name + " is not a PVH kernel: it has no XEN_ELFNOTE_PHYS32_ENTRY note "
                       "(build Linux with CONFIG_PVH=y)");
  if (image.segments.empty()) return fail(name + " has no loadable segment");
  image.entry = *entry;
  const bool entry_loaded = std::ranges::any_of(image.segments, [&](const Segment& s) {
    return image.entry >= s.gpa && image.entry < s.gpa + s.memory_size;
  });
  if (!entry_loaded)
    return fail(name + ": the PVH entry point is outside every loadable segment");
  return image;
}

std::vector<HvmMemmapEntry> memory_map(const memory::MemoryLayout& layout) {
  std::vector<HvmMemmapEntry> map;
  for (const auto& region : layout.regions) {
    if (region.role == memory::RegionRole::shared) {
      map.push_back({region.gpa, region.size, kE820Reserved, 0});
      continue;
    }
    if (region.gpa == 0 && region.size > kKernelLoadFloor) {
      // Keep the legacy hole below 1 MiB out of the RAM the guest may use,
      // as firmware does.
      map.push_back({0, kLowMemoryEnd, kE820Ram, 0});
      map.push_back({kLowMemoryEnd, kKernelLoadFloor - kLowMemoryEnd, kE820Reserved, 0});
      map.push_back({kKernelLoadFloor, region.size - kKernelLoadFloor, kE820Ram, 0});
    } else {
      map.push_back({region.gpa, region.size, kE820Ram, 0});
    }
  }
  std::ranges::sort(map, {}, &HvmMemmapEntry::addr);
  return map;
}

Result<uint32_t> load(const memory::GuestMemory& memory, std::span<const uint8_t> elf,
                      const Image& image, std::string_view cmdline) {
  for (const auto& segment : image.segments) {
    auto target = memory.translate(segment.gpa, segment.memory_size);
    if (!target)
      return fail("a kernel segment at GPA 0x" + fmt::format("{:x}", segment.gpa) + " (" +
                  std::to_string(segment.memory_size) +
                  " bytes) does not fit in guest RAM; give the VM more --memory");
    std::memcpy(target->data(), elf.data() + segment.file_offset, segment.file_size);
    std::memset(target->data() + segment.file_size, 0, segment.memory_size - segment.file_size);
  }

  if (cmdline.size() + 1 > kCmdlineMax)
    return fail("--cmdline is " + std::to_string(cmdline.size()) + " bytes; the limit is " +
                std::to_string(kCmdlineMax - 1));
  std::vector<uint8_t> cmdline_bytes(cmdline.begin(), cmdline.end());
  cmdline_bytes.push_back(0);
  VMM_TRY(memory.write(kCmdlineGpa, cmdline_bytes));

  const auto map = memory_map(memory.layout());
  if (map.size() > kMaxMemmapEntries) return fail("the guest memory map has too many entries");
  VMM_TRY(memory.write(kMemmapGpa, std::span(reinterpret_cast<const uint8_t*>(map.data()),
                                              map.size() * sizeof(HvmMemmapEntry))));

  HvmStartInfo info{};
  info.magic = kStartInfoMagic;
  info.version = 1;
  info.cmdline_paddr = kCmdlineGpa;
  info.memmap_paddr = kMemmapGpa;
  info.memmap_entries = static_cast<uint32_t>(map.size());
  VMM_TRY(memory.write(kStartInfoGpa, std::span(reinterpret_cast<const uint8_t*>(&info), sizeof info)));
  return image.entry;
}

}  // namespace vmm::pvh
