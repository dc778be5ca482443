// Index and tiling arithmetic of the CUDA importance kernels, free of any CUDA or torch header so that
// it compiles as plain C++ too: tests/cuda_index_math_test.cpp builds it with g++ and
// tests/test_cuda_index_math.py checks it against torch (im2col against F.unfold / unfold_nd, tile and
// sample-split coverage, and a scalar emulation of the kernels' tile loops against the CPU ops).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MAS_HD __host__ __device__ __forceinline__
#else
#define MAS_HD inline
#endif

namespace mas_ext {
namespace cuda {

// Block tile of the importance GEMM: BM rows of omega (output features), BN columns (input features),
// BK positions of the reduction per shared-memory stage, THREADS threads (4 warps).
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 32;
constexpr int THREADS = 128;
constexpr int64_t MAX_GRID_YZ = 65535;

MAS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MAS_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
MAS_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
MAS_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Tiles of size `tile` over [0, n): how many, and where tile t starts and ends.
MAS_HD int64_t num_tiles(int64_t n, int64_t tile) { return ceil_div(n, tile); }
MAS_HD int64_t tile_begin(int64_t t, int64_t tile) { return t * tile; }
MAS_HD int64_t tile_end(int64_t t, int64_t tile, int64_t n) { return min64((t + 1) * tile, n); }

// One operand of the per-sample GEMM: element (item s, position p, feature f) of group `grp` lies at
//   ptr[s * item_stride + p * pos_stride + (grp * group_width + f) * feat_stride].
// Linear (N, P, F) contiguous: item_stride = P*F, pos_stride = F, feat_stride = 1 (features contiguous).
// Conv cols (S, C*K, L) and grad_out (S, O, L): item_stride = rows*L, pos_stride = 1, feat_stride = L.
struct OperandDesc {
  int64_t item_stride;
  int64_t pos_stride;
  int64_t feat_stride;
  int64_t group_width;
};

MAS_HD int64_t operand_offset(const OperandDesc& d, int64_t s, int64_t p, int64_t f, int64_t grp) {
  return s * d.item_stride + p * d.pos_stride + (grp * d.group_width + f) * d.feat_stride;
}

// Element (p, f) of an item's operand tile (base already at the item and group): its offset from the
// base, or -1 outside [0, rows) x [0, fmax) (a zero of the tile).
MAS_HD int64_t tile_load_offset(const OperandDesc& d, int64_t p, int64_t f, int64_t rows, int64_t fmax) {
  return (p < rows && f < fmax) ? p * d.pos_stride + f * d.feat_stride : -1;
}

// Positions item s reduces over: [0, item_rows). Items are consecutive blocks of `positions` rows out of
// `rows_total` (the last one may be short: the split abs-GEMM of a layer without positions).
MAS_HD int64_t item_rows(int64_t s, int64_t positions, int64_t rows_total) {
  return max64(int64_t(0), min64(positions, rows_total - s * positions));
}

// Sample splits: each (tile, group) is worked on by `nsplit` blocks, split j owning the items
// [j * items_per_split, min(n_items, (j + 1) * items_per_split)); no split is empty.
struct SplitPlan {
  int64_t nsplit;
  int64_t items_per_split;
};

// Enough blocks to fill `target_blocks` (a few per SM) given `tiles` output tiles (times groups), never
// more splits than items, and tiles_z * nsplit within the grid's z limit.
MAS_HD SplitPlan plan_splits(int64_t n_items, int64_t tiles, int64_t groups, int64_t target_blocks) {
  SplitPlan plan{1, n_items > 0 ? n_items : 1};
  if (n_items <= 0) return plan;
  int64_t want = ceil_div(target_blocks, max64(tiles, int64_t(1)));
  want = max64(int64_t(1), min64(want, n_items));
  want = min64(want, max64(int64_t(1), MAX_GRID_YZ / max64(groups, int64_t(1))));
  plan.items_per_split = ceil_div(n_items, want);
  plan.nsplit = ceil_div(n_items, plan.items_per_split);
  return plan;
}

MAS_HD int64_t split_begin(const SplitPlan& p, int64_t j) { return j * p.items_per_split; }
MAS_HD int64_t split_end(const SplitPlan& p, int64_t j, int64_t n_items) {
  return min64((j + 1) * p.items_per_split, n_items);
}

// The abs-GEMM of a layer without positions, Σ_k |g_k||a_k|ᵀ = |G|ᵀ|A|: every term is nonnegative, so
// the N rows may be cut into items of any length; rows per item (a multiple of BK) that give about
// `target_blocks` blocks over `tiles` output tiles.
MAS_HD int64_t abs_gemm_rows_per_item(int64_t rows, int64_t tiles, int64_t target_blocks) {
  int64_t want = max64(int64_t(1), ceil_div(target_blocks, max64(tiles, int64_t(1))));
  want = min64(want, max64(int64_t(1), ceil_div(rows, BK)));
  want = min64(want, MAX_GRID_YZ);
  return max64(int64_t(BK), round_up(ceil_div(rows, want), BK));
}

// ----------------------------------------------------------------------------- convolution geometry
// 1-3 spatial dims as 3-D (missing leading dims have size 1, kernel 1, stride 1, padding 0, dilation 1).
struct ConvShape {
  int64_t C, O, groups;
  int64_t in[3], out[3], k[3], s[3], p[3], d[3];
};

MAS_HD int64_t conv_kernel_volume(const ConvShape& g) { return g.k[0] * g.k[1] * g.k[2]; }
MAS_HD int64_t conv_out_volume(const ConvShape& g) { return g.out[0] * g.out[1] * g.out[2]; }
MAS_HD int64_t conv_in_volume(const ConvShape& g) { return g.in[0] * g.in[1] * g.in[2]; }
// Rows of a sample's im2col matrix: C * K (the weight's layout: channel-major, then kernel offsets).
MAS_HD int64_t conv_cols_rows(const ConvShape& g) { return g.C * conv_kernel_volume(g); }
MAS_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// im2col: element (row r, column l) of a sample's (C*K, L) matrix reads the sample's input (C, D, H, W)
// at the returned offset, or is a zero of the padding (-1). r = c*K + (k0*k1n + k1)*k2n + k2 and
// l = (o0*out1 + o1)*out2 + o2, the order of F.unfold and of the weight's (C/groups, *kernel) layout.
MAS_HD int64_t im2col_offset(const ConvShape& g, int64_t r, int64_t l) {
  const int64_t K = conv_kernel_volume(g);
  const int64_t c = r / K;
  int64_t kk = r - c * K;
  const int64_t k2 = kk % g.k[2];
  kk /= g.k[2];
  const int64_t k1 = kk % g.k[1];
  const int64_t k0 = kk / g.k[1];
  const int64_t o2 = l % g.out[2];
  const int64_t rest = l / g.out[2];
  const int64_t o1 = rest % g.out[1];
  const int64_t o0 = rest / g.out[1];
  const int64_t z = o0 * g.s[0] - g.p[0] + k0 * g.d[0];
  const int64_t y = o1 * g.s[1] - g.p[1] + k1 * g.d[1];
  const int64_t x = o2 * g.s[2] - g.p[2] + k2 * g.d[2];
  if (z < 0 || z >= g.in[0] || y < 0 || y >= g.in[1] || x < 0 || x >= g.in[2]) return -1;
  return ((c * g.in[0] + z) * g.in[1] + y) * g.in[2] + x;
}

// Workspace for the im2col of `samples` samples, in elements, and how many samples fit in a budget
// (at least one: a single sample's columns are the least the kernel needs).
MAS_HD int64_t conv_workspace_elems(const ConvShape& g, int64_t samples) {
  return samples * conv_cols_rows(g) * conv_out_volume(g);
}
MAS_HD int64_t conv_chunk_samples(const ConvShape& g, int64_t n, int64_t budget_elems) {
  const int64_t per = max64(int64_t(1), conv_workspace_elems(g, 1));
  return max64(int64_t(1), min64(n, budget_elems / per));
}

// The per-sample GEMM of a conv chunk of S samples, group grp: omega rows grp*Og + m, columns i < Cg*K;
//   G(s, p=l, f=m) = grad_out[s, grp*Og + m, l], A(s, p=l, f=i) = cols[s, grp*Cg*K + i, l].
MAS_HD OperandDesc conv_grad_desc(const ConvShape& g) {
  const int64_t L = conv_out_volume(g);
  return OperandDesc{g.O * L, 1, L, g.O / g.groups};
}
MAS_HD OperandDesc conv_cols_desc(const ConvShape& g) {
  const int64_t L = conv_out_volume(g);
  return OperandDesc{conv_cols_rows(g) * L, 1, L, conv_cols_rows(g) / g.groups};
}
// Linear operands (N, P, F) contiguous, read as items of `positions` rows.
MAS_HD OperandDesc linear_desc(int64_t positions, int64_t features) {
  return OperandDesc{positions * features, features, 1, features};
}


// ----------------------------------------------------------------------------- launch geometry
// Everything a launch of the importance GEMM kernel needs besides pointers. The kernel's block
// (x, y, z) owns omega rows [y*BM, y*BM + BM) and columns [x*BN, x*BN + BN) of group z / nsplit, and the
// items of split z % nsplit; per item it reduces G(s, p, m)·A(s, p, n) over p < item_rows(s) and adds
// the absolute value of that sum (abs_load: the operands' absolute values, for the abs-GEMM).
struct GemmGeometry {
  OperandDesc gd, ad;        // G (grad_out) and A (input / im2col columns)
  int64_t M, Nf, groups;     // omega rows and columns per group
  int64_t omega_ld;          // omega row stride; group grp's rows start at grp * M
  int64_t positions, rows_total, n_items;
  SplitPlan plan;
  bool abs_load;
  int64_t grid_x, grid_y, grid_z;
};

MAS_HD void finish_grid(GemmGeometry& g, int64_t target_blocks) {
  g.grid_x = num_tiles(g.Nf, BN);
  g.grid_y = num_tiles(g.M, BM);
  g.plan = plan_splits(g.n_items, g.grid_x * g.grid_y * g.groups, g.groups, target_blocks);
  g.grid_z = g.groups * g.plan.nsplit;
}

// Linear, input (N, P, I), grad_out (N, P, O). P == 1: the abs-GEMM over the N rows, cut into items.
MAS_HD GemmGeometry linear_geometry(int64_t N, int64_t P, int64_t I, int64_t O, int64_t target_blocks) {
  GemmGeometry g{};
  g.M = O, g.Nf = I, g.groups = 1, g.omega_ld = I;
  g.abs_load = P == 1;
  if (g.abs_load) {
    g.positions = abs_gemm_rows_per_item(N, num_tiles(I, BN) * num_tiles(O, BM), target_blocks);
    g.rows_total = N;
    g.n_items = ceil_div(N, g.positions);
  } else {
    g.positions = P, g.rows_total = N * P, g.n_items = N;
  }
  g.gd = linear_desc(g.positions, O);
  g.ad = linear_desc(g.positions, I);
  finish_grid(g, target_blocks);
  return g;
}

// Conv, one chunk of S samples: grad_out (S, O, L) and the chunk's im2col columns (S, C*K, L).
MAS_HD GemmGeometry conv_chunk_geometry(const ConvShape& c, int64_t S, int64_t target_blocks) {
  GemmGeometry g{};
  g.groups = c.groups;
  g.M = c.O / c.groups;
  g.Nf = conv_cols_rows(c) / c.groups;
  g.omega_ld = g.Nf;
  g.abs_load = false;
  g.positions = conv_out_volume(c), g.rows_total = S * g.positions, g.n_items = S;
  g.gd = conv_grad_desc(c);
  g.ad = conv_cols_desc(c);
  finish_grid(g, target_blocks);
  return g;
}

// Tied embedding + linear: input (N, P, D), grad_out (N, P, V); the embedding rows join per sample.
MAS_HD GemmGeometry tied_geometry(int64_t N, int64_t P, int64_t D, int64_t V, int64_t target_blocks) {
  GemmGeometry g{};
  g.M = V, g.Nf = D, g.groups = 1, g.omega_ld = D;
  g.abs_load = false;
  g.positions = P, g.rows_total = N * P, g.n_items = N;
  g.gd = linear_desc(P, V);
  g.ad = linear_desc(P, D);
  finish_grid(g, target_blocks);
  return g;
}

// Bias: omega_b[o] += Σ_items |Σ_{p < item_rows} G(s, p, o)| (abs_load: of |G|). Features contiguous
// (linear): a thread per o; positions contiguous (conv): a warp per o.
struct BiasGeometry {
  OperandDesc gd;
  int64_t O, positions, rows_total, n_items;
  SplitPlan plan;
  bool abs_load, feat_contig;
  int64_t grid_x, grid_y;
};

MAS_HD BiasGeometry bias_geometry(const GemmGeometry& gg, bool feat_contig, int64_t O, int64_t target_blocks) {
  BiasGeometry b{};
  b.gd = gg.gd, b.O = O, b.positions = gg.positions, b.rows_total = gg.rows_total, b.n_items = gg.n_items;
  b.abs_load = gg.abs_load, b.feat_contig = feat_contig;
  b.grid_x = num_tiles(O, feat_contig ? THREADS : THREADS / 32);
  b.plan = plan_splits(b.n_items, b.grid_x, 1, target_blocks);
  b.grid_y = b.plan.nsplit;
  return b;
}

}  // namespace cuda
}  // namespace mas_ext
