"""The demo's settings: what teacher and student see, on the embedded digits.

Every setting uses the same fixed stratified 1000/1000 split of the UCI
multiple-features digits (`SPLIT_SEED`) and says, per split, what the teacher
and the student see:

- ``clean``: both see the clean views;
- ``noisy``: the student sees every view with Gaussian noise (std `NOISE_STD`
  in standardised units), drawn fresh at every step by a noise layer in the
  student and once with a fixed seed for the test split; the teacher sees
  clean views;
- ``few-labels``: the student has `FEW_LABELS_PER_CLASS` labels per class;
  the other training rows are unlabelled (label `UNLABELLED`, the task loss's
  `ignore_class`), so the distillation terms still learn from them; the
  teacher was trained on every label;
- ``unreliable``: per sample, each view is replaced by the same view of
  another random sample with probability `SWAP_PROBABILITY`, in the training
  and the test split alike (a fixed draw). Teacher and student see the *same*
  corrupted inputs, so which views agree with which differs per sample: the
  teacher's modality Gram carries that, its logits do not. Both fuse their
  views with attention (the other settings' student concatenates them);
- ``missing``: the ``noisy`` student (on clean views, a student trained with
  modality dropout matches the teacher with a view missing: nothing to
  distil) also trains with `ModalityDropout` (each view zeroed with
  probability `MISSING_DROPOUT`) and is judged with one view missing at test
  time (the mean over views); the teacher sees every clean view.

Example:

>>> from keras_gramkd.demo.settings import load_setting
>>> data = load_setting("few-labels", views=["mor"])
>>> int((data.student_train[1] >= 0).sum()), len(data.student_train[1])
(100, 1000)
"""

import dataclasses

import keras
import numpy as np

# The names live with the command line, which lists them without keras.
from gramkd.options import DEFAULT_SETTING, SETTINGS
from keras_gramkd import zoo
from keras_gramkd.datasets import load_mfeat
from keras_gramkd.datasets.mfeat import check_views

NOISE_STD = 3.0
FEW_LABELS_PER_CLASS = 10
UNLABELLED = -1
SWAP_PROBABILITY = 0.4
MISSING_DROPOUT = 0.3
SPLIT_SEED = 0
TEST_NOISE_SEED = 1234
SWAP_SEEDS = {"train": 101, "test": 102}
ATTENTION_SETTINGS = ("unreliable",)  # the others' students concatenate


def setting_fusion(setting):
    """How the setting's student fuses its views (known before any data loads)."""
    return "attention" if setting in ATTENTION_SETTINGS else "concat"


@dataclasses.dataclass
class SettingData:
    """One setting's splits, each an ``(x, y)`` pair (x: dict view -> array).

    The teacher's and the student's test splits hold the same samples in the
    same order. `student_noise` and `modality_dropout` are what the
    student's own layers add at training time; `fusion` is how the setting's
    networks fuse their views; `headline` is the measure its tables lead
    with (``"accuracy"``, or ``"dropped"``: with one view missing).
    """

    setting: str
    teacher_train: tuple
    student_train: tuple
    teacher_test: tuple
    student_test: tuple
    student_noise: float = 0.0
    modality_dropout: float = 0.0
    fusion: str = "concat"
    headline: str = "accuracy"

    @property
    def has_unlabelled(self):
        return bool(np.any(self.student_train[1] == UNLABELLED))

    def task_loss(self):
        """A new task loss: sparse cross-entropy on logits, skipping the
        unlabelled rows where the setting has some."""
        ignore = UNLABELLED if self.has_unlabelled else None
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=ignore
        )

    def build_student(self, input_dims):
        """A new student of this setting (its noise, dropout and fusion)."""
        return zoo.build_student(
            input_dims, self.student_noise, self.modality_dropout, fusion=self.fusion
        )

    @property
    def distiller_kwargs(self):
        """The `Distiller` arguments the setting's student needs, or None."""
        if self.modality_dropout:
            return {"student_mask_layer": zoo.STUDENT_MASK_LAYER}
        return None


def check_setting(setting):
    if setting not in SETTINGS:
        raise ValueError(f"Unknown setting {setting!r}; choose one of {SETTINGS}.")
    return setting


def subsample(x, y, per_class, rng):
    """`per_class` random rows of each class, shuffled."""
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    )
    idx = rng.permutation(idx)
    return {k: v[idx] for k, v in x.items()}, y[idx]


def add_fixed_noise(x, seed):
    """The noisy setting's inputs: x plus N(0, NOISE_STD²) drawn once from `seed`.

    Fixed noise makes evaluation on noisy inputs reproducible (training draws
    fresh noise each step inside the student instead).
    """
    rng = np.random.default_rng(seed)
    return {
        k: (v + NOISE_STD * rng.standard_normal(v.shape)).astype("float32")
        for k, v in x.items()
    }


def swap_views(x, probability, seed):
    """Per sample and view, with `probability`, that view of another sample.

    >>> x = {"a": np.arange(6.0)[:, None], "b": np.arange(6.0)[:, None]}
    >>> swapped = swap_views(x, 0.5, seed=0)
    >>> sorted(swapped["a"][:, 0].tolist()) != list(range(6))  # rows moved
    True
    """
    rng = np.random.default_rng(seed)
    out = {}
    for view, values in x.items():
        n = len(values)
        swap = rng.random(n) < probability
        # Another sample: a shift of 1..n-1 never picks the sample itself.
        donor = (np.arange(n) + rng.integers(1, n, n)) % n
        out[view] = np.where(swap[:, None], values[donor], values).astype(values.dtype)
    return out


def _unlabel_all_but(y, per_class, rng):
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    )
    partial = np.full_like(y, UNLABELLED)
    partial[keep] = y[keep]
    return partial


def load_setting(setting=DEFAULT_SETTING, views=None, train_per_class=None):
    """The splits of one setting (see the module) as a `SettingData`.

    Args:
        setting: one of `SETTINGS`.
        views: view names (default all six).
        train_per_class: optional cap on training samples per class (for fast
            tests); the test split is always complete.
    """
    views, setting = check_views(views), check_setting(setting)
    (x_tr, y_tr), (x_te, y_te) = load_mfeat(views=views, test_size=0.5, seed=SPLIT_SEED)
    rng = np.random.default_rng(SPLIT_SEED)
    if train_per_class is not None:
        x_tr, y_tr = subsample(x_tr, y_tr, int(train_per_class), rng)
    train, test = (x_tr, y_tr), (x_te, y_te)
    noisy_test = (add_fixed_noise(x_te, TEST_NOISE_SEED), y_te)
    if setting == "noisy":
        return SettingData(setting, train, train, test, noisy_test, NOISE_STD)
    if setting == "few-labels":
        partial = (x_tr, _unlabel_all_but(y_tr, FEW_LABELS_PER_CLASS, rng))
        return SettingData(setting, train, partial, test, test)
    if setting == "unreliable":
        train = (swap_views(x_tr, SWAP_PROBABILITY, SWAP_SEEDS["train"]), y_tr)
        test = (swap_views(x_te, SWAP_PROBABILITY, SWAP_SEEDS["test"]), y_te)
        return SettingData(
            setting, train, train, test, test, fusion=setting_fusion(setting)
        )
    if setting == "missing":
        return SettingData(
            setting,
            train,
            train,
            test,
            noisy_test,
            NOISE_STD,
            modality_dropout=MISSING_DROPOUT,
            headline="dropped",
        )
    return SettingData(setting, train, train, test, test)
