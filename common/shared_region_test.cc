#include "common/shared_region.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/tensor_codec.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;
using tessera::v1::PushRequest;

constexpr uint64_t kMax = 1 << 20;

// Whether this machine has a usable /dev/shm (containers may not); the
// tests below are skipped, not passed, without one.
bool SharedMemoryUsable() { return SharedRegion::Create(4096, 4096).ok(); }

std::unique_ptr<SharedRegion> MustCreate(uint64_t request, uint64_t reply) {
  absl::StatusOr<std::unique_ptr<SharedRegion>> r = SharedRegion::Create(request, reply);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : nullptr;
}

TEST(SharedRegionTest, BothSidesSeeTheSameBytes) {
  if (!SharedMemoryUsable()) GTEST_SKIP() << "no usable /dev/shm here";
  std::unique_ptr<SharedRegion> mine = MustCreate(5000, 100);
  ASSERT_NE(mine, nullptr);
  EXPECT_EQ(mine->request_area().size(), 8192u);  // rounded up to 4 KiB
  EXPECT_EQ(mine->reply_area().size(), 4096u);
  EXPECT_EQ(mine->size(), SharedRegion::kHeaderBytes + 8192 + 4096);
  absl::StatusOr<std::unique_ptr<SharedRegion>> theirs =
      SharedRegion::Open(mine->name(), mine->size(), mine->nonce(), kMax);
  ASSERT_TRUE(theirs.ok()) << theirs.status();
  std::memcpy(mine->request_area().data(), "gradient", 8);
  EXPECT_EQ(std::string((*theirs)->request_area().data(), 8), "gradient");
  std::memcpy((*theirs)->reply_area().data() + 4000, "params", 6);
  EXPECT_EQ(std::string(mine->reply_area().data() + 4000, 6), "params");

  // Once unlinked the name is gone but both mappings keep working.
  mine->Unlink();
  EXPECT_TRUE(absl::IsNotFound(
      SharedRegion::Open(mine->name(), mine->size(), mine->nonce(), kMax).status()));
  std::memcpy(mine->request_area().data(), "again", 5);
  EXPECT_EQ(std::string((*theirs)->request_area().data(), 5), "again");
}

TEST(SharedRegionTest, OpenRefusesWhatDoesNotMatchTheHello) {
  if (!SharedMemoryUsable()) GTEST_SKIP() << "no usable /dev/shm here";
  std::unique_ptr<SharedRegion> mine = MustCreate(4096, 4096);
  ASSERT_NE(mine, nullptr);
  const std::string name = mine->name();
  const uint64_t size = mine->size();
  const std::string nonce(mine->nonce());
  std::string wrong_nonce = nonce;
  wrong_nonce[0] ^= 1;

  struct Case {
    std::string name;
    uint64_t size;
    std::string nonce;
    uint64_t max;
    std::string why;
  } cases[] = {
      {"/etc/passwd", size, nonce, kMax, "is not /tessera-"},
      {"/tessera-../x", size, nonce, kMax, "is not /tessera-"},
      {"/tessera-", size, nonce, kMax, "is not /tessera-"},
      {name, size, "short", kMax, "nonce has 5 bytes"},
      {name, size, wrong_nonce, kMax, "header does not match"},
      {name, size + 4096, nonce, kMax, "not a regular object of"},
      {name, size, nonce, size - 1, "is outside"},
      {name, 100, nonce, kMax, "is outside"},
      {"/tessera-0-00000000deadbeef", size, nonce, kMax, "no shared-memory object"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<SharedRegion>> r =
        SharedRegion::Open(c.name, c.size, c.nonce, c.max);
    ASSERT_FALSE(r.ok()) << c.name << " " << c.size;
    EXPECT_THAT(r.status().message(), HasSubstr(c.why)) << c.name << " " << c.size;
  }
  // The right Hello still opens it: the refusals changed nothing.
  EXPECT_TRUE(SharedRegion::Open(name, size, nonce, kMax).ok());
}

PushRequest ThreeBlocks() {
  PushRequest push;
  for (int i = 0; i < 3; ++i) {
    tessera::v1::TensorBlock* b = push.add_blocks();
    b->set_block_id(i);
    b->set_data(std::string(3000 + i, static_cast<char>('a' + i)));
  }
  return push;
}

TEST(SharedRegionTest, OffloadMovesPayloadsOutAndRestorePutsThemBack) {
  if (!SharedMemoryUsable()) GTEST_SKIP() << "no usable /dev/shm here";
  std::unique_ptr<SharedRegion> mine = MustCreate(8192, 4096);
  ASSERT_NE(mine, nullptr);
  PushRequest push = ThreeBlocks();
  const PushRequest original = push;
  std::vector<std::string> parked;
  OffloadBlocks(push.mutable_blocks(), mine->request_area(), &parked);
  // Two blocks fit in 8 KiB; the third stays inline.
  EXPECT_EQ(push.blocks(0).data(), "");
  EXPECT_EQ(push.blocks(0).shm_size(), 3000u);
  EXPECT_EQ(push.blocks(1).data(), "");
  EXPECT_EQ(push.blocks(1).shm_offset() % 64, 0u);
  EXPECT_EQ(push.blocks(2).shm_size(), 0u);
  EXPECT_EQ(push.blocks(2).data(), original.blocks(2).data());
  EXPECT_LT(push.ByteSizeLong(), 3100u);  // what the stream carries

  // The receiving side reads the same bytes.
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<absl::string_view> p = BlockPayload(push.blocks(i), mine->request_area());
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(*p, original.blocks(i).data()) << i;
  }
  PushRequest received = push;
  ASSERT_TRUE(MaterializeBlocks(received.mutable_blocks(), mine->request_area()).ok());
  EXPECT_EQ(received.SerializeAsString(), original.SerializeAsString());

  RestoreBlocks(push.mutable_blocks(), &parked);
  EXPECT_EQ(push.SerializeAsString(), original.SerializeAsString());
}

// A sender that wrote some payloads into the area itself (as workers do for
// dense gradients) and left others inline: offloading must not overwrite
// the first, and restoring must leave their ranges alone.
TEST(SharedRegionTest, OffloadKeepsRangesTheSenderWroteItself) {
  if (!SharedMemoryUsable()) GTEST_SKIP() << "no usable /dev/shm here";
  std::unique_ptr<SharedRegion> mine = MustCreate(16384, 4096);
  ASSERT_NE(mine, nullptr);
  PushRequest push = ThreeBlocks();
  const PushRequest original = push;
  std::memcpy(mine->request_area().data() + 128, original.blocks(1).data().data(), 3001);
  push.mutable_blocks(1)->clear_data();
  push.mutable_blocks(1)->set_shm_offset(128);
  push.mutable_blocks(1)->set_shm_size(3001);
  std::vector<std::string> parked;
  OffloadBlocks(push.mutable_blocks(), mine->request_area(), &parked);
  EXPECT_GE(push.blocks(0).shm_offset(), 128u + 3001u);
  EXPECT_GE(push.blocks(2).shm_offset(), push.blocks(0).shm_offset() + 3000u);
  EXPECT_EQ(push.blocks(1).shm_offset(), 128u);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<absl::string_view> p = BlockPayload(push.blocks(i), mine->request_area());
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(*p, original.blocks(i).data()) << i;
  }
  RestoreBlocks(push.mutable_blocks(), &parked);
  EXPECT_EQ(push.blocks(0).data(), original.blocks(0).data());
  EXPECT_EQ(push.blocks(0).shm_size(), 0u);
  EXPECT_EQ(push.blocks(1).shm_offset(), 128u);
  EXPECT_EQ(push.blocks(1).shm_size(), 3001u);
  EXPECT_TRUE(push.blocks(1).data().empty());
}

TEST(SharedRegionTest, BadRangesAreRefusedAndChangeNothing) {
  if (!SharedMemoryUsable()) GTEST_SKIP() << "no usable /dev/shm here";
  std::unique_ptr<SharedRegion> mine = MustCreate(4096, 4096);
  ASSERT_NE(mine, nullptr);
  const absl::Span<const char> area = mine->request_area();
  PushRequest push;
  tessera::v1::TensorBlock* ok = push.add_blocks();
  ok->set_block_id(1);
  ok->set_shm_offset(0);
  ok->set_shm_size(16);
  tessera::v1::TensorBlock* bad = push.add_blocks();
  bad->set_block_id(7);

  struct Case {
    uint64_t offset, size;
    std::string data;
    std::string why;
  } cases[] = {
      {4096, 1, "", "leaves the 4096-byte area"},
      {4000, 200, "", "leaves the 4096-byte area"},
      {~uint64_t{0} - 2, 8, "", "leaves the 4096-byte area"},
      {0, 8, "inline", "both inline data and a shared-memory range"},
      {64, 0, "", "offset but no size"},
  };
  for (const Case& c : cases) {
    bad->set_shm_offset(c.offset);
    bad->set_shm_size(c.size);
    bad->set_data(c.data);
    const PushRequest before = push;
    const absl::Status s = MaterializeBlocks(push.mutable_blocks(), area);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_THAT(s.message(), HasSubstr("block 7")) << c.why;
    EXPECT_THAT(s.message(), HasSubstr(c.why));
    EXPECT_EQ(push.SerializeAsString(), before.SerializeAsString()) << c.why;
  }
  // No region on the stream: any shared-memory reference is refused.
  bad->Clear();
  bad->set_block_id(7);
  const absl::Status none = MaterializeBlocks(push.mutable_blocks(), {});
  EXPECT_THAT(none.message(), HasSubstr("this stream has none"));
}

// The streaming-store path writes the same bytes as EncodeTo, whatever the
// alignment and length (tails shorter than one 32-byte store included).
TEST(SharedRegionTest, EncodeToSharedWritesWhatEncodeToWrites) {
  std::vector<float> values(1000);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.37f * static_cast<float>(i) - 91.0f;
  alignas(64) static char out[8192];
  alignas(64) static char want[8192];
  for (tessera::v1::DType dtype : {tessera::v1::F32, tessera::v1::BF16}) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{1000}}) {
      for (size_t offset : {size_t{0}, size_t{4}, size_t{32}}) {
        const size_t bytes = n * DTypeSize(dtype);
        std::memset(out, 0x5a, sizeof(out));
        std::memset(want, 0x5a, sizeof(want));
        const absl::Span<const float> v(values.data(), n);
        EncodeToShared(dtype, v, absl::Span<char>(out + offset, bytes));
        EncodeTo(dtype, v, absl::Span<char>(want + offset, bytes));
        EXPECT_EQ(std::memcmp(out, want, sizeof(out)), 0)
            << tessera::v1::DType_Name(dtype) << " n=" << n << " offset=" << offset;
      }
    }
  }
}

TEST(SharedRegionTest, LocalAddressesAndPeers) {
  for (const char* a : {"127.0.0.1:7070", "localhost:7070", "[::1]:7070", "unix:/tmp/s.sock",
                        "ipv4:127.0.0.1:1", "dns:///localhost:7070"}) {
    EXPECT_TRUE(IsLocalTarget(a)) << a;
  }
  for (const char* a : {"10.0.0.1:7070", "tessera-server-0.tessera:7070", "128.0.0.1:1",
                        "169.254.1.1:7070"}) {
    EXPECT_FALSE(IsLocalTarget(a)) << a;
  }
  for (const char* p : {"ipv4:127.0.0.1:51234", "ipv6:[::1]:5000", "unix:/tmp/x"}) {
    EXPECT_TRUE(IsLocalPeer(p)) << p;
  }
  for (const char* p : {"ipv4:169.254.79.3:4000", "ipv6:[fe80::1]:1", "ipv4:10.1.1.1:1"}) {
    EXPECT_FALSE(IsLocalPeer(p)) << p;
  }
}

}  // namespace
}  // namespace tessera
