#include "common/discovery.h"

#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(DiscoveryTest, OrdinalFromHostname) {
  EXPECT_EQ(*OrdinalFromHostname("tessera-server-0"), 0);
  EXPECT_EQ(*OrdinalFromHostname("tessera-server-12"), 12);
  EXPECT_EQ(*OrdinalFromHostname("tessera-server-3.tessera-server.ns.svc"), 3);
  for (const char* bad : {"tessera", "tessera-server-", "node-x", "-", ""}) {
    auto r = OrdinalFromHostname(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("does not end in -N"), std::string::npos);
  }
}

TEST(DiscoveryTest, IndexFromEnvValue) {
  EXPECT_EQ(*IndexFromEnvValue("JOB_COMPLETION_INDEX", "4"), 4);
  auto unset = IndexFromEnvValue("JOB_COMPLETION_INDEX", nullptr);
  ASSERT_FALSE(unset.ok());
  EXPECT_NE(unset.status().message().find("JOB_COMPLETION_INDEX is not set"), std::string::npos);
  EXPECT_FALSE(IndexFromEnvValue("X", "-1").ok());
  EXPECT_FALSE(IndexFromEnvValue("X", "two").ok());
}

TEST(DiscoveryTest, ExpandServerPattern) {
  auto a = ExpandServerPattern("tessera-server-{i}.tessera-server:7070", 3);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, (std::vector<std::string>{"tessera-server-0.tessera-server:7070",
                                          "tessera-server-1.tessera-server:7070",
                                          "tessera-server-2.tessera-server:7070"}));
  EXPECT_FALSE(ExpandServerPattern("tessera-server:7070", 2).ok());
  EXPECT_FALSE(ExpandServerPattern("tessera-server-{i}", 2).ok());
}

}  // namespace
}  // namespace tessera
