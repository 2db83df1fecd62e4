"""The `featurizer` stage: a small classifier whose penultimate layer is the feature space of FID/KID.

Trained on the training split's labels; a dataset without labels trains it to tell which of four
flips an image went through instead, which needs no labels and still learns shape features. It is
a DVC stage output like any other, identified by the hash of its weights: scores are compared only
under the same featurizer id.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from components.config import load_params
from components.data.prepared import load_prepared
from components.models.layers import halvings_to_final_side

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
STAGE_WIDTHS = [64, 64, 128, 256]  # channels of the stride-2 stages; later ones keep the last


class Featurizer(nn.Module):
    """Convolutional classifier; `forward` returns the penultimate features, `classify` the logits.

    Its stride-2 stages follow the image size as the models' encoders do (two at 8 x 8, three at
    32 x 32, four at 64 x 64), so the features of a large image see whole shapes, not just edges.
    """

    def __init__(self, in_channels: int, feature_dim: int, num_classes: int, image_side: int):
        super().__init__()
        self.num_features = feature_dim  # read by torchmetrics' FID/KID
        stages = halvings_to_final_side(image_side)
        widths = STAGE_WIDTHS[:stages] + STAGE_WIDTHS[-1:] * (stages - len(STAGE_WIDTHS))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU()]
        for fan_in, fan_out in itertools.pairwise([32, *widths]):
            layers += [nn.Conv2d(fan_in, fan_out, 3, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], feature_dim)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        # Features are standardised with training-split statistics: KID's polynomial kernel is
        # scale-sensitive, and unit-scale features keep FID and KID in comparable, readable units.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x.float()) - self.feature_mean) / self.feature_std

    def classify(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def flip_task(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Self-supervised labels for unlabelled data: 0 none, 1 horizontal, 2 vertical, 3 both flips."""
    labels = rng.integers(0, 4, len(images))
    flipped = images.copy()
    flipped[labels % 2 == 1] = flipped[labels % 2 == 1, :, :, ::-1]
    flipped[labels >= 2] = flipped[labels >= 2, :, ::-1, :]
    return flipped, labels


def train_featurizer(
    prepared_dir: Path, out_dir: Path, *, feature_dim: int, epochs: int, batch_size: int, lr: float, seed: int
) -> dict:
    """Train on the training split, report accuracy on the validation split, save weights and config."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # single-threaded CPU kernels make the weights, hence the hash, repeatable
    data = load_prepared(prepared_dir)
    rng = np.random.default_rng(seed)
    if data.num_classes > 0:
        task, num_classes = "labels", data.num_classes
        x_train, y_train = data.train.images, data.train.labels
        x_val, y_val = data.val.images, data.val.labels
    else:
        task, num_classes = "flips", 4
        x_train, y_train = flip_task(data.train.images, rng)
        x_val, y_val = flip_task(data.val.images, rng)
    model = Featurizer(data.image_shape[0], feature_dim, num_classes, min(data.image_shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model.classify(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        features = model.body(x)
        model.feature_mean.copy_(features.mean(0))
        model.feature_std.copy_(features.std(0).clamp_min(1e-6))
        predictions = model.classify(torch.from_numpy(np.ascontiguousarray(x_val))).argmax(1).numpy()
    config = {
        "in_channels": data.image_shape[0],
        "feature_dim": feature_dim,
        "num_classes": num_classes,
        "task": task,
        "image_shape": list(data.image_shape),
        "val_accuracy": round(float((predictions == y_val).mean()), 4),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def featurizer_id(featurizer_dir: str | Path) -> str:
    """Short content hash of the featurizer's weights: the id recorded with every FID/KID."""
    digest = hashlib.sha256((Path(featurizer_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()
    return f"featurizer-{digest[:12]}"


def load_featurizer(featurizer_dir: str | Path) -> Featurizer:
    featurizer_dir = Path(featurizer_dir)
    config_path = featurizer_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: missing; run the `featurizer` stage (`dvc repro featurizer`)"
        )
    config = json.loads(config_path.read_text())
    side = min(config["image_shape"][1:])
    model = Featurizer(config["in_channels"], config["feature_dim"], config["num_classes"], side)
    model.load_state_dict(load_file(str(featurizer_dir / WEIGHTS_FILE)))
    return model.eval().requires_grad_(False)


def main() -> int:
    params = load_params()
    cfg = params.featurizer
    config = train_featurizer(
        Path(params.data.prepared_dir),
        Path(cfg.dir),
        feature_dim=cfg.feature_dim,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=params.seed,
    )
    print(
        f"featurizer: {featurizer_id(cfg.dir)} trained on {config['task']}, "
        f"val accuracy {config['val_accuracy']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
