"""StepLoader: the contract's shapes, loss normalisation, dp split, exact mid-epoch resume."""
import glob
import os

import numpy as np
import pytest
import torch

from data import StepLoader, build_dataset
from models.loss import causal_lm_loss
from tests.tokenizer_util import EXAMPLE_DATA

SEQ = 256


@pytest.fixture(scope="module", params=[False, True], ids=["padded", "packed"])
def dataset(request, tiny_tokenizer):
    paths = sorted(glob.glob(os.path.join(EXAMPLE_DATA, "*.json*")))
    return build_dataset(paths, tiny_tokenizer, SEQ, packing=request.param, weights=[2, 2, 1, 1, 3])


def loaders(dataset, dp_size, micro=2, accum=2, seed=7, epochs=3):
    return [StepLoader(dataset, micro, accum, r, dp_size, seed, epochs) for r in range(dp_size)]


def test_shapes_and_counts(dataset):
    loader = loaders(dataset, 2)[0]
    assert loader.steps_per_epoch == len(dataset) // 8 and loader.total_steps == 3 * loader.steps_per_epoch
    batches = loader.micro_batches(1)
    assert len(batches) == 2
    (ids, pos), (labels, scale) = batches[0]
    for t in (ids, pos, labels):
        assert t.shape == (2, SEQ) and t.dtype == torch.long
    assert scale.dim() == 0 and scale.dtype == torch.float32 and scale > 0


def test_dp_ranks_split_the_global_batch(dataset):
    ranks = loaders(dataset, 2)
    for step in (0, ranks[0].steps_per_epoch + 1):
        parts = [r.rank_rows(step) for r in ranks]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), ranks[0].global_rows(step))


def test_epoch_is_a_permutation_and_epochs_differ(dataset):
    loader = loaders(dataset, 1)[0]
    spe = loader.steps_per_epoch
    first = np.concatenate([loader.global_rows(s) for s in range(spe)])
    second = np.concatenate([loader.global_rows(s) for s in range(spe, 2 * spe)])
    assert len(set(first)) == len(first) == spe * 4
    assert not np.array_equal(first, second)


def test_loss_scale_matches_single_process_reference(dataset):
    """DeepSpeed's mean over micro-batches and dp ranks of sum(CE)*scale == global token mean."""
    table = torch.randn(320, 320, generator=torch.Generator().manual_seed(0))  # logits = table[token]
    ranks = loaders(dataset, 2, micro=2, accum=3)
    for step in range(ranks[0].steps_per_epoch):
        per_rank = [np.mean([causal_lm_loss(table[ids], target).item() for (ids, _), target in r.micro_batches(step)])
                    for r in ranks]
        deepspeed_style = np.mean(per_rank)
        rows = [dataset[int(i)] for i in ranks[0].global_rows(step)]
        ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]))
        labels = torch.from_numpy(np.stack([r["labels"] for r in rows]))
        reference = torch.nn.functional.cross_entropy(table[ids].flatten(0, 1), labels.flatten(), ignore_index=-100)
        assert deepspeed_style == pytest.approx(reference.item(), rel=1e-5)
        assert ranks[0].tokens(step) == int((ids != 0).sum())


def test_resume_mid_epoch_sees_exactly_the_remaining_rows(dataset):
    full = loaders(dataset, 2)
    spe, k = full[0].steps_per_epoch, full[0].steps_per_epoch // 2 + 1
    seen_before = {int(i) for s in range(k) for i in full[0].global_rows(s)}
    resumed = loaders(dataset, 2)  # fresh objects: no state carried over
    after = []
    for step in range(k, spe):
        for rank_full, rank_resumed in zip(full, resumed):
            for (a, _), (b, _) in zip(rank_full.micro_batches(step), rank_resumed.micro_batches(step)):
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        after.extend(int(i) for i in resumed[0].global_rows(step))
    assert not seen_before & set(after)
    assert len(seen_before) + len(after) == spe * full[0].global_batch
    later = spe + k  # the same in a later epoch
    np.testing.assert_array_equal(loaders(dataset, 2)[1].rank_rows(later), full[1].rank_rows(later))


def test_too_small_dataset_has_no_steps(dataset):
    loader = StepLoader(dataset, len(dataset), 1, 0, 2, 0, 1)
    assert loader.steps_per_epoch == loader.total_steps == 0
    with pytest.raises(IndexError):
        loader.micro_batches(0)
