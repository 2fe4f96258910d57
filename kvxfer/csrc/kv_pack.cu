// kv_pack.cu: gather paged KV blocks of many layers into one contiguous chunk, and
// scatter a chunk back, in a single launch each.
//
// Theory of operation
// -------------------
// The host describes the copy as R regions (one per (layer, part), in packed order), B
// block ids, and a segment geometry shared by every block:
//
//   region r (engine memory)                        packed chunk (contiguous)
//   base[r] + id*stride[r]                          +------------------------------+
//   |                                               | r=0 b=0 seg0 seg1 .. seg(S-1)|
//   v   seg_off        seg_pitch                    | r=0 b=1 seg0 ...             |
//   [...|seg0 bytes|...|seg1 bytes|...]  block id   |  ...                         |
//        <seg_bytes>                                | r=1 b=0 seg0 ...             |
//                                                   +------------------------------+
//   packed offset of (r, b, s) = ((r*B + b)*S + s) * seg_bytes
//
// A whole block is one segment (S=1, seg_off=0, seg_bytes=block_bytes). A head slice
// [h0, h1) of an NHD block is S=block_size segments, one per token, each the slice's
// heads (seg_pitch = heads*head_dim*elem); of an HND block it is one segment (the
// heads are contiguous). Each "row" (r, b, s) is one segment to move.
//
// Access width. Every thread moves W-byte words, W in {16, 8, 4, 2, 1}: the host picks
// the largest W dividing every base, stride, seg_off, seg_pitch, seg_bytes and the
// packed pointer, so a row is seg_bytes/W whole words on both sides and needs no
// head/tail split. (Packed segments sit back to back, so a seg_bytes that is not a
// multiple of 16 misaligns every following packed segment: the odd remainder is
// handled by a narrower width for the whole launch, which is always correct; real KV
// blocks, head_dim*elem a multiple of 16, take the 16-byte path.)
//
// Work split. A CTA of blockDim threads is cut into groups of TPR threads (TPR = the
// power of two >= words per row, at most blockDim); each group takes one row at a time,
// grid-striding over rows, and its threads stride over the row's words, keeping
// UNROLL independent loads in flight before the stores. Row decoding (two divisions)
// happens once per row, not per word.
//
// The packed pointer may be device memory or a mapped pinned-host pointer (the host
// passes cudaHostGetDevicePointer of it). Pointers arrive as 64-bit integers so the
// launch needs no array objects; both live in the global state space, which the
// kernel tells the compiler so it emits LDG/STG. No headers are included: this file compiles as is
// with NVRTC (the runtime path) and with nvcc -cubin (CI).

#define KV_UNROLL 4

typedef ulonglong2 kv_w16;  // CUDA's built-in vector types: NVRTC needs no header
typedef unsigned long long kv_w8;
typedef unsigned int kv_w4;
typedef unsigned short kv_w2;
typedef unsigned char kv_w1;

// Move the words of every row; GATHER: engine blocks -> packed, else packed -> blocks.
template <typename Word, bool GATHER>
__device__ __forceinline__ void kv_copy_rows(
    unsigned long long table_addr,  // u64[2*R]: region bases, then block strides (bytes)
    unsigned long long ids_addr,    // i64[B]: block ids, in packed order
    unsigned long long packed_addr, // the packed chunk (device or mapped pinned host)
    int num_regions, int num_ids, int num_segs,
    long long seg_off, long long seg_pitch, long long seg_bytes) {
  const long long words = seg_bytes / (long long)sizeof(Word);
  int tpr = 1;
  while (tpr < words && tpr < (int)blockDim.x) tpr <<= 1;
  const int groups = (int)blockDim.x / tpr;
  const int lane = (int)threadIdx.x % tpr;
  const int group = (int)threadIdx.x / tpr;
  const long long rows = (long long)num_regions * num_ids * num_segs;
  const long long row_step = (long long)gridDim.x * groups;
  const unsigned long long* __restrict__ table =
      reinterpret_cast<const unsigned long long*>(table_addr);
  const long long* __restrict__ ids = reinterpret_cast<const long long*>(ids_addr);
  Word* const packed = reinterpret_cast<Word*>(packed_addr);

  for (long long row = (long long)blockIdx.x * groups + group; row < rows; row += row_step) {
    const long long rb = row / num_segs;
    const long long s = row - rb * num_segs;
    const long long r = rb / num_ids;
    const long long b = rb - r * num_ids;
    const unsigned long long block_addr =
        table[r] + (unsigned long long)ids[b] * table[num_regions + r];
    Word* const blk = reinterpret_cast<Word*>(block_addr + seg_off + s * seg_pitch);
    Word* const pk = packed + row * words;
    Word* const dst = GATHER ? pk : blk;
    const Word* const src = GATHER ? blk : pk;
    // Device and mapped pinned-host memory are both in the global space: global
    // stores (STG) instead of generic ones; loads go through __ldg (LDG).
    __builtin_assume(__isGlobal(dst));
    for (long long k = lane; k < words; k += (long long)KV_UNROLL * tpr) {
      Word v[KV_UNROLL];
#pragma unroll
      for (int j = 0; j < KV_UNROLL; ++j) {
        const long long w = k + (long long)j * tpr;
        if (w < words) v[j] = __ldg(src + w);  // read-only for the launch: LDG.NC
      }
#pragma unroll
      for (int j = 0; j < KV_UNROLL; ++j) {
        const long long w = k + (long long)j * tpr;
        if (w < words) dst[w] = v[j];
      }
    }
  }
}

// One extern "C" entry point per direction and width: kv_pack_w16 ... kv_unpack_w1.
#define KV_ENTRY(NAME, W, GATHER)                                                       \
  extern "C" __global__ void NAME##_w##W(                                               \
      unsigned long long table, unsigned long long ids, unsigned long long packed,      \
      int num_regions, int num_ids, int num_segs, long long seg_off,                    \
      long long seg_pitch, long long seg_bytes) {                                       \
    kv_copy_rows<kv_w##W, GATHER>(table, ids, packed, num_regions, num_ids, num_segs,   \
                                  seg_off, seg_pitch, seg_bytes);                       \
  }
#define KV_DEFINE(W) KV_ENTRY(kv_pack, W, true) KV_ENTRY(kv_unpack, W, false)

KV_DEFINE(16)
KV_DEFINE(8)
KV_DEFINE(4)
KV_DEFINE(2)
KV_DEFINE(1)
