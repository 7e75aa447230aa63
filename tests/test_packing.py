import numpy as np

from raystages.data.packing import pack


def test_pack_joins_documents_with_eos_and_drops_the_short_tail():
    blocks = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    blocks = pack([[1, 2, 3, 4]], eos_id=0, seq_len=3)
    assert blocks.tolist() == [[1, 2, 3]]  # "4, eos" is a partial block: dropped
    assert pack([[1]], eos_id=0, seq_len=8).shape == (0, 8)
    assert blocks.dtype == np.int64
