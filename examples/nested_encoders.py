"""Distil a multi-modal model written the usual way: encoders as sub-models.

Run (any backend):

    KERAS_BACKEND=jax python examples/nested_encoders.py

The teacher and the student each have one encoder per view, built as its own
`keras.Model` and called inside the multi-modal model: a Conv2D encoder on
`pix` as a 16×15 image, a 1-D convolution over `fou` as a sequence, and
`Sequential` MLPs for `kar` and `mor`; then a Transformer block over the four
modality tokens. The student learns from two Gram terms at two depths — one on
the encoders' outputs, addressed by paths such as `"pix_encoder/tokens"`, one
on the tokens after the fusion block — plus logit KD. The trained student,
the user's own model untouched, is then exported to TFLite and checked in
LiteRT. About a minute on 2 CPU cores.
"""

import argparse
import tempfile

import keras
from keras import layers

from keras_gramkd import Distiller, Feature, GramTerm, KDTerm
from keras_gramkd.datasets import load_mfeat

VIEWS = ("pix", "fou", "kar", "mor")


def image_encoder(shape, width, channels):
    """Conv2D over the 16×15 digit image: `tokens` (batch, 8, 7, width)."""
    image = keras.Input(shape)
    h = layers.Conv2D(channels, 3, padding="same", activation="relu")(image)
    h = layers.MaxPooling2D(2, padding="same")(h)
    tokens = layers.Conv2D(width, 3, padding="same", name="tokens")(h)
    embed = layers.GlobalAveragePooling2D(name="embed")(tokens)
    return keras.Model(image, embed, name="pix_encoder")


def sequence_encoder(length, width, channels):
    """Conv1D over the 76 Fourier coefficients as a sequence: `tokens`."""
    series = keras.Input((length,))
    h = layers.Reshape((length, 1))(series)
    h = layers.Conv1D(channels, 5, strides=2, activation="relu")(h)
    tokens = layers.Conv1D(width, 5, strides=2, name="tokens")(h)
    embed = layers.GlobalAveragePooling1D(name="embed")(tokens)
    return keras.Model(series, embed, name="fou_encoder")


def mlp_encoder(view, dim, width, hidden):
    return keras.Sequential(
        [
            keras.Input((dim,)),
            layers.Dense(hidden, activation="relu"),
            layers.Dense(width, name="embed"),
        ],
        name=f"{view}_encoder",
    )


def build_net(name, x_train, width, hidden, heads):
    """Encoders as sub-models, a Transformer block over the modality tokens."""
    inputs = {v: keras.Input(x_train[v].shape[1:], name=v) for v in VIEWS}
    encoders = {
        "pix": image_encoder(x_train["pix"].shape[1:], width, hidden // 4),
        "fou": sequence_encoder(x_train["fou"].shape[1], width, hidden // 4),
        "kar": mlp_encoder("kar", x_train["kar"].shape[1], width, hidden),
        "mor": mlp_encoder("mor", x_train["mor"].shape[1], width, hidden),
    }
    embeds = [encoders[v](inputs[v]) for v in VIEWS]
    tokens = layers.Reshape((len(VIEWS), width), name="modality_tokens")(
        layers.Concatenate()(embeds)
    )
    attended = layers.MultiHeadAttention(heads, width // heads, name="attention")(
        tokens, tokens
    )
    h = layers.LayerNormalization()(layers.Add()([tokens, attended]))
    feed_forward = layers.Dense(width)(layers.Dense(2 * width, activation="relu")(h))
    fused = layers.LayerNormalization(name="fused_tokens")(
        layers.Add()([h, feed_forward])
    )
    logits = layers.Dense(10, name="logits")(layers.GlobalAveragePooling1D()(fused))
    return keras.Model(inputs, logits, name=name)


# Where each network's features are: paths into the nested encoders. The image
# and sequence tokens are pooled to one vector per modality (max, mean).
ENCODER_FEATURES = {
    "pix": Feature("pix_encoder/tokens", pool="max"),
    "fou": Feature("fou_encoder/tokens", pool="mean"),
    "kar": "kar_encoder/embed",
    "mor": "mor_encoder/embed",
}


def main(teacher_epochs=15, epochs=20, export=True):
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_mfeat(views=VIEWS, pix_as_image=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    teacher = build_net("teacher", x_train, width=32, hidden=64, heads=4)
    teacher.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    teacher.fit(x_train, y_train, epochs=teacher_epochs, batch_size=64, verbose=0)

    student = build_net("student", x_train, width=8, hidden=16, heads=2)
    distiller = Distiller(
        teacher,
        student,
        terms=[
            KDTerm(temperature=4.0, weight=1.0),
            GramTerm(ENCODER_FEATURES, ENCODER_FEATURES, weight=1.0, name="gram_enc"),
            GramTerm("fused_tokens", "fused_tokens", weight=1.0, name="gram_fused"),
        ],
    )
    distiller.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    history = distiller.fit(
        x_train, y_train, epochs=epochs, batch_size=64, verbose=0
    ).history
    last = {k: round(v[-1], 4) for k, v in history.items()}
    print(f"backend: {keras.backend.backend()}; last epoch: {last}")
    _, teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)
    student.compile(loss=loss, metrics=["accuracy"])
    _, student_accuracy = student.evaluate(x_test, y_test, verbose=0)
    print(f"teacher test accuracy: {teacher_accuracy:.4f}")
    print(f"student test accuracy: {student_accuracy:.4f}")
    if export:
        from keras_gramkd.export import export_student

        sample = {v: x_test[v][:64] for v in VIEWS}
        report = export_student(
            student, tempfile.mkdtemp(), formats="tflite", sample_data=sample
        )
        print(report)
        if not all(row.passed for row in report.rows):
            raise SystemExit("the exported TFLite file did not match the student")
    return teacher_accuracy, student_accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()
    main(args.teacher_epochs, args.epochs, export=not args.no_export)
