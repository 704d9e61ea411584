"""Step time of distilling nested encoders against the same model written flat.

The models are `examples/nested_encoders.py`'s (encoders as sub-models, a
Transformer block); the flat twin has the same layers called in one graph (its
sub-model layers renamed `<encoder>_<layer>`). Both are distilled with KD and
Gram terms at two depths on the digits, batch 50, interleaved epochs after a
warm-up; it prints the median step times, their ratio, and the forward passes
per step of each network (counted by layers that count executed calls).

    python benchmarks/nested.py --backend jax [--rounds 7] [--quick]
"""

import argparse
import os
import sys


def flat_twin(model):
    """The same architecture with every sub-model's layers inlined."""
    import keras

    def fresh(layer, prefix):
        return layer.__class__.from_config(
            {**layer.get_config(), "name": prefix + layer.name}
        )

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.Sequential):
            h = args[0]
            for inner in layer.layers:
                h = fresh(inner, layer.name + "_")(h)
            return h
        if isinstance(layer, keras.Model):
            sub = keras.models.clone_model(
                layer,
                input_tensors=args[0],
                clone_function=lambda inner: fresh(inner, layer.name + "_"),
            )
            return sub.output
        return layer(*args, **kwargs)

    return keras.models.clone_model(
        model, clone_function=lambda layer: fresh(layer, ""), call_function=call
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, a smoke run")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

    import keras
    import nested_encoders as example
    from harness import Run, counted, counter_of, measure, print_table

    from keras_gramkd import Distiller, Feature, GramTerm, KDTerm
    from keras_gramkd.datasets import load_mfeat

    keras.utils.set_random_seed(0)
    (x, y), _ = load_mfeat(views=example.VIEWS, pix_as_image=True)
    rounds = 2 if args.quick else args.rounds
    runs = []
    for layout in ("nested", "flat"):
        networks = {}
        for role, width, hidden, heads in (
            ("teacher", 32, 64, 4),
            ("student", 8, 16, 2),
        ):
            net = example.build_net(role, x, width, hidden, heads)
            networks[role] = counted(
                net if layout == "nested" else flat_twin(net), role
            )
        features = {
            view: (
                Feature(f.address.replace("/", "_"), f.pool)
                if isinstance(f, Feature) and layout == "flat"
                else (f.replace("/", "_") if layout == "flat" else f)
            )
            for view, f in example.ENCODER_FEATURES.items()
        }
        distiller = Distiller(
            networks["teacher"],
            networks["student"],
            terms=[
                KDTerm(),
                GramTerm(features, features, name="gram_enc"),
                GramTerm("fused_tokens", "fused_tokens", name="gram_fused"),
            ],
        )
        distiller.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        counters = {role: counter_of(net) for role, net in networks.items()}
        runs.append(Run(layout, distiller, x, y, 50, counters))
    measure(runs, warmup=1, rounds=rounds)
    results = {run.name: run.result() for run in runs}
    base = results["flat"]["median_step_ms"]
    rows = [
        [
            name,
            f"{r['median_step_ms']:.2f}",
            f"{r['median_step_ms'] / base:.3f}x",
            str(r["student_forwards_executed"]),
            str(r["teacher_forwards_executed"]),
        ]
        for name, r in results.items()
    ]
    print_table(
        f"nested vs flat, {args.backend}, batch 50, median of {rounds} epochs",
        ["layout", "ms/step", "vs flat", "student fwd/step", "teacher fwd/step"],
        rows,
    )


if __name__ == "__main__":
    main()
