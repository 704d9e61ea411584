"""`gramkd demo`: what each distillation term buys on real multi-modal digits.

On the embedded UCI multiple-features digits (six views of the same 2,000
handwritten digits, a fixed stratified 1000/1000 split), the demo trains the
reference teacher of `keras_gramkd.zoo` once, then runs the methods of
`keras_gramkd.demo.methods` (by default labels only, logit KD, the modality
Gram, its batch-mean control and SP; with ``--full`` also Keras' own KD, the
other Gram controls, RKD, PKT, FitNet and per-modality SP) on the same student
architecture through `keras_gramkd.study.compare_methods`:
per seed, every method starts from the same initial weights and sees the
same batches in the same order with the same optimizer, so each method's
difference to KD is paired, and reported as mean ± standard error.

An "epoch" is one pass over the full training split (8 batches of 128),
whatever the student's data, so every setting gets the same number of steps.

The settings (``--setting``; `keras_gramkd.demo.settings`): ``clean``,
``noisy`` (the default: the student sees heavy Gaussian noise), ``few-labels``
(10 labels per class plus unlabelled rows), ``unreliable`` (per-sample
swapped views, attention-fusion networks) and ``missing`` (students trained
with modality dropout, judged with a view missing).

How the networks were chosen: the teacher has one 256-wide encoder per view
into 64-d tokens and a Transformer block, about 300k parameters; the student
has 16-wide encoders into 8-d tokens, concatenated (or fused by one attention
layer) into a linear head, about 12k parameters (25x fewer: tiny encoders
into a narrow space leave the student a gap to close). Teacher Adam 1e-3,
students Adam 1e-2 (at 1e-3 the noisy student was still climbing after 30
epochs), batch 128, 30 epochs. The default Gram term is the library's cosine
Gram (``"l2"``) at weight 3; the README's results section gives the
measured tables per setting.

Example (a smoke run on two views; ``gramkd demo --quick`` on the command
line):

```python
from keras_gramkd.demo import run_study

results = run_study(views=["fou", "mor"], quick=True, out="runs/smoke")
print(results["conclusion"])
```
"""

from keras_gramkd.demo.cli import run_demo
from keras_gramkd.demo.methods import demo_methods, skipped_controls
from keras_gramkd.demo.settings import (
    DEFAULT_SETTING,
    FEW_LABELS_PER_CLASS,
    NOISE_STD,
    SETTINGS,
    TEST_NOISE_SEED,
    add_fixed_noise,
    load_setting,
)
from keras_gramkd.demo.study import DEFAULTS, QUICK, run_study
from keras_gramkd.zoo import (
    BATCH_SIZE,
    STUDENT_LEARNING_RATE,
    TEACHER_LEARNING_RATE,
    build_student,
    build_teacher,
)

__all__ = [
    "BATCH_SIZE",
    "DEFAULTS",
    "DEFAULT_SETTING",
    "FEW_LABELS_PER_CLASS",
    "NOISE_STD",
    "QUICK",
    "SETTINGS",
    "STUDENT_LEARNING_RATE",
    "TEACHER_LEARNING_RATE",
    "TEST_NOISE_SEED",
    "add_fixed_noise",
    "build_student",
    "build_teacher",
    "demo_methods",
    "load_setting",
    "run_demo",
    "run_study",
    "skipped_controls",
]
