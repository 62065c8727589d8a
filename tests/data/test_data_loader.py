"""Batching and the threaded loader: padding masks, determinism, shuffling, early exit."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from minidetr.data.coco import CocoDetection, DatasetError
from minidetr.data.loader import DataLoader, collate, epoch_order, sample_rng
from minidetr.data.shapes import generate_shapes_dataset
from minidetr.data.transforms import make_transforms


class FakeDataset:
    """Image sizes depend on the index, pixel values on the generator; some samples are slow,
    so that worker threads finish out of order."""

    def __init__(self, n=10, fail_at=None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def get(self, index, rng):
        if index == self.fail_at:
            raise DatasetError(f"image id {index}: cannot decode")
        time.sleep(0.003 * ((index * 7) % 3))
        h, w = 4 + index % 3, 5 + (index * 2) % 4
        image = rng.normal(size=(3, h, w)).astype(np.float32)
        return image, {"image_id": index, "boxes": rng.random((index % 3, 4), np.float32),
                       "labels": np.zeros(index % 3, np.int64)}


def _batches(loader, epoch):
    return [(b.images.copy(), b.mask.copy(), [t["image_id"] for t in b.targets],
             [t["boxes"].copy() for t in b.targets]) for b in loader.iter_epoch(epoch)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ma, ida, ba), (ib, mb, idb, bb) in zip(a, b):
        assert ida == idb
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
        for x, y in zip(ba, bb):
            np.testing.assert_array_equal(x, y)


def test_collate_pads_bottom_right_with_a_mask():
    a = np.ones((3, 2, 5), np.float32)
    b = np.full((3, 4, 3), 2, np.float32)
    batch = collate([(a, {"image_id": 1}), (b, {"image_id": 2})])
    images, mask, targets = batch
    assert images.shape == (2, 3, 4, 5) and images.dtype == np.float32
    assert mask.shape == (2, 4, 5) and mask.dtype == bool
    np.testing.assert_array_equal(images[0, :, :2, :], a)
    np.testing.assert_array_equal(images[1, :, :, :3], b)
    assert not images[0, :, 2:, :].any() and not images[1, :, :, 3:].any()   # zero padding
    expected = np.ones((2, 4, 5), bool)
    expected[0, :2, :5] = False
    expected[1, :4, :3] = False
    np.testing.assert_array_equal(mask, expected)
    assert [t["image_id"] for t in targets] == [1, 2]
    with pytest.raises(ValueError, match="sample 0 image must be a \\(3, H, W\\) array"):
        collate([(np.zeros((4, 4)), {})])


def test_threads_do_not_change_results():
    """num_workers 0, 1 and 3 give identical batches, whatever order threads finish in."""
    ds = FakeDataset(11)
    runs = [_batches(DataLoader(ds, 3, shuffle=True, seed=5, num_workers=k), epoch)
            for k in (0, 1, 3) for epoch in (0, 1)]
    for k in (1, 2):
        _assert_same(runs[0], runs[2 * k])          # epoch 0
        _assert_same(runs[1], runs[2 * k + 1])      # epoch 1
    # another epoch: another order and other augmentation draws
    assert [ids for _, _, ids, _ in runs[0]] != [ids for _, _, ids, _ in runs[1]]


def test_each_sample_draws_from_its_own_generator():
    ds = FakeDataset(6)
    loader = DataLoader(ds, 2, shuffle=True, seed=3, num_workers=2)
    for images, mask, targets in loader.iter_epoch(4):
        for b, t in enumerate(targets):
            expected, _ = ds.get(t["image_id"], sample_rng(3, 4, t["image_id"]))
            _, h, w = expected.shape
            np.testing.assert_array_equal(images[b, :, :h, :w], expected)
            assert not mask[b, :h, :w].any()


def test_shuffle_order_comes_from_seed_and_epoch():
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    orders = {(s, e): tuple(epoch_order(50, s, e)) for s in (0, 1) for e in (0, 1)}
    assert len(set(orders.values())) == 4                          # all different
    assert tuple(epoch_order(50, 0, 1)) == orders[(0, 1)]          # and reproducible
    assert sorted(orders[(1, 1)]) == list(range(50))               # a permutation
    # the shuffle stream and the sample streams are independent generators
    draws = {sample_rng(0, 0, 1).integers(1 << 30), sample_rng(0, 1, 0).integers(1 << 30),
             sample_rng(1, 0, 0).integers(1 << 30), sample_rng(0, 0, 0).integers(1 << 30)}
    assert len(draws) == 4


@pytest.mark.parametrize("drop_last, expected_sizes", [(False, [3, 3, 3, 1]),
                                                       (True, [3, 3, 3])])
def test_len_and_drop_last(drop_last, expected_sizes):
    loader = DataLoader(FakeDataset(10), 3, shuffle=True, drop_last=drop_last, num_workers=2)
    sizes = [len(b.targets) for b in loader]
    assert sizes == expected_sizes and len(loader) == len(expected_sizes)
    seen = [t["image_id"] for b in loader.iter_epoch(0) for t in b.targets]
    assert len(set(seen)) == len(seen) == sum(expected_sizes)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_rest_of_an_epoch_equals_its_tail(num_workers):
    """Resuming mid-epoch: iter_epoch(e, k) gives exactly batches k, k+1, ... of epoch e."""
    loader = DataLoader(FakeDataset(10), 3, shuffle=True, seed=4, num_workers=num_workers)
    whole = _batches(loader, 2)
    for first_step in range(len(loader) + 1):
        rest = [(b.images, b.mask, [t["image_id"] for t in b.targets])
                for b in loader.iter_epoch(2, first_step)]
        assert len(rest) == len(whole) - first_step
        for (images, mask, ids), (w_images, w_mask, w_ids, _) in zip(rest, whole[first_step:]):
            assert ids == w_ids
            np.testing.assert_array_equal(images, w_images)
            np.testing.assert_array_equal(mask, w_mask)
    with pytest.raises(ValueError, match="first_step must be in 0..4"):
        next(loader.iter_epoch(0, 5))


def test_iterating_advances_the_epoch():
    loader = DataLoader(FakeDataset(8), 4, shuffle=True, seed=1, num_workers=0)
    first = [t["image_id"] for b in loader for t in b.targets]
    second = [t["image_id"] for b in loader for t in b.targets]
    assert loader.epoch == 2 and first != second
    loader.set_epoch(0)
    assert [t["image_id"] for b in loader for t in b.targets] == first


def test_stopping_early_releases_the_threads():
    before = threading.active_count()
    loader = DataLoader(FakeDataset(40), 2, num_workers=3, prefetch_batches=2)
    it = iter(loader)
    next(it)
    it.close()                                   # what a `break` does when the loop ends
    assert threading.active_count() == before


def test_worker_errors_reach_the_caller():
    loader = DataLoader(FakeDataset(9, fail_at=5), 2, num_workers=2)
    with pytest.raises(DatasetError, match="image id 5: cannot decode"):
        for _ in loader:
            pass


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(FakeDataset(), 0)
    with pytest.raises(ValueError, match="num_workers"):
        DataLoader(FakeDataset(), 2, num_workers=-1)
    with pytest.raises(TypeError, match=r"get\(index, rng\)"):
        DataLoader([1, 2, 3], 2)


def test_shapes_dataset_through_the_loader(tmp_path):
    paths = generate_shapes_dataset(tmp_path / "shapes", num_train=6, num_val=2,
                                    image_size=(64, 64))
    ds = CocoDetection(*paths.split("train"), transforms=make_transforms("train", "tiny"),
                       label_map="contiguous")
    loader = DataLoader(ds, 4, shuffle=True, seed=0, num_workers=2)
    batches = list(loader)
    assert [len(b.targets) for b in batches] == [4, 2]
    for images, mask, targets in batches:
        assert images.dtype == np.float32 and mask.dtype == bool
        for b, t in enumerate(targets):
            h, w = t["size"]
            assert (~mask[b]).sum() == h * w and not mask[b, :h, :w].any()
            assert t["boxes"].shape == (len(t["labels"]), 4)
            assert np.all((t["boxes"] >= 0) & (t["boxes"] <= 1))
            assert np.all(t["labels"] >= 0) and np.all(t["labels"] < 5)
