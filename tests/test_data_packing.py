"""Packing: rows stay fixed-length, every document is placed once, and no token attends across
documents (a packed row's logits equal each document run alone through a tiny llama)."""
import glob
import os

import numpy as np
import pytest
import torch

from data import build_dataset
from data.packing import IGNORE, pack_rows
from tests.tokenizer_util import EXAMPLE_DATA

SEQ = 256  # the tiny llama's max_position_embeddings


def test_pack_rows_places_every_document_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    row_ptr, order = pack_rows(lengths, 128)
    assert sorted(order.tolist()) == list(range(500))
    fills = [lengths[order[a:b]].sum() for a, b in zip(row_ptr[:-1], row_ptr[1:])]
    assert max(fills) <= 128
    assert len(fills) <= int(np.ceil(lengths.sum() / 128 * 1.05)), "best-fit should waste little space"
    with pytest.raises(ValueError):
        pack_rows([129], 128)


@pytest.fixture(scope="module")
def packed(tiny_tokenizer):
    paths = sorted(glob.glob(os.path.join(EXAMPLE_DATA, "*.json*")))
    return (build_dataset(paths, tiny_tokenizer, SEQ, packing=True),
            build_dataset(paths, tiny_tokenizer, SEQ, packing=False))


def test_packing_keeps_every_token_and_label(packed):
    pk, plain = packed
    assert pk.stats["tokens"] == plain.stats["tokens"] and pk.stats["loss_tokens"] == plain.stats["loss_tokens"]
    assert len(pk) < len(plain) and pk.stats["padding"] < plain.stats["padding"]
    for i in range(len(pk)):
        row = pk[i]
        assert all(v.shape == (SEQ,) and v.dtype == np.int64 for v in row.values())
        assert int((row["labels"] != IGNORE).sum()) == pk.n_loss_tokens[i]
        assert int((row["input_ids"] != pk.pad_id).sum()) == pk.n_tokens[i]


def tiny_llama(packed_attention: bool):
    from models import llama
    from models.attention import AttnOptions
    from models.block_base import LayerOptions
    from models.pipeline import SequentialModel

    torch.manual_seed(0)
    args = llama.Args.from_hf_config(llama.tiny_hf_config())
    return SequentialModel(llama, args, LayerOptions(attn=AttnOptions(packed=packed_attention))).eval()


def documents(row):
    """(start, end) of each document: position ids restart at 0."""
    starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [SEQ]
    return list(zip(starts[:-1], starts[1:]))


@torch.no_grad()
def test_packed_row_logits_equal_each_document_alone(packed):
    pk, _ = packed
    row_index = max(range(len(pk)), key=lambda i: len(documents(pk[i])))
    row = pk[row_index]
    docs = documents(row)[:-1] if row["input_ids"][-1] == pk.pad_id else documents(row)
    assert len(docs) >= 2
    ids, pos = (torch.from_numpy(row[k])[None] for k in ("input_ids", "position_ids"))
    model = tiny_llama(packed_attention=True)
    packed_logits = model(ids, pos)
    for a, b in docs:
        alone = model(ids[:, a:b])
        torch.testing.assert_close(packed_logits[:, a:b], alone, rtol=1e-4, atol=1e-4)
    # the check has teeth: without the document mask, later documents see earlier ones
    leaky = tiny_llama(packed_attention=False)(ids, pos)
    a, b = docs[-1]
    assert not torch.allclose(leaky[:, a:b], model(ids[:, a:b]), atol=1e-3)


def test_labels_never_cross_a_document_or_enter_padding(packed):
    pk, _ = packed
    for i in range(len(pk)):
        row = pk[i]
        for a, b in documents(row):
            assert row["labels"][b - 1] == IGNORE
            supervised = np.flatnonzero(row["labels"][a:b] != IGNORE)
            np.testing.assert_array_equal(row["labels"][a:b][supervised], row["input_ids"][a + 1:b][supervised])
