"""Operations of the default terms' math: forward plus gradient, per backend.

    python benchmarks/term_ops.py [--backend tensorflow|jax|torch|all] [--json PATH]

Counts, for `ops.logit_kd` (per-sample values, summed) and for the cosine Gram
loss as the Gram term computes it from a cached teacher Gram
(`gram_distance(teacher_gram, gram_matrix(student, "l2", mask), mask,
sample_weight)`), the operations of the value and its gradient with respect to
the student's logits or features: on PyTorch the aten operations dispatched
eagerly, on JAX the equations of the jaxpr of `value_and_grad` (nested jaxprs
included), on TensorFlow the operations of the `tf.function` graph (inputs
excluded). The demo's shapes: batch 64, 10 classes, M = 6 modalities, d = 32.
`--backend all` runs each backend in its own process and prints one table.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BACKENDS = ("torch", "jax", "tensorflow")
BATCH, CLASSES, M, D = 64, 10, 6, 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
    )
    parser.add_argument("--json", help="also write the counts to this file")
    return parser.parse_args(argv)


def cases():
    """{name: (loss of the student tensor, constant inputs, student input)}."""
    from keras import ops

    from keras_gramkd import ops as kd_ops

    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(scale=3.0, size=(BATCH, CLASSES)).astype("float32")
    student_logits = rng.normal(scale=3.0, size=(BATCH, CLASSES)).astype("float32")
    features = rng.normal(size=(BATCH, M, D)).astype("float32")
    teacher_gram = np.asarray(
        ops.convert_to_numpy(kd_ops.gram_matrix(rng.normal(size=(BATCH, M, 64))))
    )
    mask = (rng.random((BATCH, M)) > 0.2).astype("float32")
    weight = rng.random(BATCH).astype("float32")

    def kd(temperature):
        def loss(student, teacher):
            return ops.sum(kd_ops.logit_kd(teacher, student, temperature))

        return loss, (teacher_logits,), student_logits

    def gram(with_mask, with_weight):
        def loss(student, teacher, mask, weight):
            student_gram = kd_ops.gram_matrix(student, "l2", mask)
            return kd_ops.gram_distance(teacher, student_gram, mask, weight)

        return (
            loss,
            (
                teacher_gram,
                mask if with_mask else None,
                weight if with_weight else None,
            ),
            features,
        )

    return {
        "logit_kd T=4": kd(4.0),
        "logit_kd T=1e6": kd(1e6),
        "gram": gram(False, False),
        "gram + mask": gram(True, False),
        "gram + sample_weight": gram(False, True),
        "gram + mask + sample_weight": gram(True, True),
    }


def torch_count(loss, constants, student):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    constants = [None if c is None else torch.as_tensor(c) for c in constants]
    student = torch.as_tensor(student).requires_grad_(True)
    with Count():
        value = loss(student, *constants)
        torch.autograd.grad(value, student)
    return count[0]


def jax_count(loss, constants, student):
    import jax
    from step_ops import _equations

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(student, *constants)
    return _equations(jaxpr.jaxpr)


def tensorflow_count(loss, constants, student):
    import tensorflow as tf

    def step(student, *given):  # None constants stay Python values
        with tf.GradientTape() as tape:
            tape.watch(student)
            value = loss(student, *_fill(constants, given))
        return value, tape.gradient(value, student)

    inputs = [c for c in constants if c is not None]
    graph = tf.function(step).get_concrete_function(student, *inputs).graph
    return len(graph.get_operations()) - len(graph.inputs)


def _fill(constants, given):
    """`constants` with its non-None entries replaced, in order, by `given`."""
    given = iter(given)
    return [None if c is None else next(given) for c in constants]


def count_backend(backend):
    """{case: operations} on the current Keras backend."""
    counter = {"torch": torch_count, "jax": jax_count, "tensorflow": tensorflow_count}
    return {name: counter[backend](*case) for name, case in cases().items()}


def print_table(counts):
    backends = list(counts)
    names = list(next(iter(counts.values())))
    print(
        f"{'operations (forward + gradient)':32s}"
        + "".join(f"{b:>12s}" for b in backends)
    )
    for name in names:
        print(f"{name:32s}" + "".join(f"{counts[b][name]:12d}" for b in backends))


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "all":
        counts = {}
        for backend in BACKENDS:
            env = {**os.environ, "KERAS_BACKEND": backend}
            out = subprocess.run(
                [sys.executable, __file__, "--backend", backend, "--json", "-"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            counts[backend] = json.loads(out.strip().splitlines()[-1])[backend]
    else:
        os.environ["KERAS_BACKEND"] = args.backend
        counts = {args.backend: count_backend(args.backend)}
        if args.json == "-":  # for --backend all: the counts alone, as JSON
            print(json.dumps(counts))
            return
    print_table(counts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "term_ops", "operations": counts}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
