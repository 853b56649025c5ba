// TLS, mutual TLS and tokens with the real binaries on 127.0.0.1. Keys and
// certificates are made by openssl for each run.

#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "common/credentials.h"
#include "common/job_spec.h"
#include "gtest/gtest.h"
#include "proto/tessera.grpc.pb.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::ServerProcess;
using testing_util::SourceDir;
using testing_util::WriteFile;

constexpr char kToken[] = "worker-secret-4f1c2a";
constexpr char kAdminToken[] = "admin-secret-9b7e33";

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(NewTempDir("security"));
    const std::string d = *dir_;
    // A CA, a server certificate for 127.0.0.1/localhost, a client
    // certificate, and a second CA that signed nothing we trust.
    const std::string script = absl::StrCat(
        "set -e; cd ", d, "\n",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=tessera-ca "
        "-keyout ca.key -out ca.pem 2>/dev/null\n",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca "
        "-keyout other.key -out other.pem 2>/dev/null\n",
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext\n",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key "
        "-out server.csr 2>/dev/null\n",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile san.ext -out server.pem 2>/dev/null\n",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=worker -keyout client.key "
        "-out client.csr 2>/dev/null\n",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
        "-out client.pem 2>/dev/null\n",
        "printf '", kToken, "\\n' > token\n", "printf '", kAdminToken, "\\n' > admin_token\n");
    WriteFile(d + "/make_certs.sh", script);
    RunResult r = RunProgram({"/bin/sh", d + "/make_certs.sh"}, d, absl::Seconds(60));
    ASSERT_EQ(r.status, 0) << r.output;
  }

  std::string Path(const std::string& name) const { return *dir_ + "/" + name; }

  std::vector<std::string> ServerFlags() const {
    return {"--job=" + SourceDir() + "/examples/seed_regression.textproto", "--shard=0",
            "--num_shards=1", "--num_workers=1", "--epochs=3",
            "--tls_cert=" + Path("server.pem"), "--tls_key=" + Path("server.key"),
            "--tls_ca=" + Path("ca.pem"), "--token_file=" + Path("token"),
            "--admin_token_file=" + Path("admin_token"),
            "--checkpoint_dir=" + Path("ckpt")};
  }

  // ShardStats over a channel with `files`; returns the status.
  grpc::Status Stats(const std::string& address, const SecurityFiles& files,
                     tessera::v1::ShardStatsResponse* out = nullptr) {
    auto creds = MakeChannelCredentials(files);
    EXPECT_TRUE(creds.ok()) << creds.status();
    auto stub = tessera::v1::ParameterService::NewStub(grpc::CreateChannel(address, *creds));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    tessera::v1::ShardStatsResponse response;
    grpc::Status s = stub->ShardStats(&ctx, {}, &response);
    if (out != nullptr) *out = response;
    return s;
  }

  SecurityFiles Client(bool cert, const std::string& token) const {
    SecurityFiles f;
    f.ca = Path("ca.pem");
    if (cert) {
      f.cert = Path("client.pem");
      f.key = Path("client.key");
    }
    if (!token.empty()) f.token = token;
    return f;
  }

  static std::string* dir_;
};

std::string* SecurityTest::dir_ = nullptr;

TEST_F(SecurityTest, OnlyMutualTlsWithTheRightTokenGetsIn) {
  auto server = ServerProcess::Start(*dir_, ServerFlags());
  ASSERT_NE(server, nullptr);
  const std::string address = absl::StrCat("localhost:", server->port());
  WriteFile(Path("wrong_token"), "not-the-token\n");

  tessera::v1::ShardStatsResponse before;
  ASSERT_TRUE(Stats(address, Client(true, Path("token")), &before).ok());

  SecurityFiles plaintext;  // no TLS at all
  EXPECT_EQ(Stats(address, plaintext).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Stats(address, Client(false, "")).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "TLS without a client certificate must not reach an mTLS server";
  EXPECT_EQ(Stats(address, Client(true, "")).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Stats(address, Client(true, Path("wrong_token"))).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  SecurityFiles untrusted = Client(true, Path("token"));
  untrusted.ca = Path("other.pem");  // does not vouch for the server
  EXPECT_EQ(Stats(address, untrusted).error_code(), grpc::StatusCode::UNAVAILABLE);

  // Nothing changed and nothing was counted as a push.
  tessera::v1::ShardStatsResponse after;
  ASSERT_TRUE(Stats(address, Client(true, Path("token")), &after).ok());
  EXPECT_EQ(after.param_sum(), before.param_sum());
  EXPECT_EQ(after.pushes_applied() + after.requests_rejected(), 0);

  // Admin calls need the admin token.
  const std::vector<std::string> tls = {"--tls_ca=" + Path("ca.pem"),
                                        "--tls_cert=" + Path("client.pem"),
                                        "--tls_key=" + Path("client.key")};
  std::vector<std::string> as_worker = {Bin("tessera"), "checkpoint", address,
                                        "--admin_token_file=" + Path("token")};
  as_worker.insert(as_worker.end(), tls.begin(), tls.end());
  RunResult denied = RunProgram(as_worker, *dir_, absl::Seconds(30));
  EXPECT_EQ(denied.status, 1);
  EXPECT_TRUE(absl::StrContains(denied.output, "PERMISSION_DENIED")) << denied.output;
  std::vector<std::string> as_admin = {Bin("tessera"), "checkpoint", address,
                                       "--admin_token_file=" + Path("admin_token")};
  as_admin.insert(as_admin.end(), tls.begin(), tls.end());
  RunResult allowed = RunProgram(as_admin, *dir_, absl::Seconds(30));
  EXPECT_EQ(allowed.status, 0) << allowed.output;

  // Training over mutual TLS with the token works end to end.
  std::vector<std::string> worker = {Bin("tessera-worker"),
                                     "--job=" + SourceDir() + "/examples/seed_regression.textproto",
                                     "--rank=0", "--num_shards=1", "--num_workers=1", "--epochs=3",
                                     "--checkpoint_dir=" + Path("ckpt"), "--servers=" + address,
                                     "--token_file=" + Path("token")};
  worker.insert(worker.end(), tls.begin(), tls.end());
  RunResult trained = RunProgram(worker, *dir_, absl::Seconds(60));
  EXPECT_EQ(trained.status, 0) << trained.output;
  EXPECT_TRUE(absl::StrContains(trained.output, "epoch 3/3")) << trained.output;

  // No secret in any log.
  for (const std::string& log : {server->log(), trained.output, denied.output, allowed.output}) {
    EXPECT_FALSE(absl::StrContains(log, kToken));
    EXPECT_FALSE(absl::StrContains(log, kAdminToken));
  }
}

TEST_F(SecurityTest, BadSecurityFlagsFailFastAndNameTheProblem) {
  const std::string job = "--job=" + SourceDir() + "/examples/seed_regression.textproto";
  struct Case {
    std::vector<std::string> flags;
    const char* says;
  };
  const Case cases[] = {
      {{"--token_file=" + Path("token")}, "--token_file/--admin_token_file need --tls_cert"},
      {{"--tls_cert=" + Path("server.pem")}, "--tls_cert needs --tls_key"},
      {{"--tls_cert=" + Path("missing.pem"), "--tls_key=" + Path("server.key")},
       "missing.pem"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {Bin("tessera-server"), job, "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    const absl::Time start = absl::Now();
    RunResult r = RunProgram(argv, *dir_, absl::Seconds(10));
    EXPECT_EQ(r.status, 1) << r.output;
    // Fails fast: RELIABILITY.md asks for 1 s on an idle machine; 5 s leaves
    // room for a loaded CI machine and still rules out any network wait.
    EXPECT_LT(absl::Now() - start, absl::Seconds(5));
    EXPECT_TRUE(absl::StrContains(r.output, c.says)) << r.output;
  }
}

}  // namespace
}  // namespace tessera
