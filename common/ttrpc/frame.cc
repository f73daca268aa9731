#include "common/ttrpc/frame.h"

#include <algorithm>

namespace peapod::ttrpc {

namespace {
void PutU32(char* p, uint32_t v) {
  p[0] = static_cast<char>(v >> 24);
  p[1] = static_cast<char>(v >> 16);
  p[2] = static_cast<char>(v >> 8);
  p[3] = static_cast<char>(v);
}
uint32_t GetU32(const char* p) {
  auto b = reinterpret_cast<const unsigned char*>(p);
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
}
}  // namespace

void EncodeHeader(const FrameHeader& h, char out[kHeaderSize]) {
  PutU32(out, h.length);
  PutU32(out + 4, h.stream_id);
  out[8] = static_cast<char>(h.type);
  out[9] = static_cast<char>(h.flags);
}

size_t EncodeVarint(uint64_t v, char out[10]) {
  size_t n = 0;
  for (;; v >>= 7) {
    out[n++] = static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    if (v <= 0x7f) return n;
  }
}

FrameHeader DecodeHeader(const char in[kHeaderSize]) {
  FrameHeader h;
  h.length = GetU32(in);
  h.stream_id = GetU32(in + 4);
  h.type = static_cast<uint8_t>(in[8]);
  h.flags = static_cast<uint8_t>(in[9]);
  return h;
}

void FrameDecoder::Feed(const char* data, size_t len) {
  if (skip_ > 0) {
    size_t drop = static_cast<size_t>(std::min<uint64_t>(skip_, len));
    skip_ -= drop;
    data += drop;
    len -= drop;
  }
  if (len == 0) return;
  // Drop what was consumed before growing, so the buffer holds at most one incomplete frame
  // plus this input. Cheap for a caller that takes every complete frame before feeding more
  // (Connection): what is left after pos_ is the start of one frame from the previous input.
  if (pos_ > 0) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  buf_.append(data, len);
}

std::optional<Frame> FrameDecoder::Next() {
  if (buf_.size() - pos_ < kHeaderSize) return std::nullopt;
  FrameHeader h = DecodeHeader(buf_.data() + pos_);
  if (h.length > kMaxMessageSize) {
    pos_ += kHeaderSize;
    // Drop what of the payload is already here; the rest is dropped by Feed().
    size_t have = std::min<size_t>(buf_.size() - pos_, h.length);
    pos_ += have;
    skip_ = h.length - have;
    return Frame{h, {}, true};
  }
  if (buf_.size() - pos_ - kHeaderSize < h.length) return std::nullopt;
  Frame f{h, buf_.substr(pos_ + kHeaderSize, h.length), false};
  pos_ += kHeaderSize + h.length;
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  return f;
}

}  // namespace peapod::ttrpc
