// FlowWarp (DESIGN.md §3): out[n,c,y,x] = scale[n,c,y,x] * bilinear(feat[n,c], x + fx, y + fy)
// with (fx, fy) = (flow[n,0,y,x], flow[n,1,y,x]) in cells, sampling at cell centres and each
// of the four bilinear corners that falls outside the map contributing zero. NCHW, contiguous.
//
// Arguments (TensorRT's AOT plugin order: input pointers, scalar extras, output pointers):
//   (const T* feat, const T* flow, const T* scale, int N, int C, int H, int W, T* out)
// Launch (dff.plugins.kernel.launch_geometry): block (TX, TY); grid (ceil(W/TX), ceil(H/TY),
// N*G). Block z-index b covers batch item b / G and the G-th share of the channels
// b % G; each thread computes its cell's corner offsets and weights once, then loops over
// those channels. G = 1 gives one thread per cell looping over all C channels.
//
// Self-contained: no #include, so NVRTC needs no CUDA headers. fp16 data is handled as raw
// 16-bit words converted with the PTX cvt instructions (arithmetic is fp32 throughout).

typedef unsigned short fw_half;  // IEEE binary16 bits

__device__ __forceinline__ float fw_to_float(float v) { return v; }
__device__ __forceinline__ float fw_to_float(fw_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ void fw_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void fw_store(fw_half* p, float v) {
    fw_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}

template <typename T>
__device__ __forceinline__ void flow_warp_impl(const T* __restrict__ feat,
                                               const T* __restrict__ flow,
                                               const T* __restrict__ scale, int N, int C,
                                               int H, int W, T* __restrict__ out) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int groups = gridDim.z / N;  // channel shares per batch item (G)
    const int n = blockIdx.z / groups;
    if (x >= W || y >= H || n >= N) return;
    const int share = (C + groups - 1) / groups;
    const int c_begin = (blockIdx.z % groups) * share;
    const int c_end = min(C, c_begin + share);
    if (c_begin >= c_end) return;

    const long long hw = (long long)H * W;
    const long long cell = (long long)y * W + x;
    // A flow beyond one map size puts every corner outside; clamping there keeps the integer
    // arithmetic below in range (and maps NaN to a far-away sample, i.e. zeros).
    float fx = fw_to_float(flow[(2LL * n) * hw + cell]);
    float fy = fw_to_float(flow[(2LL * n + 1) * hw + cell]);
    fx = fminf(fmaxf(fx, -(float)(W + 1)), (float)(W + 1));
    fy = fminf(fmaxf(fy, -(float)(H + 1)), (float)(H + 1));
    // Split the sample point x + fx into integer and fraction through the flow alone: with x an
    // integer, floor(x + fx) = x + floor(fx), and fx - floor(fx) is exact in floating point, so
    // the weights carry no rounding from the map size (unlike a normalised grid).
    const float fx0 = floorf(fx), fy0 = floorf(fy);
    const float ax = fx - fx0, ay = fy - fy0;  // weights of the right and lower corners
    const int x0 = x + (int)fx0, y0 = y + (int)fy0;
    const int x1 = x0 + 1, y1 = y0 + 1;
    const bool in_x0 = x0 >= 0 && x0 < W, in_x1 = x1 >= 0 && x1 < W;
    const bool in_y0 = y0 >= 0 && y0 < H, in_y1 = y1 >= 0 && y1 < H;
    // Outside corners get weight 0 and a clamped (valid) offset, so the loop has no branches.
    const float wx0 = in_x0 ? 1.0f - ax : 0.0f, wx1 = in_x1 ? ax : 0.0f;
    const float wy0 = in_y0 ? 1.0f - ay : 0.0f, wy1 = in_y1 ? ay : 0.0f;
    const float w00 = wy0 * wx0, w01 = wy0 * wx1, w10 = wy1 * wx0, w11 = wy1 * wx1;
    const int cx0 = min(max(x0, 0), W - 1), cx1 = min(max(x1, 0), W - 1);
    const int cy0 = min(max(y0, 0), H - 1), cy1 = min(max(y1, 0), H - 1);
    const long long o00 = (long long)cy0 * W + cx0, o01 = (long long)cy0 * W + cx1;
    const long long o10 = (long long)cy1 * W + cx0, o11 = (long long)cy1 * W + cx1;

    const long long base = ((long long)n * C + c_begin) * hw;
    const T* f = feat + base;
    const T* s = scale + base + cell;
    T* o = out + base + cell;
#pragma unroll 4
    for (int c = c_begin; c < c_end; ++c) {
        float v = w00 * fw_to_float(f[o00]);
        v = fmaf(w01, fw_to_float(f[o01]), v);
        v = fmaf(w10, fw_to_float(f[o10]), v);
        v = fmaf(w11, fw_to_float(f[o11]), v);
        fw_store(o, v * fw_to_float(*s));
        f += hw;
        s += hw;
        o += hw;
    }
}

extern "C" __global__ void flow_warp_f32(const float* __restrict__ feat,
                                         const float* __restrict__ flow,
                                         const float* __restrict__ scale, int N, int C, int H,
                                         int W, float* __restrict__ out) {
    flow_warp_impl<float>(feat, flow, scale, N, C, H, W, out);
}

#ifndef FLOW_WARP_NO_FP16
extern "C" __global__ void flow_warp_f16(const fw_half* __restrict__ feat,
                                         const fw_half* __restrict__ flow,
                                         const fw_half* __restrict__ scale, int N, int C, int H,
                                         int W, fw_half* __restrict__ out) {
    flow_warp_impl<fw_half>(feat, flow, scale, N, C, H, W, out);
}
#endif
