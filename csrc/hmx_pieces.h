// The piece table of blocked mixing for the CUDA kernels, built on the host (plain C++: no torch,
// no CUDA headers; the binding builds it and copies it to the device, tests read it on the CPU).
//
// A sequence (the batch row, or a packed sequence [cu[s], cu[s + 1])) is cut into blocks of
// chunk_size tokens (0: one block); blocks are numbered in token order over all sequences (an empty
// sequence has none). A piece is a token range inside one block of at most piece_len tokens, cut
// from the block's start, so a long block still spreads over several thread blocks; pieces are
// numbered in token order, so a block's pieces are consecutive. The same table as the Triton
// backend's (hmx_kernels/triton/launch.py _Blocks), with its own piece length.
//
// One int32 array, four parts (PieceTable offsets):
//   pieces     [n_pieces][4]: (start, end, block, first token of the block's sequence)
//   block_piece [nb + 1]:     first piece of block j; block_piece[nb] = n_pieces
//   seq_first  [nb]:          first block of block j's sequence
//   seq_last   [nb]:          last block of block j's sequence
#pragma once
#include <cstdint>
#include <vector>

namespace hmx {

struct PieceTable {
  std::vector<int32_t> data;
  int64_t n_pieces = 0;
  int64_t nb = 0;
  int64_t longest = 0;  // blocks of the longest sequence
  int64_t pieces_at() const { return 0; }
  int64_t block_piece_at() const { return 4 * n_pieces; }
  int64_t seq_first_at() const { return 4 * n_pieces + nb + 1; }
  int64_t seq_last_at() const { return 4 * n_pieces + 2 * nb + 1; }
};

// N tokens; cu: num_seqs + 1 offsets (nullptr: one sequence of N tokens); piece_len >= 1.
inline PieceTable build_piece_table(int64_t N, int64_t chunk_size, const int64_t* cu, int64_t num_seqs,
                                    int64_t piece_len) {
  const int64_t one[2] = {0, N};
  if (cu == nullptr) {
    cu = one;
    num_seqs = 1;
  }
  std::vector<int32_t> pieces, block_piece, seq_first, seq_last;
  PieceTable t;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t start = cu[s], len = cu[s + 1] - cu[s];
    const int64_t step = chunk_size > 0 ? chunk_size : (len > 0 ? len : 1);
    const int64_t nbs = (len + step - 1) / step;
    const int64_t first = t.nb;
    for (int64_t i = 0; i < nbs; ++i) {
      const int64_t b0 = start + i * step, b1 = b0 + step < start + len ? b0 + step : start + len;
      block_piece.push_back((int32_t)(pieces.size() / 4));
      for (int64_t r = b0; r < b1; r += piece_len) {
        const int64_t e = r + piece_len < b1 ? r + piece_len : b1;
        pieces.insert(pieces.end(), {(int32_t)r, (int32_t)e, (int32_t)(t.nb + i), (int32_t)start});
      }
      seq_first.push_back((int32_t)first);
      seq_last.push_back((int32_t)(first + nbs - 1));
    }
    t.nb += nbs;
    t.longest = nbs > t.longest ? nbs : t.longest;
  }
  t.n_pieces = (int64_t)pieces.size() / 4;
  block_piece.push_back((int32_t)t.n_pieces);
  t.data = pieces;
  t.data.insert(t.data.end(), block_piece.begin(), block_piece.end());
  t.data.insert(t.data.end(), seq_first.begin(), seq_first.end());
  t.data.insert(t.data.end(), seq_last.begin(), seq_last.end());
  return t;
}

}  // namespace hmx
