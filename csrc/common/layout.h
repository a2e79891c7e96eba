#pragma once
// Memory layouts of 4-D [N, C, H, W] activations. Every resfuse kernel handles two natively:
//   NCHW  (torch.contiguous_format): each (n, c) plane of H*W values is contiguous;
//   NHWC  (torch.channels_last):     each (n, h, w) row of C values is contiguous.
// An op processes all its activations in the layout of its main input and returns outputs in it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace resfuse {

enum class Layout { NCHW, NHWC };

inline at::MemoryFormat memory_format(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The layout `t` should be processed in: channels_last when its strides are channels_last-like
// (Tensor::suggest_memory_format, so also for a strided slice of a channels_last tensor), else NCHW.
inline Layout layout_of(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW;
}

// `t` densely stored in `layout`: `t` itself when it already is, otherwise a copy made once. This is
// how ops accept tensors that are neither NCHW- nor channels_last-contiguous (a strided slice, an
// expanded tensor) and secondary operands stored in the other layout than the main input.
inline at::Tensor to_layout(const at::Tensor& t, Layout layout) {
  return t.contiguous(memory_format(layout));
}

// A new uninitialised tensor shaped and typed like `like`, densely stored in `layout`.
inline at::Tensor empty_in_layout(const at::Tensor& like, Layout layout) {
  return at::empty(like.sizes(), like.options().memory_format(memory_format(layout)));
}

}  // namespace resfuse
