"""Does a distillation term help *your* model? Compare methods over paired seeds.

`compare_methods` trains one fresh student per method and seed, every method
of a seed from the same initial weights, on the same batches in the same order
with the same optimizer, and measures each: test accuracy, accuracy with each
modality dropped, the distance of its modality Gram matrices to the teacher's
(|ΔG|), parameters and train time. `StudyResult` pairs every method with a
reference per seed (mean ± standard error of the differences) and writes the
table (`to_markdown`), the numbers (`to_json`) and a plot (`plot`).

Example (a user's own teacher and student builder):

```python
from keras_gramkd import GramTerm, KDTerm
from keras_gramkd.study import compare_methods

t_mods = {"image": "image_encoder/embed", "audio": "audio_encoder/embed"}
s_mods = {"image": "s_image", "audio": "s_audio"}
result = compare_methods(
    teacher, build_student, (x_train, y_train), (x_test, y_test),
    methods={
        "labels": [],
        "kd": [KDTerm(temperature=4.0)],
        "kd+gram": [KDTerm(temperature=4.0), GramTerm(t_mods, s_mods, weight=3.0)],
    },
    reference="kd", seeds=10, epochs=20,
    teacher_modalities=t_mods, student_modalities=s_mods,
)
print(result.to_markdown())
result.plot("paired.png")
```
"""

from keras_gramkd.study.batches import SeededBatches
from keras_gramkd.study.grams import modality_grams
from keras_gramkd.study.result import MethodResult, StudyResult
from keras_gramkd.study.runner import StudyError, compare_methods
from keras_gramkd.study.stats import mean_sd, paired_difference

__all__ = [
    "MethodResult",
    "SeededBatches",
    "StudyError",
    "StudyResult",
    "compare_methods",
    "mean_sd",
    "modality_grams",
    "paired_difference",
]
