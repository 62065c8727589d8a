"""Batches: zero padding with a mask, and a loader that decodes in background threads.

``collate`` pads images of different sizes to the largest height and width of the batch
(zeros at the bottom and the right, as the official ``NestedTensor``) and returns the
padding mask, True on padded pixels.

``DataLoader`` yields those batches. Worker threads (``concurrent.futures``) decode and
augment the next samples while the model trains on the current batch; at most
``prefetch_batches`` batches are in flight, so memory stays bounded. JPEG decoding and
resizing in Pillow release the GIL, so threads really run in parallel.

Determinism: the order of an epoch comes from ``(seed, epoch)`` and every sample draws its
augmentation from its own generator made from ``(seed, epoch, index)``. Which thread finishes
first therefore never changes a batch: ``num_workers=0`` and ``num_workers=4`` give the same
arrays.

Shapes:
    Batch.images   (B, 3, H, W) float32, H = max_b H_b, W = max_b W_b
    Batch.mask     (B, H, W) bool, True = padding
    Batch.targets  list of B target dicts (boxes normalised by each unpadded image size)
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

# Tags that keep the generators for shuffling and for samples apart (see sample_rng).
_SHUFFLE_STREAM = 0
_SAMPLE_STREAM = 1


def sample_rng(seed, epoch, index):
    """The generator of sample ``index`` in ``epoch``: a pure function of the three ints."""
    return np.random.default_rng(
        np.random.SeedSequence(int(seed), spawn_key=(_SAMPLE_STREAM, int(epoch), int(index))))


def epoch_order(num_samples, seed, epoch, shuffle=True):
    """Sample indices in the order of ``epoch``: a permutation drawn from ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(num_samples)
    rng = np.random.default_rng(
        np.random.SeedSequence(int(seed), spawn_key=(_SHUFFLE_STREAM, int(epoch))))
    return rng.permutation(num_samples)


class Batch(NamedTuple):
    images: np.ndarray      # (B, 3, H, W) float32
    mask: np.ndarray        # (B, H, W) bool, True = padding
    targets: list           # B dicts


def collate(samples):
    """Stack ``[(image (3, H_b, W_b), target), ...]`` into a zero-padded :class:`Batch`."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    images = [img for img, _ in samples]
    for b, img in enumerate(images):
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[0] == 3):
            raise ValueError(f"collate: sample {b} image must be a (3, H, W) array (did the "
                             f"transforms end with Normalize?), got "
                             f"{getattr(img, 'shape', type(img).__name__)}")
    H = max(img.shape[1] for img in images)
    W = max(img.shape[2] for img in images)
    B = len(images)
    batch = np.zeros((B, 3, H, W), dtype=images[0].dtype)     # (B, 3, H, W)
    mask = np.ones((B, H, W), dtype=bool)                      # (B, H, W)
    for b, img in enumerate(images):
        _, h, w = img.shape
        batch[b, :, :h, :w] = img
        mask[b, :h, :w] = False
    return Batch(batch, mask, [t for _, t in samples])


class DataLoader:
    """Iterate a dataset in (shuffled) batches, decoding ahead in worker threads.

    Args:
        dataset: anything with ``len(dataset)`` and ``dataset.get(index, rng)``
            (e.g. :class:`~minidetr.data.coco.CocoDetection`).
        batch_size: images per batch (B).
        shuffle: a new permutation every epoch, drawn from ``(seed, epoch)``.
        seed: the integer every random choice derives from.
        drop_last: drop the last, incomplete batch.
        num_workers: decoding threads; 0 loads in the calling thread (easiest to debug).
        prefetch_batches: how many batches may be decoded ahead of the consumer.
        collate_fn: turns a list of samples into a batch (default :func:`collate`).

    ``for batch in loader`` runs epoch ``loader.epoch`` and then advances it by one;
    ``loader.set_epoch(e)`` or ``loader.iter_epoch(e)`` pick an epoch explicitly, and
    ``loader.iter_epoch(e, first_step)`` the rest of one (resuming mid-epoch).
    """

    def __init__(self, dataset, batch_size, *, shuffle=False, seed=0, drop_last=False,
                 num_workers=2, prefetch_batches=2, collate_fn=collate):
        if int(batch_size) <= 0:
            raise ValueError(f"DataLoader: batch_size must be positive, got {batch_size}")
        if int(num_workers) < 0 or int(prefetch_batches) <= 0:
            raise ValueError(f"DataLoader: need num_workers >= 0 and prefetch_batches > 0, got "
                             f"{num_workers}, {prefetch_batches}")
        if not hasattr(dataset, "get"):
            raise TypeError(f"DataLoader: the dataset must have a get(index, rng) method, "
                            f"{type(dataset).__name__} has none")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.prefetch_batches = int(prefetch_batches)
        self.collate_fn = collate_fn
        self.epoch = 0

    def __len__(self):
        n, B = len(self.dataset), self.batch_size
        return n // B if self.drop_last else -(-n // B)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def batch_indices(self, epoch):
        """The dataset indices of every batch of ``epoch``, as a list of int arrays."""
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        B = self.batch_size
        return [order[i:i + B] for i in range(0, len(self) * B, B)]

    def _load(self, index, epoch):
        return self.dataset.get(int(index), sample_rng(self.seed, epoch, index))

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch, first_step=0):
        """Yield the batches of ``epoch`` from batch ``first_step`` on (a generator;
        stopping early is fine).

        ``first_step > 0`` resumes an interrupted epoch: every sample still draws its
        augmentation from ``(seed, epoch, index)``, so these batches are exactly the
        ones the uninterrupted epoch would have had.
        """
        if not 0 <= int(first_step) <= len(self):
            raise ValueError(f"DataLoader.iter_epoch: first_step must be in 0..{len(self)}, "
                             f"got {first_step}")
        batches = self.batch_indices(epoch)[int(first_step):]
        if self.num_workers == 0:
            for indices in batches:
                yield self.collate_fn([self._load(i, epoch) for i in indices])
            return

        queue = collections.deque(int(i) for indices in batches for i in indices)
        pending = collections.deque()                 # futures in sample order (bounded)
        max_pending = self.prefetch_batches * self.batch_size
        executor = ThreadPoolExecutor(max_workers=self.num_workers,
                                      thread_name_prefix="minidetr-data")
        try:
            def fill():
                while queue and len(pending) < max_pending:
                    pending.append(executor.submit(self._load, queue.popleft(), epoch))

            fill()
            for indices in batches:
                samples = [pending.popleft().result() for _ in indices]
                fill()                                # decode ahead while we train
                yield self.collate_fn(samples)
        finally:
            for future in pending:
                future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def __repr__(self):
        return (f"DataLoader({len(self.dataset)} samples, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"num_workers={self.num_workers})")
