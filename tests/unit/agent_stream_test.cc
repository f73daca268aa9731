// The agent's process plumbing without a VM or crun: stdio streams with back-pressure, the
// reaper, helper commands, mount option parsing.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <future>
#include <thread>

#include "podagent/process.h"
#include "podagent/storage.h"
#include "podagent/stream.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::agent {
namespace {

using namespace std::chrono_literals;

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int fds[2];
    EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    r.Reset(fds[0]);
    w.Reset(fds[1]);
  }
};

// Writes 64 KiB chunks to a non-blocking pipe until it stays full (50 tries 5 ms apart, at
// most 10 s): the bytes written.
size_t FillUntilBlocked(int wfd) {
  std::string chunk(64 << 10, 'x');
  size_t written = 0;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  int stalls = 0;
  while (std::chrono::steady_clock::now() < deadline && stalls < 50) {
    ssize_t n = ::write(wfd, chunk.data(), chunk.size());
    if (n > 0) {
      written += static_cast<size_t>(n);
      stalls = 0;
    } else {
      ++stalls;
      std::this_thread::sleep_for(5ms);
    }
  }
  return written;
}

// Reads once from the stream on the loop thread and waits for the answer.
std::pair<std::string, bool> ReadOnce(peapod::testing::LoopThread& lt, OutputStream& s,
                                      size_t max = OutputStream::kMaxRead) {
  std::promise<std::pair<std::string, bool>> p;
  auto f = p.get_future();
  lt.Sync([&] {
    (void)s.Read(max, std::nullopt,
                 {.waiting = [] { return true; },
                  .deliver =
                      [&p](std::string_view d, bool eof) {
                        p.set_value({std::string(d), eof});
                      }});
  });
  EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
  return f.get();
}

TEST(OutputStreamTest, DeliversEverythingThenEof) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  OutputStream s(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s.Start(); }).ok());
  ASSERT_TRUE(WriteAll(pipe.w.get(), "hello ", 6).ok());
  ASSERT_TRUE(WriteAll(pipe.w.get(), "world", 5).ok());
  pipe.w.Reset();
  std::string got;
  bool eof = false;
  while (!eof) {
    auto [data, e] = ReadOnce(lt, s, 4);
    EXPECT_LE(data.size(), 4u);
    got += data;
    eof = e;
  }
  EXPECT_EQ(got, "hello world");
  lt.Sync([&] { EXPECT_TRUE(s.eof()); });
}

TEST(OutputStreamTest, StopsReadingWhenItsBufferIsFullSoTheWriterBlocks) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  int wfd = pipe.w.get();
  ASSERT_TRUE(SetNonBlocking(wfd).ok());
  OutputStream s(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s.Start(); }).ok());
  // Write until the pipe is full: the stream must not absorb more than its bound.
  size_t written = FillUntilBlocked(wfd);
  size_t buffered = lt.Sync([&] { return s.buffered(); });
  EXPECT_EQ(buffered, OutputStream::kMaxBuffered);
  EXPECT_LT(written, OutputStream::kMaxBuffered + (4u << 20)) << "writer was never blocked";
  // Draining lets the writer go on, and nothing is lost.
  pipe.w.Reset();
  size_t total = 0;
  bool eof = false;
  while (!eof) {
    auto [data, e] = ReadOnce(lt, s);
    total += data.size();
    eof = e;
  }
  EXPECT_EQ(total, written);
}

TEST(OutputStreamTest, DataIsKeptForTheNextReaderWhenACallerGaveUp) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  OutputStream s(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s.Start(); }).ok());
  bool delivered_to_gone = false;
  lt.Sync([&] {
    (void)s.Read(100, std::nullopt,
                 {.waiting = [] { return false; },
                  .deliver = [&](std::string_view, bool) { delivered_to_gone = true; }});
  });
  ASSERT_TRUE(WriteAll(pipe.w.get(), "kept", 4).ok());
  auto [data, eof] = ReadOnce(lt, s);
  EXPECT_EQ(data, "kept");
  EXPECT_FALSE(eof);
  EXPECT_FALSE(delivered_to_gone);
}

TEST(OutputStreamTest, AReaderWaitingWhenTheProcessIsRemovedGetsEof) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  auto s = std::make_unique<OutputStream>(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s->Start(); }).ok());
  std::promise<std::pair<std::string, bool>> p;
  lt.Sync([&] {
    (void)s->Read(100, std::nullopt,
                  {.waiting = [] { return true; },
                   .deliver =
                       [&p](std::string_view d, bool eof) {
                         p.set_value({std::string(d), eof});
                       }});
    s.reset();
  });
  auto f = p.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(f.get().second);
}

// Reads at an offset (as the shim does): the answer stays in the stream until a later read's
// offset passes it, so an answer lost with a connection (a sandboxer restart) comes again.
std::pair<std::string, bool> ReadAt(peapod::testing::LoopThread& lt, OutputStream& s,
                                    uint64_t offset, size_t max, Result<void>* refused = nullptr) {
  std::promise<std::pair<std::string, bool>> p;
  auto f = p.get_future();
  Result<void> r = Ok();
  lt.Sync([&] {
    r = s.Read(max, offset,
               {.waiting = [] { return true; },
                .deliver =
                    [&p](std::string_view d, bool eof) {
                      p.set_value({std::string(d), eof});
                    }});
  });
  if (refused) *refused = r;
  if (!r.ok()) return {"", false};
  EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
  return f.get();
}

TEST(OutputStreamTest, AnAnswerLostWithItsConnectionIsHandedOutAgainAtTheSameOffset) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  OutputStream s(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s.Start(); }).ok());
  ASSERT_TRUE(WriteAll(pipe.w.get(), "0123456789", 10).ok());
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(ReadAt(lt, s, 0, 4).first, "0123");
  // The answer was lost: the reader asks again from where it was.
  EXPECT_EQ(ReadAt(lt, s, 0, 4).first, "0123");
  EXPECT_EQ(ReadAt(lt, s, 4, 3).first, "456");
  // Behind what was acknowledged, or past what was handed out: refused, nothing changes.
  Result<void> refused = Ok();
  ReadAt(lt, s, 2, 3, &refused);
  EXPECT_EQ(refused.error().code(), Code::kInvalidArgument);
  ReadAt(lt, s, 9, 3, &refused);
  EXPECT_EQ(refused.error().code(), Code::kInvalidArgument);
  pipe.w.Reset();
  std::this_thread::sleep_for(50ms);
  auto [rest, eof] = ReadAt(lt, s, 7, 100);
  EXPECT_EQ(rest, "789");
  EXPECT_TRUE(eof);
  // EOF is said again to a reader that lost it too.
  auto again = ReadAt(lt, s, 7, 100);
  EXPECT_EQ(again.first, "789");
  EXPECT_TRUE(again.second);
  lt.Sync([&] { EXPECT_FALSE(s.eof()) << "nothing acknowledged the last bytes yet"; });
  auto end = ReadAt(lt, s, 10, 100);
  EXPECT_EQ(end.first, "");
  EXPECT_TRUE(end.second);
  lt.Sync([&] { EXPECT_TRUE(s.eof()); });
}

TEST(OutputStreamTest, BytesKeptForAReaderCountAgainstTheBound) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  int wfd = pipe.w.get();
  ASSERT_TRUE(SetNonBlocking(wfd).ok());
  OutputStream s(lt.loop(), std::move(pipe.r), false);
  ASSERT_TRUE(lt.Sync([&] { return s.Start(); }).ok());
  auto fill = [&] { return FillUntilBlocked(wfd); };
  fill();
  // Everything handed out but not acknowledged: the stream still holds it, and reads no more.
  // (An answer is at most kMaxRead, a part of the bound: the pipe refills behind it.)
  auto [data, eof] = ReadAt(lt, s, 0, OutputStream::kMaxRead);
  EXPECT_EQ(data.size(), std::min(OutputStream::kMaxRead, OutputStream::kMaxBuffered));
  EXPECT_EQ(fill(), 0u) << "the stream took more while its buffer was full of kept bytes";
  lt.Sync([&] { EXPECT_EQ(s.buffered(), OutputStream::kMaxBuffered); });
  // Acknowledged, the room comes back.
  ReadAt(lt, s, data.size(), 1);
  EXPECT_GT(fill(), 0u);
}

TEST(InputStreamTest, AWriteReSentAtTheSameOffsetIsTakenOnce) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  InputStream in(lt.loop(), std::move(pipe.w));
  auto write_at = [&](std::string data, uint64_t offset) {
    std::promise<Result<uint32_t>> p;
    auto f = p.get_future();
    lt.Sync([&] {
      in.Write(
          std::move(data), [&](Result<uint32_t> n) { p.set_value(std::move(n)); }, offset);
    });
    return f.get();
  };
  EXPECT_EQ(*write_at("abc", 0), 3u);
  EXPECT_EQ(*write_at("abc", 0), 3u) << "a re-sent write answers as if taken";
  EXPECT_EQ(*write_at("bcde", 1), 4u) << "overlap: only the new bytes are written";
  auto gap = write_at("xyz", 9);
  ASSERT_FALSE(gap.ok());
  EXPECT_EQ(gap.error().code(), Code::kInvalidArgument);
  lt.Sync([&] { in.Close(); });
  std::string got;
  char buf[16];
  ssize_t n;
  while ((n = ::read(pipe.r.get(), buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  EXPECT_EQ(got, "abcde");
}

TEST(InputStreamTest, WritesThenClosesSoTheReaderSeesEof) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  InputStream in(lt.loop(), std::move(pipe.w));
  std::promise<Result<uint32_t>> p;
  auto f = p.get_future();
  lt.Sync([&] { in.Write("abc", [&](Result<uint32_t> n) { p.set_value(std::move(n)); }); });
  auto n = f.get();
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 3u);
  lt.Sync([&] { in.Close(); });
  char buf[8];
  EXPECT_EQ(::read(pipe.r.get(), buf, sizeof(buf)), 3);
  EXPECT_EQ(::read(pipe.r.get(), buf, sizeof(buf)), 0);
  // Writing after close is a clear error.
  std::promise<Result<uint32_t>> p2;
  lt.Sync([&] { in.Write("x", [&](Result<uint32_t> r) { p2.set_value(std::move(r)); }); });
  EXPECT_EQ(p2.get_future().get().error().code(), Code::kFailedPrecondition);
}

TEST(InputStreamTest, AWriteToAFullPipeWaitsForTheReader) {
  peapod::testing::LoopThread lt;
  Pipe pipe;
  InputStream in(lt.loop(), std::move(pipe.w));
  std::string big(1 << 20, 'y');  // more than a pipe holds
  std::promise<Result<uint32_t>> p;
  auto f = p.get_future();
  lt.Sync([&] { in.Write(big, [&](Result<uint32_t> n) { p.set_value(std::move(n)); }); });
  EXPECT_EQ(f.wait_for(100ms), std::future_status::timeout);
  std::string got;
  char buf[65536];
  while (got.size() < big.size()) {
    ssize_t n = ::read(pipe.r.get(), buf, sizeof(buf));
    ASSERT_GT(n, 0);
    got.append(buf, static_cast<size_t>(n));
  }
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(*f.get(), big.size());
  EXPECT_EQ(got, big);
}

// Reaps from the loop thread every few ms: a test binary cannot own SIGCHLD the way the agent
// (single-threaded, signalfd) does.
struct ReaperThread {
  peapod::testing::LoopThread lt;
  Reaper reaper;
  std::atomic<bool> stop{false};
  void Tick() {
    reaper.Reap();
    if (!stop) lt.loop()->AddTimer(5ms, [this] { Tick(); });
  }
  ReaperThread() {
    lt.Sync([&] { Tick(); });
  }
  ~ReaperThread() {
    stop = true;
    lt.Sync([] {});
  }
};

TEST(ReaperTest, ExitCodesAndExitsThatArriveBeforeAnyoneAsks) {
  ReaperThread rt;
  auto pid = Spawn({.argv = {"/bin/sh", "-c", "exit 3"}});
  ASSERT_TRUE(pid.ok()) << pid.error().ToString();
  // Let it exit and be reaped before anyone asks for it.
  std::this_thread::sleep_for(200ms);
  std::promise<int> p;
  rt.lt.Sync([&] { rt.reaper.OnExit(*pid, [&](int status) { p.set_value(status); }); });
  auto f = p.get_future();
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(ExitCodeFromWaitStatus(f.get()), 3u);

  auto sleeper = Spawn({.argv = {"/bin/sleep", "100"}});
  ASSERT_TRUE(sleeper.ok());
  std::promise<int> p2;
  rt.lt.Sync([&] { rt.reaper.OnExit(*sleeper, [&](int status) { p2.set_value(status); }); });
  ::kill(*sleeper, SIGTERM);
  auto f2 = p2.get_future();
  ASSERT_EQ(f2.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(ExitCodeFromWaitStatus(f2.get()), 128u + SIGTERM);
}

// A helper asked to run at fixed addresses has ADDR_NO_RANDOMIZE (0x0040000) in its persona;
// any other child does not.
TEST(RunCommandTest, AHelperRunsAtFixedAddressesOnlyWhenAsked) {
  ReaperThread rt;
  std::promise<Result<std::string>> fixed, plain;
  rt.lt.Sync([&] {
    RunCommand(rt.lt.loop(), &rt.reaper,
               {.argv = {"/bin/cat", "/proc/self/personality"}, .fixed_addresses = true},
               [&](Result<std::string> r) { fixed.set_value(std::move(r)); });
    RunCommand(rt.lt.loop(), &rt.reaper, {.argv = {"/bin/cat", "/proc/self/personality"}},
               [&](Result<std::string> r) { plain.set_value(std::move(r)); });
  });
  auto f = fixed.get_future().get();
  ASSERT_TRUE(f.ok()) << f.error().ToString();
  EXPECT_EQ(std::stoul(*f, nullptr, 16) & 0x0040000, 0x0040000u) << *f;
  auto p = plain.get_future().get();
  ASSERT_TRUE(p.ok()) << p.error().ToString();
  EXPECT_EQ(std::stoul(*p, nullptr, 16) & 0x0040000, 0u) << *p;
}

TEST(RunCommandTest, OutputOnSuccessAndStderrInTheError) {
  ReaperThread rt;
  std::promise<Result<std::string>> ok, bad, missing;
  rt.lt.Sync([&] {
    RunCommand(rt.lt.loop(), &rt.reaper, {.argv = {"/bin/sh", "-c", "echo out; echo err >&2"}},
               [&](Result<std::string> r) { ok.set_value(std::move(r)); });
    RunCommand(rt.lt.loop(), &rt.reaper,
               {.argv = {"/bin/sh", "-c", "echo container not found >&2; exit 4"}},
               [&](Result<std::string> r) { bad.set_value(std::move(r)); });
    RunCommand(rt.lt.loop(), &rt.reaper, {.argv = {"/nonexistent/crun", "state"}},
               [&](Result<std::string> r) { missing.set_value(std::move(r)); });
  });
  auto r1 = ok.get_future().get();
  ASSERT_TRUE(r1.ok()) << r1.error().ToString();
  EXPECT_EQ(*r1, "out\n");
  auto r2 = bad.get_future().get();
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.error().message().find("exit status 4"), std::string::npos);
  EXPECT_NE(r2.error().message().find("container not found"), std::string::npos)
      << r2.error().message();
  auto r3 = missing.get_future().get();
  ASSERT_FALSE(r3.ok());
  EXPECT_NE(r3.error().message().find("exit status 127"), std::string::npos)
      << r3.error().message();
}

TEST(MountOptionsTest, FlagsAndData) {
  auto o = ParseMountOptions({"ro", "nosuid", "nodev", "size=64k", "mode=755", "defaults"});
  EXPECT_EQ(o.flags, static_cast<unsigned long>(MS_RDONLY | MS_NOSUID | MS_NODEV));
  EXPECT_EQ(o.data, "size=64k,mode=755");
  EXPECT_EQ(ParseMountOptions({"ro", "rw"}).flags, 0ul);
  EXPECT_EQ(ParseMountOptions({"rbind"}).flags, static_cast<unsigned long>(MS_BIND | MS_REC));
}

TEST(ScsiTest, AddressesAreValidated) {
  EXPECT_EQ(FindScsiDisk("sda", 0ms).error().code(), Code::kInvalidArgument);
  EXPECT_EQ(FindScsiDisk("0:1:2", 0ms).error().code(), Code::kInvalidArgument);
  EXPECT_EQ(FindScsiDisk("0:77", 0ms).error().code(), Code::kNotFound);
}

}  // namespace
}  // namespace peapod::agent
