// CPU harness for csrc/cuda/index_math.cuh (plain C++, built with g++ by tests/test_cuda_index_math.py).
//
//   im2col C O groups in0 in1 in2 k0 k1 k2 s0 s1 s2 p0 p1 p2 d0 d1 d2   -> C*K*L offsets (-1: padding)
//   tiles n tile                                                         -> "begin end" per tile
//   splits n_items tiles groups target                                   -> nsplit, items_per_split, ranges
//   absrows rows tiles target                                            -> rows per item of the abs-GEMM
//   linear DIR N P I O target                                            -> DIR/w.bin, DIR/b.bin
//   conv DIR N C O groups in0..2 k0..2 s0..2 p0..2 d0..2 target budget   -> DIR/w.bin, DIR/b.bin
//   tied DIR N P D V Q target                                            -> DIR/w.bin
//
// linear/conv/tied run a scalar emulation of the CUDA launchers: the same geometry (linear_geometry,
// conv_chunk_geometry + conv_chunk_samples + im2col_offset, tied_geometry, bias_geometry), the same
// block/split/item/BK-stage loops and tile loads (tile_load_offset), the tied rows joining the tile
// before |.|, and the final += into omega; the warp-level tile math is replaced by plain float loops.
// Inputs are float32 .bin files (indices int64) in DIR: a.bin (input or x), g.bin (grad_out), idx.bin,
// rows.bin.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/index_math.cuh"

using namespace mas_ext::cuda;

namespace {

template <typename T>
std::vector<T> read_bin(const std::string& path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  if (n && std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "short read %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

void write_bin(const std::string& path, const std::vector<float>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::exit(2);
  std::fwrite(v.data(), sizeof(float), v.size(), f);
  std::fclose(f);
}

int64_t arg(char** argv, int i) { return std::atoll(argv[i]); }

ConvShape conv_shape(char** argv, int i, int64_t C, int64_t O, int64_t groups) {
  ConvShape c{};
  c.C = C, c.O = O, c.groups = groups;
  for (int j = 0; j < 3; ++j) {
    c.in[j] = arg(argv, i + j);
    c.k[j] = arg(argv, i + 3 + j);
    c.s[j] = arg(argv, i + 6 + j);
    c.p[j] = arg(argv, i + 9 + j);
    c.d[j] = arg(argv, i + 12 + j);
    c.out[j] = conv_out_size(c.in[j], c.k[j], c.s[j], c.p[j], c.d[j]);
  }
  return c;
}

// The importance GEMM kernel, one block at a time.
void emulate_gemm(const GemmGeometry& geo, const float* g, const float* a, float* omega, const int64_t* idx = nullptr,
                  const float* rows = nullptr, int64_t Q = 0) {
  for (int64_t z = 0; z < geo.grid_z; ++z)
    for (int64_t y = 0; y < geo.grid_y; ++y)
      for (int64_t x = 0; x < geo.grid_x; ++x) {
        const int64_t n0 = x * BN, m0 = y * BM, grp = z / geo.plan.nsplit, split = z % geo.plan.nsplit;
        const int64_t sb = split_begin(geo.plan, split), se = split_end(geo.plan, split, geo.n_items);
        std::vector<float> sum(BM * BN, 0.f), acc(BM * BN), sG(BK * BM), sA(BK * BN);
        for (int64_t s = sb; s < se; ++s) {
          std::fill(acc.begin(), acc.end(), 0.f);
          const int64_t nrows = item_rows(s, geo.positions, geo.rows_total);
          const float* gs = g + operand_offset(geo.gd, s, 0, 0, grp);
          const float* as = a + operand_offset(geo.ad, s, 0, 0, grp);
          for (int64_t p0 = 0; p0 < nrows; p0 += BK) {
            for (int k = 0; k < BK; ++k) {
              for (int m = 0; m < BM; ++m) {
                const int64_t off = tile_load_offset(geo.gd, p0 + k, m0 + m, nrows, geo.M);
                sG[k * BM + m] = off >= 0 ? (geo.abs_load ? std::fabs(gs[off]) : gs[off]) : 0.f;
              }
              for (int n = 0; n < BN; ++n) {
                const int64_t off = tile_load_offset(geo.ad, p0 + k, n0 + n, nrows, geo.Nf);
                sA[k * BN + n] = off >= 0 ? (geo.abs_load ? std::fabs(as[off]) : as[off]) : 0.f;
              }
            }
            for (int k = 0; k < BK; ++k)
              for (int m = 0; m < BM; ++m)
                for (int n = 0; n < BN; ++n) acc[m * BN + n] += sG[k * BM + m] * sA[k * BN + n];
          }
          if (idx) {
            const int64_t vmax = min64(m0 + BM, geo.M);
            for (int64_t q = 0; q < Q; ++q) {
              const int64_t v = idx[s * Q + q];
              if (v < m0 || v >= vmax) continue;
              for (int n = 0; n < BN; ++n)
                if (n0 + n < geo.Nf) acc[(v - m0) * BN + n] += rows[(s * Q + q) * geo.Nf + n0 + n];
            }
          }
          for (int i = 0; i < BM * BN; ++i) sum[i] += std::fabs(acc[i]);
        }
        float* out = omega + grp * geo.M * geo.omega_ld;
        for (int m = 0; m < BM; ++m)
          for (int n = 0; n < BN; ++n)
            if (m0 + m < geo.M && n0 + n < geo.Nf) out[(m0 + m) * geo.omega_ld + n0 + n] += sum[m * BN + n];
      }
}

void emulate_bias(const BiasGeometry& b, const float* g, float* omega_b) {
  for (int64_t y = 0; y < b.grid_y; ++y) {
    const int64_t sb = split_begin(b.plan, y), se = split_end(b.plan, y, b.n_items);
    const int64_t per_block = b.feat_contig ? THREADS : THREADS / 32;
    for (int64_t x = 0; x < b.grid_x; ++x)
      for (int64_t o = x * per_block; o < min64((x + 1) * per_block, b.O); ++o) {
        float total = 0.f;
        for (int64_t s = sb; s < se; ++s) {
          const int64_t nrows = item_rows(s, b.positions, b.rows_total);
          const float* gs = g + operand_offset(b.gd, s, 0, o, 0);
          float acc = 0.f;
          for (int64_t p = 0; p < nrows; ++p) {
            const float v = gs[p * b.gd.pos_stride];
            acc += b.abs_load ? std::fabs(v) : v;
          }
          total += std::fabs(acc);
        }
        if (se > sb) omega_b[o] += total;
      }
  }
}

int usage() {
  std::fprintf(stderr, "usage: see the comment at the top of cuda_index_math_test.cpp\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  if (cmd == "im2col" && argc == 20) {
    const ConvShape c = conv_shape(argv, 5, arg(argv, 2), arg(argv, 3), arg(argv, 4));
    const int64_t R = conv_cols_rows(c), L = conv_out_volume(c);
    std::printf("%lld %lld\n", (long long)R, (long long)L);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t l = 0; l < L; ++l) std::printf("%lld\n", (long long)im2col_offset(c, r, l));
    return 0;
  }
  if (cmd == "tiles" && argc == 4) {
    const int64_t n = arg(argv, 2), tile = arg(argv, 3);
    for (int64_t t = 0; t < num_tiles(n, tile); ++t)
      std::printf("%lld %lld\n", (long long)tile_begin(t, tile), (long long)tile_end(t, tile, n));
    return 0;
  }
  if (cmd == "splits" && argc == 6) {
    const int64_t n = arg(argv, 2);
    const SplitPlan p = plan_splits(n, arg(argv, 3), arg(argv, 4), arg(argv, 5));
    std::printf("%lld %lld\n", (long long)p.nsplit, (long long)p.items_per_split);
    for (int64_t j = 0; j < p.nsplit; ++j)
      std::printf("%lld %lld\n", (long long)split_begin(p, j), (long long)split_end(p, j, n));
    return 0;
  }
  if (cmd == "absrows" && argc == 5) {
    std::printf("%lld\n", (long long)abs_gemm_rows_per_item(arg(argv, 2), arg(argv, 3), arg(argv, 4)));
    return 0;
  }
  if (cmd == "linear" && argc == 8) {
    const std::string dir = argv[2];
    const int64_t N = arg(argv, 3), P = arg(argv, 4), I = arg(argv, 5), O = arg(argv, 6), target = arg(argv, 7);
    const auto a = read_bin<float>(dir + "/a.bin", N * P * I);
    const auto g = read_bin<float>(dir + "/g.bin", N * P * O);
    std::vector<float> w(O * I, 0.f), b(O, 0.f);
    const GemmGeometry geo = linear_geometry(N, P, I, O, target);
    emulate_gemm(geo, g.data(), a.data(), w.data());
    emulate_bias(bias_geometry(geo, true, O, target), g.data(), b.data());
    write_bin(dir + "/w.bin", w);
    write_bin(dir + "/b.bin", b);
    std::printf("items %lld positions %lld nsplit %lld grid %lld %lld %lld\n", (long long)geo.n_items,
                (long long)geo.positions, (long long)geo.plan.nsplit, (long long)geo.grid_x, (long long)geo.grid_y,
                (long long)geo.grid_z);
    return 0;
  }
  if (cmd == "conv" && argc == 24) {
    const std::string dir = argv[2];
    const int64_t N = arg(argv, 3);
    const ConvShape c = conv_shape(argv, 7, arg(argv, 4), arg(argv, 5), arg(argv, 6));
    const int64_t target = arg(argv, 22), budget = arg(argv, 23);
    const int64_t L = conv_out_volume(c), R = conv_cols_rows(c), in = c.C * conv_in_volume(c);
    const auto x = read_bin<float>(dir + "/a.bin", N * in);
    const auto g = read_bin<float>(dir + "/g.bin", N * c.O * L);
    std::vector<float> w(c.O * R / c.groups, 0.f), b(c.O, 0.f);
    emulate_bias(bias_geometry(conv_chunk_geometry(c, N, target), false, c.O, target), g.data(), b.data());
    const int64_t S = conv_chunk_samples(c, N, budget);
    std::vector<float> ws(conv_workspace_elems(c, S), -7.f);  // stale values must all be overwritten
    int chunks = 0;
    for (int64_t c0 = 0; c0 < N; c0 += S, ++chunks) {
      const int64_t sn = min64(S, N - c0);
      for (int64_t e = 0; e < conv_workspace_elems(c, sn); ++e) {  // the im2col kernel's flat loop
        const int64_t l = e % L, rs = e / L, r = rs % R, s = rs / R;
        const int64_t off = im2col_offset(c, r, l);
        ws[e] = off >= 0 ? x[(c0 + s) * in + off] : 0.f;
      }
      emulate_gemm(conv_chunk_geometry(c, sn, target), g.data() + c0 * c.O * L, ws.data(), w.data());
    }
    write_bin(dir + "/w.bin", w);
    write_bin(dir + "/b.bin", b);
    std::printf("chunk %lld chunks %d\n", (long long)S, chunks);
    return 0;
  }
  if (cmd == "tied" && argc == 9) {
    const std::string dir = argv[2];
    const int64_t N = arg(argv, 3), P = arg(argv, 4), D = arg(argv, 5), V = arg(argv, 6), Q = arg(argv, 7),
                  target = arg(argv, 8);
    const auto a = read_bin<float>(dir + "/a.bin", N * P * D);
    const auto g = read_bin<float>(dir + "/g.bin", N * P * V);
    const auto idx = read_bin<int64_t>(dir + "/idx.bin", N * Q);
    const auto rows = read_bin<float>(dir + "/rows.bin", N * Q * D);
    std::vector<float> w(V * D, 0.f);
    emulate_gemm(tied_geometry(N, P, D, V, target), g.data(), a.data(), w.data(), idx.data(), rows.data(), Q);
    write_bin(dir + "/w.bin", w);
    return 0;
  }
  return usage();
}
