// ttrpc framing: a 10-byte big-endian header (uint32 length, uint32 stream id, uint8 type,
// uint8 flags) followed by `length` bytes of protobuf payload.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace peapod::ttrpc {

constexpr size_t kHeaderSize = 10;
// Largest payload either side accepts or sends, as in the reference implementation.
constexpr uint32_t kMaxMessageSize = 4u << 20;

enum MessageType : uint8_t {
  kTypeRequest = 1,
  kTypeResponse = 2,
  kTypeData = 3,  // streaming data; not used by peapod's unary services
};

struct FrameHeader {
  uint32_t length = 0;
  uint32_t stream_id = 0;
  uint8_t type = 0;
  uint8_t flags = 0;
};

void EncodeHeader(const FrameHeader& h, char out[kHeaderSize]);
FrameHeader DecodeHeader(const char in[kHeaderSize]);
// Writes v as a protobuf varint; returns its length (at most 10). For messages written by hand
// around a large payload, which is then copied once.
size_t EncodeVarint(uint64_t v, char out[10]);

struct Frame {
  FrameHeader header;
  std::string payload;
  // The header announced more than kMaxMessageSize: payload is empty and the announced bytes
  // are skipped as they arrive, so the stream stays in step and the peer can be told.
  bool oversized = false;
};

// Turns a byte stream into frames. For a caller that takes every complete frame before feeding
// more, the buffer holds at most one incomplete frame (up to kHeaderSize + kMaxMessageSize)
// plus the input handed to Feed(), whatever lengths the peer announces: an oversized frame is
// skipped, never buffered.
class FrameDecoder {
 public:
  void Feed(const char* data, size_t len);
  // The next complete frame, or nullopt when more bytes are needed.
  std::optional<Frame> Next();
  // Bytes buffered but not yet returned as frames (a truncated frame at EOF leaves some).
  size_t buffered() const { return buf_.size() - pos_; }
  bool in_frame() const { return buffered() > 0 || skip_ > 0; }

 private:
  std::string buf_;
  size_t pos_ = 0;
  uint64_t skip_ = 0;  // bytes of an oversized payload still to drop
};

}  // namespace peapod::ttrpc
