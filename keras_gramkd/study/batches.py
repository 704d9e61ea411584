"""Seeded batch order: every method of a study sees the same batches."""

import math

import keras
import numpy as np


class SeededBatches(keras.utils.PyDataset):
    """`num_batches` batches per epoch in an order drawn from `seed`.

    Each epoch is a fresh permutation (repeated if the data is shorter than
    `batch_size * num_batches`), so two runs with the same seed see the same
    samples in the same batches, epoch after epoch, whatever they train.

    Args:
        x: dict name -> array (n, ...).
        y: array (n, ...).
        batch_size: rows per batch.
        num_batches: batches per epoch (default: one pass, `ceil(n / batch)`).
        seed: seed of the order.

    Example:

    >>> import numpy as np
    >>> x, y = {"a": np.arange(10.0)[:, None]}, np.arange(10)
    >>> first = SeededBatches(x, y, 4, seed=0)[0][1]
    >>> bool((first == SeededBatches(x, y, 4, seed=0)[0][1]).all()), len(first)
    (True, 4)
    """

    def __init__(self, x, y, batch_size, num_batches=None, seed=0):
        super().__init__()
        self.x, self.y = x, y
        n = len(y)
        self.batch_size = int(batch_size)
        self._num_batches = num_batches or math.ceil(n / self.batch_size)
        self.rng = np.random.default_rng(seed)
        self._next_order()

    def _next_order(self):
        n, need = len(self.y), self.batch_size * self._num_batches
        parts = [self.rng.permutation(n) for _ in range(math.ceil(need / n))]
        self.order = np.concatenate(parts)[:need]

    def __len__(self):
        return self._num_batches

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return {k: v[idx] for k, v in self.x.items()}, self.y[idx]

    def on_epoch_end(self):
        self._next_order()
