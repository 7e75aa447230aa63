import numpy as np

from raystages.data.packing import pack


def test_pack_joins_documents_with_eos_and_drops_the_short_tail():
    blocks = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    blocks = pack([[1, 2, 3, 4]], eos_id=0, seq_len=3)
    assert blocks.tolist() == [[1, 2, 3]]  # "4, eos" is a partial block: dropped
    assert pack([[1]], eos_id=0, seq_len=8).shape == (0, 8)
    assert blocks.dtype == np.int64


def test_mlm_blocks_open_with_cls_and_separate_documents_with_sep():
    # [CLS]=9, [SEP]=0: every block is CLS + seq_len - 1 tokens of the SEP-joined stream.
    blocks = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=4, bos_id=9)
    assert blocks.tolist() == [[9, 1, 2, 3], [9, 0, 4, 5], [9, 0, 6, 0]]
    assert pack([[1, 2]], eos_id=0, seq_len=4, bos_id=9).shape == (1, 4)
    assert pack([[1]], eos_id=0, seq_len=4, bos_id=9).shape == (0, 4)
