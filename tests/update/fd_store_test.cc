// The fd store backend (update/fd_store.h) against recorded sd_notify calls:
// what goes to systemd, in which order, and what is refused before anything
// is sent.
#include "update/fd_store.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace vmm {
namespace {

// What the fake systemd saw, and how it answers.
struct Sent {
  std::string state;
  unsigned fds = 0;
};
std::vector<Sent> sent;
int fail_on_message = -1;  // the index of the message that fails (-EPIPE)
int barrier_answer = 0;

int record_notify(const char* state, const int*, unsigned n) {
  const int index = static_cast<int>(sent.size());
  sent.push_back({state, n});
  return index == fail_on_message ? -EPIPE : 1;
}
int record_barrier(uint64_t) { return barrier_answer; }

class FdStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sent.clear();
    fail_on_message = -1;
    barrier_answer = 0;
  }
  static UniqueFd memfd() { return UniqueFd(::memfd_create("fd-store-test", MFD_CLOEXEC)); }
  FdStoreCalls calls{record_notify, record_barrier};
  FdStoreEnvironment service{true, 4};
};

TEST_F(FdStoreTest, NamesRoundTripAndOddNamesAreNotSessions) {
  EXPECT_EQ(*fd_store_name("web", 16), "vmm.web.16");
  auto parsed = parse_fd_store_name("vmm.a.b.3");
  ASSERT_TRUE(parsed);
  EXPECT_EQ(parsed->session, "a.b");
  EXPECT_EQ(parsed->token, 3u);
  for (const char* odd : {"web.16", "vmm.web", "vmm..16", "vmm.web.", "vmm.web.x", "vmm.web.-1",
                          "vmm.web.99999999999999999999"})
    EXPECT_FALSE(parse_fd_store_name(odd)) << odd;
  EXPECT_FALSE(fd_store_name("a:b", 1)) << "':' cannot be in an fd name";
  EXPECT_FALSE(fd_store_name("a b", 1));
}

TEST_F(FdStoreTest, AServiceWithoutAStoreIsToldWhichSettingIsMissing) {
  FdStoreBackend no_socket(FdStoreEnvironment{false, 4}, calls);
  auto refused = no_socket.create_session("web");
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("$NOTIFY_SOCKET"), std::string::npos) << refused.error().message;
  FdStoreBackend no_store(FdStoreEnvironment{true, 0}, calls);
  refused = no_store.create_session("web");
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("FileDescriptorStoreMax="), std::string::npos) << refused.error().message;
  EXPECT_TRUE(sent.empty());
}

TEST_F(FdStoreTest, OnlyMemfdsAreTakenAndOnlyAsManyAsTheStoreHolds) {
  FdStoreBackend backend(service, calls);
  auto session = backend.create_session("web");
  ASSERT_TRUE(session) << session.error().describe();
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  auto refused = (*session)->preserve(event.ref(), 1);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, ENOENT);
  EXPECT_NE(refused.error().message.find("only memfds"), std::string::npos) << refused.error().message;
  std::vector<UniqueFd> files;
  for (uint64_t token = 0; token < 4; ++token) {
    files.push_back(memfd());
    ASSERT_TRUE((*session)->preserve(files.back().ref(), token));
  }
  EXPECT_EQ((*session)->preserve(files.front().ref(), 0).error().code, EEXIST);
  files.push_back(memfd());
  auto full = (*session)->preserve(files.back().ref(), 9);
  ASSERT_FALSE(full);
  EXPECT_EQ(full.error().code, ENOSPC);
  EXPECT_NE(full.error().message.find("at most 4"), std::string::npos) << full.error().message;
  EXPECT_TRUE(sent.empty()) << "nothing reaches systemd before the store";
}

TEST_F(FdStoreTest, StoreClearsTheNamesThenStoresEachFileAndWaitsForSystemd) {
  FdStoreBackend backend(service, calls);
  auto session = backend.create_session("web");
  ASSERT_TRUE(session);
  UniqueFd ram = memfd(), state = memfd();
  ASSERT_TRUE((*session)->preserve(ram.ref(), 16));
  ASSERT_TRUE((*session)->preserve(state.ref(), 2));
  auto* stored = dynamic_cast<FdStoreSession*>(session->get());
  ASSERT_NE(stored, nullptr);
  ASSERT_TRUE(stored->store(1000));
  ASSERT_EQ(sent.size(), 4u);
  EXPECT_EQ(sent[0].state, "FDSTOREREMOVE=1\nFDNAME=vmm.web.2");
  EXPECT_EQ(sent[1].state, "FDSTOREREMOVE=1\nFDNAME=vmm.web.16");
  EXPECT_EQ(sent[2].state, "FDSTORE=1\nFDNAME=vmm.web.2");
  EXPECT_EQ(sent[2].fds, 1u);
  EXPECT_EQ(sent[3].state, "FDSTORE=1\nFDNAME=vmm.web.16");

  barrier_answer = -ETIMEDOUT;
  auto unconfirmed = stored->store(1000);
  ASSERT_FALSE(unconfirmed);
  EXPECT_EQ(unconfirmed.error().code, ETIMEDOUT);
}

TEST_F(FdStoreTest, AFailedStoreTakesBackWhatItStored) {
  FdStoreBackend backend(service, calls);
  auto session = backend.create_session("web");
  ASSERT_TRUE(session);
  UniqueFd a = memfd(), b = memfd();
  ASSERT_TRUE((*session)->preserve(a.ref(), 2));
  ASSERT_TRUE((*session)->preserve(b.ref(), 3));
  fail_on_message = 3;  // the second FDSTORE
  auto failed = dynamic_cast<FdStoreSession*>(session->get())->store(1000);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, EPIPE);
  ASSERT_EQ(sent.size(), 5u);
  EXPECT_EQ(sent[4].state, "FDSTOREREMOVE=1\nFDNAME=vmm.web.2") << "the first file is taken back out";
}

TEST_F(FdStoreTest, TheFilesSystemdPassedAreASessionThatFinishesByLeavingTheStore) {
  std::vector<std::pair<std::string, UniqueFd>> passed;
  passed.emplace_back("vmm.web.16", memfd());
  passed.emplace_back("vmm.web.2", memfd());
  passed.emplace_back("something-else", memfd());
  passed.emplace_back("vmm.db.16", memfd());
  FdStoreBackend backend(service, calls, std::move(passed));
  EXPECT_TRUE(backend.has_session("web"));
  EXPECT_TRUE(backend.has_session("db"));
  EXPECT_FALSE(backend.has_session("something-else"));
  EXPECT_EQ(backend.retrieve_session("nope").error().code, ENOENT);
  auto session = backend.retrieve_session("web");
  ASSERT_TRUE(session);
  EXPECT_TRUE((*session)->incoming());
  EXPECT_TRUE((*session)->retrieve(16));
  EXPECT_TRUE((*session)->retrieve(16)) << "a token can be retrieved again";
  EXPECT_EQ((*session)->retrieve(3).error().code, ENOENT);
  EXPECT_FALSE(backend.has_session("web")) << "retrieved once";
  ASSERT_TRUE((*session)->finish());
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[0].state, "FDSTOREREMOVE=1\nFDNAME=vmm.web.2");
  EXPECT_EQ(sent[1].state, "FDSTOREREMOVE=1\nFDNAME=vmm.web.16");
  ASSERT_TRUE((*session)->finish());
  EXPECT_EQ(sent.size(), 2u) << "finish is idempotent";
}

}  // namespace
}  // namespace vmm
