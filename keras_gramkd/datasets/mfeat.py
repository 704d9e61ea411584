"""UCI "Multiple Features" handwritten digits: real data with six views.

2,000 handwritten digits (classes 0-9, 200 each), each described by six feature
sets ("views") computed from the same scanned digit:

- ``pix`` (240): pixel averages in 2x3 windows, a 16 rows x 15 columns image,
  values 0-6, stored row by row;
- ``fou`` (76): Fourier coefficients of the character shape;
- ``fac`` (216): profile correlations;
- ``kar`` (64): Karhunen-Loeve coefficients;
- ``zer`` (47): Zernike moments;
- ``mor`` (6): morphological features.

The data ships inside the package (``mfeat.npz``), so it loads with no network.

Attribution (the data is licensed CC BY 4.0; this notice must travel with any
copy): UCI Machine Learning Repository, "Multiple Features" data set, donated by
R.P.W. Duin; described in M. van Breukelen, R.P.W. Duin, D.M.J. Tax,
J.E. den Hartog, "Handwritten digit recognition by combined classifiers",
Kybernetika 34(4):381-386, 1998. https://creativecommons.org/licenses/by/4.0/
The arrays were converted, unchanged in value, from the CSV copy of the data set.
"""

import numbers
from importlib import resources

import numpy as np

MFEAT_VIEWS = ("pix", "fou", "fac", "kar", "zer", "mor")
"""Names of the six views, in their canonical order."""

MFEAT_IMAGE_SHAPE = (16, 15, 1)
"""Shape of one ``pix`` sample when loaded with ``pix_as_image=True``."""

_STD_FLOOR = 1e-8


def _read_npz():
    """Reads the vendored arrays; works from a source tree or an installed wheel."""
    ref = resources.files(__package__).joinpath("mfeat.npz")
    with ref.open("rb") as f, np.load(f) as data:
        return {key: data[key] for key in data.files}


def check_views(views):
    """The view names to use: all of `MFEAT_VIEWS` for None, else checked
    (a string may list several, comma-separated, as the CLIs take them).

    >>> check_views("fou,mor")
    ('fou', 'mor')
    """
    if views is None:
        return MFEAT_VIEWS
    if isinstance(views, str):
        views = [v for v in views.split(",") if v]
    views = tuple(views)
    if not views:
        raise ValueError(
            f"`views` must name at least one view; valid views: {MFEAT_VIEWS}."
        )
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if unknown:
        raise ValueError(
            f"Unknown view(s) {unknown} in `views`; valid views: {MFEAT_VIEWS}."
        )
    if len(set(views)) != len(views):
        raise ValueError(f"`views` has duplicates: {views}.")
    return views


def stratified_split(labels, test_size, rng):
    """Shuffled (train, test) indices with `test_size` of each class in test.

    Every class keeps at least one row on each side.

    >>> import numpy as np
    >>> labels = np.repeat([0, 1], 10)
    >>> train, test = stratified_split(labels, 0.2, np.random.default_rng(0))
    >>> len(train), len(test), sorted(labels[test].tolist())
    (16, 4, [0, 0, 1, 1])
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.clip(round(test_size * idx.size), 1, idx.size - 1))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _standardize(train, test):
    """Standardises columns with training statistics only (constant columns: std 1)."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return (
        ((train - mean) / std).astype(np.float32),
        ((test - mean) / std).astype(np.float32),
    )


def load_mfeat(views=None, test_size=0.5, seed=0, pix_as_image=False):
    """Loads the embedded UCI "Multiple Features" digits, split and standardised.

    The split is stratified: every class is split in the same proportion (at least
    one sample of each class on each side), and both splits are shuffled, so the
    arrays are not ordered by class. Each view is standardised per feature column
    with the mean and standard deviation of the TRAINING split only; a column that
    is constant on the training split is only centred (its std is taken as 1).

    Args:
        views: view names to load, a subset of `MFEAT_VIEWS`, returned in the
            given order. `None` (default) loads all six in canonical order.
        test_size: fraction of each class put in the test split, in (0, 1).
        seed: integer seed of the split; the same seed gives the same split.
        pix_as_image: if True, `pix` is returned as images of shape
            `(n, 16, 15, 1)` (16 rows of 15 columns), standardised per pixel
            like the flat vector; otherwise `(n, 240)`.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: each `x` a dict view name ->
        float32 array of shape `(n, n_features)`, each `y` an int32 array of
        digit labels of shape `(n,)`.

    Example:

    >>> (x_train, y_train), (x_test, y_test) = load_mfeat(views=["pix", "mor"])
    >>> list(x_train), x_train["pix"].shape, x_test["mor"].shape
    (['pix', 'mor'], (1000, 240), (1000, 6))
    >>> (x_train, _), _ = load_mfeat(views=["pix"], pix_as_image=True)
    >>> x_train["pix"].shape
    (1000, 16, 15, 1)
    """
    views = check_views(views)
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise ValueError(f"`test_size` must be a number in (0, 1); got {test_size!r}.")
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"`test_size` must be in (0, 1) (exclusive); got {test_size}.")

    data = _read_npz()
    labels = data["label"].astype(np.int32)
    train_idx, test_idx = stratified_split(
        labels, float(test_size), np.random.default_rng(seed)
    )

    x_train, x_test = {}, {}
    for name in views:
        train, test = _standardize(data[name][train_idx], data[name][test_idx])
        if name == "pix" and pix_as_image:
            train = train.reshape((-1, *MFEAT_IMAGE_SHAPE))
            test = test.reshape((-1, *MFEAT_IMAGE_SHAPE))
        x_train[name], x_test[name] = train, test
    return (x_train, labels[train_idx]), (x_test, labels[test_idx])
