"""AV-MNIST: MNIST digit images paired by label with spoken-digit audio.

The standard two-modality digit benchmark, built from two TFDS data sets:
`mnist` (28x28 grey images, 60,000 train / 10,000 test) and `spoken_digit`
(the Free Spoken Digit Dataset: 8 kHz recordings of digits 0-9 by several
speakers, named ``{digit}_{speaker}_{index}.wav``). Each image is paired with a
recording of the same digit, and the audio is turned into a log-mel spectrogram
with `tf.signal` inside the `tf.data` pipeline.

Needs `tensorflow` and `tensorflow-datasets` (``pip install "keras-gramkd[data]"``),
imported only when `load_av_mnist` is called. The pipeline is pure `tf.data`, so
it feeds a Keras model under any backend (TensorFlow, JAX or PyTorch).
"""

import numbers

AUDIO_SAMPLE_RATE = 8000
"""Sample rate of `spoken_digit`, in Hz."""

SPOKEN_DIGIT_TEST_INDICES = 5
"""Recordings numbered below this (0-4 of each speaker and digit) form the test
split of `spoken_digit`, the FSDD convention (10% of the recordings)."""

_SPLITS = ("train", "test")
_FILENAME_PATTERN = r"^(?:.*/)?\d+_[^/]*_(\d+)\.wav$"


def _require_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "load_av_mnist needs tensorflow and tensorflow-datasets: "
            'pip install "keras-gramkd[data]"'
        ) from e
    return tf, tfds


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def av_mnist_audio_shape(
    audio_length=8000, frame_length=256, frame_step=128, n_mels=40
):
    """Shape of one audio spectrogram produced by `load_av_mnist` with these options.

    Example:

    >>> av_mnist_audio_shape()
    (61, 40, 1)
    """
    return (1 + (audio_length - frame_length) // frame_step, n_mels, 1)


def load_av_mnist(
    split="train",
    *,
    n_mels=40,
    audio_length=8000,
    frame_length=256,
    frame_step=128,
    seed=0,
    data_dir=None,
    download=True,
):
    """Loads AV-MNIST: MNIST images paired by label with spoken-digit spectrograms.

    Splits: images come from the `mnist` split of the same name. `spoken_digit`
    has only a 'train' split, so it is split by recording number, following the
    FSDD convention: recordings 0-4 of every speaker and digit (10%) are the
    test audio, recordings 5-49 the train audio. The two audio splits share
    speakers but no recording.

    Pairing: images keep the order TFDS stores them in (files are not
    shuffled). The audio of each digit is shuffled with `seed` and repeated,
    and each image takes the next recording of its own digit, so every pair has
    matching labels, each recording is reused about equally often, and the
    pairing is the same for the same `seed` (another seed pairs differently).
    The dataset has one element per image; shuffle and batch it yourself.

    Audio: the int16 waveform is scaled to [-1, 1], cut or zero-padded at the
    end to `audio_length` samples, and turned into a log-mel spectrogram
    (magnitude STFT with a Hann window, `n_mels` mel bands from 20 Hz to 4 kHz,
    `log(mel + 1e-6)`).

    Args:
        split: "train" or "test".
        n_mels: number of mel bands.
        audio_length: samples kept per recording (8000 = 1 s at 8 kHz).
        frame_length: STFT window length in samples (also the FFT length).
        frame_step: STFT hop in samples.
        seed: integer seed of the audio-to-image pairing.
        data_dir: TFDS data directory (default: the TFDS default).
        download: whether TFDS may download and prepare missing data.

    Returns:
        An unbatched `tf.data.Dataset` of `({"image": image, "audio": audio},
        label)`: `image` float32 `(28, 28, 1)` in [0, 1]; `audio` float32
        `(n_frames, n_mels, 1)` with `n_frames = 1 + (audio_length -
        frame_length) // frame_step` (61 by default, see
        `av_mnist_audio_shape`); `label` an int32 scalar.

    Raises:
        ValueError: for an unknown `split` or an invalid spectrogram option.
        ImportError: if tensorflow or tensorflow-datasets is missing.
        tf.errors.InvalidArgumentError: while iterating, if a `spoken_digit`
            file name does not follow ``{digit}_{speaker}_{index}.wav``.

    Example:

    ```python
    ds = load_av_mnist("train").shuffle(10_000, seed=0).batch(64)
    model.fit(ds, epochs=5)  # a model with inputs named "image" and "audio"
    ```
    """
    if split not in _SPLITS:
        raise ValueError(f"Unknown `split` {split!r}; valid splits: {_SPLITS}.")
    n_mels = _positive_int("n_mels", n_mels)
    audio_length = _positive_int("audio_length", audio_length)
    frame_length = _positive_int("frame_length", frame_length)
    frame_step = _positive_int("frame_step", frame_step)
    if frame_length > audio_length:
        raise ValueError(
            f"`frame_length` ({frame_length}) must be <= `audio_length` "
            f"({audio_length})."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an integer; got {seed!r}.")
    tf, tfds = _require_tfds()

    images = tfds.load(
        "mnist",
        split=split,
        data_dir=data_dir,
        download=download,
        shuffle_files=False,
    ).map(
        lambda ex: (
            tf.cast(ex["image"], tf.float32) / 255.0,
            tf.cast(ex["label"], tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    audio = tfds.load(
        "spoken_digit",
        split="train",
        data_dir=data_dir,
        download=download,
        shuffle_files=False,
    ).filter(_audio_split_predicate(tf, split))
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        num_mel_bins=n_mels,
        num_spectrogram_bins=frame_length // 2 + 1,
        sample_rate=AUDIO_SAMPLE_RATE,
        lower_edge_hertz=20.0,
        upper_edge_hertz=AUDIO_SAMPLE_RATE / 2,
    )

    def to_log_mel(ex):
        wave = tf.cast(ex["audio"], tf.float32) / 32768.0
        wave = wave[:audio_length]
        wave = tf.pad(wave, [[0, audio_length - tf.shape(wave)[0]]])
        wave = tf.reshape(wave, [audio_length])  # static length: static spec shape
        stft = tf.signal.stft(wave, frame_length=frame_length, frame_step=frame_step)
        mel = tf.tensordot(tf.abs(stft), mel_matrix, 1)
        return tf.math.log(mel + 1e-6)[..., None], tf.cast(ex["label"], tf.int32)

    audio = audio.map(to_log_mel, num_parallel_calls=tf.data.AUTOTUNE).cache()
    per_digit = [
        audio.filter(lambda _, label, d=d: tf.equal(label, d))
        .map(lambda spec, _: spec)
        .shuffle(1024, seed=seed + d, reshuffle_each_iteration=True)
        .repeat()
        for d in range(10)
    ]
    # Each image, in order, picks the next recording of its own digit. (Every
    # digit has recordings in both FSDD splits; a digit with none would end the
    # dataset at its first image, as `choose_from_datasets` stops on empty input.)
    paired_audio = tf.data.Dataset.choose_from_datasets(
        per_digit, images.map(lambda _, label: tf.cast(label, tf.int64))
    )
    ds = tf.data.Dataset.zip((images, paired_audio)).map(
        lambda img, spec: ({"image": img[0], "audio": spec}, img[1])
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _audio_split_predicate(tf, split):
    """Keeps recordings 0-4 for "test" and 5+ for "train" (by file name)."""

    def keep(ex):
        name = ex["audio/filename"]
        valid = tf.strings.regex_full_match(name, _FILENAME_PATTERN)
        check = tf.debugging.Assert(
            valid,
            [
                "spoken_digit file name does not match {digit}_{speaker}_{index}"
                ".wav, so it cannot be split by recording index:",
                name,
            ],
        )
        with tf.control_dependencies([check]):
            index = tf.strings.to_number(
                tf.strings.regex_replace(name, _FILENAME_PATTERN, r"\1"), tf.int32
            )
        is_test = index < SPOKEN_DIGIT_TEST_INDICES
        return is_test if split == "test" else tf.logical_not(is_test)

    return keep
