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


def test_packer_streams_the_blocks_that_one_pack_of_everything_gives():
    from raystages.data.packing import Packer

    docs = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11]]
    for seq_len, bos in ((3, None), (4, 9)):
        whole = pack(docs, eos_id=0, seq_len=seq_len, bos_id=bos)
        for cut in range(len(docs) + 1):
            packer = Packer(0, seq_len, bos)
            streamed = np.concatenate([packer.feed(docs[:cut]), packer.feed(docs[cut:])])
            assert streamed.tolist() == whole.tolist(), (seq_len, cut)


def test_paragraphs_read_in_chunks_split_like_the_whole_text():
    """.txt paragraphs are read a chunk at a time; any chunking gives re.split's pieces."""
    import io
    import random
    import re

    from raystages.data.sources import _paragraphs

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab \n\n\t\f") for _ in range(rng.randint(0, 30)))
        want = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        for chunk in (1, 2, 5, 64):
            assert list(_paragraphs(io.StringIO(text), chunk)) == want, (text, chunk)
    assert list(_paragraphs(io.StringIO("one\nline\n\n  \n two\n"))) == ["one\nline", " two\n"]


def test_shard_order_and_epoch_seeds_are_pure_functions_of_the_seed():
    from raystages.data.order import epoch_seed, shard_order

    files = [f"part-{i}" for i in range(6)]
    assert shard_order(files, 0) == shard_order(files, 0) != shard_order(files, 1)
    assert sorted(shard_order(files, 3)) == files
    seeds = {epoch_seed(0, e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6 and epoch_seed(0, 1, 0) == epoch_seed(0, 1, 0)
