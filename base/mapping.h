// A move-only mmap'd range, unmapped on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

class Mapping {
 public:
  Mapping() = default;
  // mmap(MAP_SHARED, PROT_READ|PROT_WRITE) of `size` bytes of `fd` at `offset`.
  [[nodiscard]] static Result<Mapping> map_shared(FdRef fd, size_t size, off_t offset = 0);

  Mapping(Mapping&& other) noexcept;
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  [[nodiscard]] uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  [[nodiscard]] size_t size() const { return size_; }
  [[nodiscard]] std::span<uint8_t> bytes() const { return {data(), size_}; }
  [[nodiscard]] bool valid() const { return addr_ != nullptr; }
  // Fills this process's page tables for the whole mapping, writable, with
  // the pages the file already has (MADV_POPULATE_WRITE, Linux 5.14). Reads
  // and writes nothing: a later first touch, by us or by KVM on the guest's
  // behalf, then finds the page table entry instead of faulting. On a kernel
  // without madvise(2) each page is read once instead (read-only entries).
  [[nodiscard]] Result<void> populate_page_tables() const { return populate_page_tables(0, size_); }
  // The same for [offset, offset + length), page-aligned.
  [[nodiscard]] Result<void> populate_page_tables(size_t offset, size_t length) const;

 private:
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace vmm
