// `tessera eval` through the real binaries: the final checkpoint of a
// Fashion-MNIST run scores what the run's last evaluation printed, and bad
// checkpoint folders fail with one line naming them.

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"

namespace tessera {
namespace {

using testing_util::Bin;
using testing_util::NewTempDir;
using testing_util::ReadFile;
using testing_util::RunProgram;
using testing_util::RunResult;
using testing_util::SourceDir;

std::string FashionJob() { return SourceDir() + "/examples/fashion_mnist_mlp.textproto"; }

// The number after `"key": ` in a flat JSON object; NaN when absent.
double JsonNumber(const std::string& json, const std::string& key) {
  const std::string needle = absl::StrCat("\"", key, "\": ");
  const size_t at = json.find(needle);
  if (at == std::string::npos) return std::nan("");
  return strtod(json.c_str() + at + needle.size(), nullptr);
}

// The number after `key: ` in a line of text; NaN when absent.
double LineNumber(const std::string& text, const std::string& key) {
  const size_t at = text.find(key + ": ");
  if (at == std::string::npos) return std::nan("");
  return strtod(text.c_str() + at + key.size() + 2, nullptr);
}

RunResult Eval(const std::string& dir, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {Bin("tessera"), "eval"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProgram(argv, dir, absl::Minutes(2));
}

TEST(EvalTest, FinalCheckpointScoresWhatTheRunPrinted) {
  const std::string dir = NewTempDir("eval");
  const std::string ckpt = dir + "/ckpt";
  const std::string summary_path = dir + "/summary.json";
  // max_steps ends the last epoch early, and the trainer evaluates at that
  // step, so the summary's figures are those of the step-60 parameters: the
  // ones the servers write to their final checkpoint at shutdown.
  RunResult run =
      RunProgram({Bin("tessera"), "local", "--job=" + FashionJob(), "--log_dir=" + dir,
                  "--max_steps=60", "--checkpoint_dir=" + ckpt, "--summary_json=" + summary_path},
                 dir, absl::Minutes(3));
  ASSERT_EQ(run.status, 0) << run.output;
  const std::string summary = ReadFile(summary_path);
  const double run_accuracy = JsonNumber(summary, "test_accuracy");
  const double run_loss = JsonNumber(summary, "test_loss");
  ASSERT_FALSE(std::isnan(run_accuracy)) << summary;
  ASSERT_FALSE(std::isnan(run_loss)) << summary;

  const std::string eval_json = dir + "/eval.json";
  RunResult eval =
      Eval(dir, {"--checkpoint=" + ckpt, "--job=" + FashionJob(), "--summary_json=" + eval_json});
  ASSERT_EQ(eval.status, 0) << eval.output;
  EXPECT_TRUE(absl::StartsWith(eval.output,
                               absl::StrCat("checkpoint ", ckpt, "/step-0000000060: test_loss: ")))
      << eval.output;
  const double printed_accuracy = LineNumber(eval.output, "test_accuracy");
  EXPECT_EQ(absl::StrFormat("%.4f", printed_accuracy), absl::StrFormat("%.4f", run_accuracy))
      << eval.output << summary;
  EXPECT_NEAR(LineNumber(eval.output, "test_loss"), run_loss, 1e-4) << eval.output << summary;

  const std::string json = ReadFile(eval_json);
  EXPECT_EQ(absl::StrFormat("%.4f", JsonNumber(json, "test_accuracy")),
            absl::StrFormat("%.4f", run_accuracy))
      << json << summary;
  EXPECT_NEAR(JsonNumber(json, "test_loss"), run_loss, 1e-4) << json << summary;
  EXPECT_EQ(JsonNumber(json, "step"), 60) << json;
  EXPECT_EQ(JsonNumber(json, "samples"), 10000) << json;

  // A job with another model is refused by the checkpoint's metadata.
  RunResult other = Eval(dir, {"--checkpoint=" + ckpt,
                               "--job=" + SourceDir() + "/examples/seed_regression.textproto"});
  EXPECT_EQ(other.status, 1) << other.output;
  EXPECT_TRUE(absl::StrContains(other.output, "holds model")) << other.output;
}

TEST(EvalTest, MissingOrEmptyFolderFailsWithOneLineNamingIt) {
  const std::string dir = NewTempDir("eval-errors");
  const std::string missing = dir + "/no-such-folder";
  RunResult r = Eval(dir, {"--checkpoint=" + missing, "--job=" + FashionJob()});
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "'" + missing + "' does not exist")) << r.output;

  const std::string empty = dir + "/empty";
  ASSERT_EQ(mkdir(empty.c_str(), 0755), 0);
  // A step folder with one of two shards is not a complete checkpoint.
  ASSERT_EQ(mkdir((empty + "/step-0000000005").c_str(), 0755), 0);
  testing_util::WriteFile(empty + "/step-0000000005/shard-0-of-2.safetensors", "truncated");
  r = Eval(dir, {"--checkpoint=" + empty, "--job=" + FashionJob()});
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "no complete checkpoint in '" + empty + "'")) << r.output;

  r = Eval(dir, {"--job=" + FashionJob()});
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "--checkpoint is required")) << r.output;
}

}  // namespace
}  // namespace tessera
