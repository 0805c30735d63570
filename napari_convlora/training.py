"""Training the source model: the U-Net on labelled heads, then the Early Segmentation Head.

A few real heads cannot teach a network much about other people and scanners,
so every sample is augmented: a random 2D affine (rotation, scale, shear,
translation), a smooth elastic deformation, flips, a random crop (field of view), resolution loss
(voxels up to 3 mm, thick slices), and intensity changes (gamma, a smooth multiplicative bias field,
blur, noise, contrast) and, with ``contrast_curves``, random T1-like tissue-contrast curves: what
separates scanners is mostly the contrast map (BENCHMARKS.md section 2), which a gamma does not span.
Heads with a neck (``scripts/prepare_heads.py``) give the crops real necks. The early head is trained
afterwards on the same labels with the U-Net frozen, as in the ConvLoRA paper.

:func:`train_source` is a generator of progress reports that writes a
checkpoint (safetensors: model and Adam moments; JSON: step and settings) every
``checkpoint_every`` steps and resumes from it. Each step's randomness derives
from (seed, step), so a resumed run continues exactly as an uninterrupted one,
and batches can be augmented ahead in worker processes (``workers``) without
changing a single sample: on a GPU the numpy/scipy augmentation, not the
network, sets the pace.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage

from .device import pick_device
from .errors import InputError
from .files import atomic_write
from .geometry import plan
from .model import METADATA_KEY, BaseModel, build_model
from .nifti import load_mask, load_volume
from .shape_prior import METADATA_KEY as PRIOR_KEY
from .shape_prior import learn_shape_prior
from .standardize import METADATA_KEY as LANDMARKS_KEY
from .standardize import brain_landmarks, head_landmarks, learn_reference


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    head_steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    crop: tuple[int, int] = (192, 160)
    width: int = 16
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    intensity_scaling: str = "tissue"  # a key of geometry.INTENSITY_SCALINGS, recorded in the model file
    workers: int = 0  # processes that augment batches ahead (0: in the training process); same batches either way
    contrast_curves: float = 0.0  # share of crops given a random T1-like tissue-contrast curve (contrast_curve)


@dataclass(frozen=True)
class TrainStep:
    phase: str  # "unet" or "head"
    step: int  # 1-based over both phases
    total_steps: int
    loss: float
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class TrainDone:
    model: BaseModel
    seconds: float


@dataclass
class Head:
    """One labelled head in model space: (n_slices, H, W) image stack and mask stack."""

    images: np.ndarray
    masks: np.ndarray
    intensity_scaling: str
    landmarks: np.ndarray | None = None  # standardize.head_landmarks of the scaled volume (None: no head found)
    brain_landmarks: np.ndarray | None = None  # standardize.brain_landmarks under the label (None: too little brain)


def load_heads(pairs: Sequence[tuple[Path, Path]], intensity_scaling: str = "tissue") -> list[Head]:
    heads = []
    for t1_path, mask_path in pairs:
        volume, mask = load_volume(t1_path), load_mask(mask_path)
        if mask.data.shape != volume.data.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
            raise InputError(f"{mask_path}: not on the voxel grid of {t1_path}")
        geometry, scaled = plan(volume, intensity_scaling)
        images = geometry.to_model(scaled)
        ras_mask = geometry.to_ras(mask.data)
        masks = geometry.to_model(ras_mask.astype(np.float32)) > 0.5
        landmarks = head_landmarks(scaled), brain_landmarks(scaled, ras_mask)
        heads.append(Head(images, masks.astype(np.float32), intensity_scaling, *landmarks))
    return heads


def _bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    coarse = rng.normal(0.0, strength, (4, 4))
    field = ndimage.zoom(coarse, (shape[0] / 4, shape[1] / 4), order=3, mode="nearest")[: shape[0], : shape[1]]
    return np.exp(field)


def _displacement(rng: np.random.Generator, shape: tuple[int, int], pixels: float) -> np.ndarray:
    """A smooth random (2, H, W) displacement field of about ``pixels`` amplitude (control points 24 px apart)."""
    coarse = rng.normal(0.0, pixels, (2, max(shape[0] // 24, 2), max(shape[1] // 24, 2)))
    zoom = (1, shape[0] / coarse.shape[1], shape[1] / coarse.shape[2])
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[:, : shape[0], : shape[1]]


def _low_resolution(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``image`` as a scanner with voxels ``factors`` times larger would give it, back on the 1 mm grid."""
    small = ndimage.zoom(image, 1.0 / factors, order=1, mode="nearest", grid_mode=True)
    back = ndimage.zoom(small, np.array(image.shape) / np.array(small.shape), order=1, mode="nearest", grid_mode=True)
    out = np.zeros_like(image)
    h, w = min(back.shape[0], image.shape[0]), min(back.shape[1], image.shape[1])
    out[:h, :w] = back[:h, :w]
    return out


# Where contrast_curve's control points sit on the tissue-scaled image: background, four tissue levels up to
# white matter (~0.6 after geometry's "tissue" scaling), then fat and marrow.
_CURVE_KNOTS = np.array([0.0, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5])


def contrast_curve(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` through a random increasing-up-to-white-matter intensity curve, fat and marrow at any level.

    Scanners differ in how far apart CSF, grey and white matter lie and in how bright fat is (fat
    suppression makes it dark); every such T1 keeps CSF < grey < white. The curve keeps that order (random
    gaps, white matter at 0.45-0.75) and puts the three brighter control points anywhere in 0.15-1.5.
    """
    tissue = np.cumsum(rng.uniform(0.02, 0.25, 4))
    tissue = tissue / tissue[-1] * rng.uniform(0.45, 0.75)
    fat = rng.uniform(0.15, 1.0, 3)
    levels = np.concatenate([[0.0], tissue, fat[:2], [fat[2] * 1.5]])
    return np.interp(image, _CURVE_KNOTS, levels).astype(np.float32)


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    crop: tuple[int, int],
    contrast_curves: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One randomly deformed, cropped and re-contrasted (image, mask) pair of size ``crop``.

    ``contrast_curves``: the probability of also passing the image through :func:`contrast_curve`
    (0 draws nothing more from ``rng``, so older recipes give the very same samples).
    """
    h, w = image.shape
    angle = np.deg2rad(rng.uniform(-20, 20))
    scale = rng.uniform(0.8, 1.25) * np.exp(rng.normal(0, 0.05, 2))
    shear = rng.uniform(-0.1, 0.1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(1.0 / scale)
    # Output pixel o samples input at matrix @ (o - out_centre) + in_centre + shift.
    out_centre = (np.array(crop) - 1) / 2
    in_centre = (np.array([h, w]) - 1) / 2 + rng.uniform(-0.15, 0.15, 2) * np.array([h, w])
    grid = np.indices(crop, dtype=np.float64).reshape(2, -1)
    coords = matrix @ (grid - out_centre[:, None]) + in_centre[:, None]
    if rng.random() < 0.5:  # elastic: anatomy of other people is not an affine copy of two heads
        coords = coords + _displacement(rng, crop, rng.uniform(2.0, 8.0)).reshape(2, -1)
    coords = coords.reshape(2, *crop)
    img = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    msk = ndimage.map_coordinates(mask, coords, order=1, mode="constant", cval=0.0)
    if rng.random() < 0.5:
        img, msk = img[::-1], msk[::-1]
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    img = np.clip(img, 0.0, 1.0)
    if rng.random() < 0.3:  # resolution loss: voxels up to 3 mm, thick slices along either in-plane axis
        img = _low_resolution(img, rng.uniform(1.0, 3.0, 2) ** rng.integers(0, 2, 2))
    elif rng.random() < 0.3:
        img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.3, 1.5, 2))
    img = img ** np.exp(rng.normal(0, 0.3))  # gamma: tissue contrast
    img = img * _bias_field(rng, crop, rng.uniform(0.0, 0.3))
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0, rng.uniform(0.0, 0.05), crop)
    img = np.clip(img, 0.0, 1.5).astype(np.float32)
    if contrast_curves > 0 and rng.random() < contrast_curves:
        img = contrast_curve(img, rng)
    return img, (msk > 0.5).astype(np.float32)


def sample_batch(
    heads: list[Head],
    rng: np.random.Generator,
    batch_size: int,
    crop: tuple[int, int],
    contrast_curves: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` augmented (image, mask) pairs as (B, 1, H, W) float32 arrays; 85% of them hold brain."""
    images, masks = [], []
    for _ in range(batch_size):
        head = heads[rng.integers(len(heads))]
        with_brain = np.flatnonzero(head.masks.any(axis=(1, 2)))
        index = rng.choice(with_brain) if rng.random() < 0.85 and len(with_brain) else rng.integers(len(head.images))
        image, mask = augment(head.images[index], head.masks[index], rng, crop, contrast_curves)
        images.append(image)
        masks.append(mask)
    return np.stack(images)[:, None], np.stack(masks)[:, None]


def step_batch(heads: list[Head], config: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The augmented batch of training step ``step`` (1-based over both phases): a function of (seed, step) alone."""
    rng = np.random.default_rng([config.seed, step])
    return sample_batch(heads, rng, config.batch_size, config.crop, config.contrast_curves)


_worker_heads: list[Head] = []


def _init_worker(heads: list[Head]) -> None:
    global _worker_heads
    _worker_heads = heads


def _worker_batch(config: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    return step_batch(_worker_heads, config, step)


def _batches(heads: list[Head], config: TrainConfig, steps: range) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of ``steps`` in order, made ahead by ``config.workers`` processes (at most 2 per worker queued)."""
    if config.workers <= 0:
        for step in steps:
            yield step_batch(heads, config, step)
        return
    # fork shares the heads with the workers without copying them; elsewhere they are sent once per worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(config.workers, initializer=_init_worker, initargs=(heads,)) as pool:
        pending: deque = deque()
        upcoming = iter(steps)
        for step in upcoming:
            pending.append(pool.apply_async(_worker_batch, (config, step)))
            if len(pending) >= 2 * config.workers:
                break
        while pending:
            batch = pending.popleft().get()
            step = next(upcoming, None)
            if step is not None:
                pending.append(pool.apply_async(_worker_batch, (config, step)))
            yield batch


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice: BCE for calibrated probabilities, Dice so thin boundaries matter."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice).mean()


def heads_sha256(heads: list[Head]) -> str:
    """Fingerprint of the training data, so a checkpoint is never resumed on other heads."""
    digest = hashlib.sha256()
    for head in heads:
        digest.update(np.ascontiguousarray(head.images).tobytes())
        digest.update(np.ascontiguousarray(head.masks).tobytes())
    return digest.hexdigest()


def _resumable(config: TrainConfig, data_id: str) -> dict:
    """What must match for a checkpoint to continue: everything but the device and checkpoint cadence."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "checkpoint_every", "workers")}
    if not settings["contrast_curves"]:  # as before the option existed: older checkpoints still resume
        del settings["contrast_curves"]
    return json.loads(json.dumps({**settings, "data_sha256": data_id}))


def _save_checkpoint(
    path: Path, model: BaseModel, optimizer: torch.optim.Optimizer, phase: str, step: int, settings: dict
) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"optimizer.{i}.{key}"] = state[key].detach().cpu().contiguous()
        tensors[f"optimizer.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    meta = {"format": "convlora-checkpoint", "phase": phase, "step": step, "settings": settings}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)}))


def _load_checkpoint(path: Path, model: BaseModel, settings: dict) -> tuple[str, int, dict]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(METADATA_KEY, "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable training checkpoint ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "convlora-checkpoint":
        raise InputError(f"{path}: not a training checkpoint; remove it or choose another --checkpoint")
    if meta.get("settings") != settings:
        raise InputError(
            f"{path}: checkpoint was made with other settings or data; remove it or choose another --checkpoint"
        )
    try:
        model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except RuntimeError as exc:
        raise InputError(f"{path}: checkpoint tensors do not fit the model ({_first_line(exc)})") from None
    moments = {k[len("optimizer.") :]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return str(meta["phase"]), int(meta["step"]), moments


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _restore_optimizer(optimizer: torch.optim.Optimizer, moments: dict) -> None:
    if not moments:
        return
    state = optimizer.state_dict()
    for i in {int(k.split(".")[0]) for k in moments}:
        state["state"][i] = {
            "step": moments[f"{i}.step"][0].clone(),
            "exp_avg": moments[f"{i}.exp_avg"],
            "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
        }
    optimizer.load_state_dict(state)


def train_source(
    heads: list[Head],
    config: TrainConfig = TrainConfig(),
    checkpoint: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    init: BaseModel | None = None,
) -> Iterator[TrainStep | TrainDone]:
    """Train U-Net then early head; yield a report per step and finally :class:`TrainDone`.

    ``init``: start from these weights (a model of the same width and scaling)
    instead of random ones, to train a model further; its id is part of what a
    checkpoint must match.
    """
    start = time.perf_counter()
    device = pick_device(config.device)
    if any(h.intensity_scaling != config.intensity_scaling for h in heads):
        raise InputError(f"the heads were not scaled with {config.intensity_scaling!r}, the scaling asked for")
    torch.manual_seed(config.seed)
    model = build_model(config.width, config.intensity_scaling)
    settings = _resumable(config, heads_sha256(heads))
    if init is not None:
        if init.metadata.get("architecture") != model.metadata["architecture"]:
            raise InputError(f"{init.path}: the initial weights are not a {config.width}-wide model")
        if init.intensity_scaling != config.intensity_scaling:
            raise InputError(f"{init.path}: the initial weights read {init.intensity_scaling!r}-scaled inputs")
        model.unet.load_state_dict(init.unet.state_dict())
        model.head.load_state_dict(init.head.state_dict())
        settings["init_model_id"] = init.model_id
    phase, done_steps, moments = "unet", 0, {}
    if checkpoint is not None and checkpoint.exists():
        phase, done_steps, moments = _load_checkpoint(checkpoint, model, settings)
    unet, head = model.unet.to(device), model.head.to(device)
    total = config.steps + config.head_steps
    first_step = done_steps
    for current in ("unet", "head"):
        n_steps = config.steps if current == "unet" else config.head_steps
        offset = 0 if current == "unet" else config.steps
        if done_steps >= offset + n_steps:
            continue
        params = list(unet.parameters()) if current == "unet" else list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=config.lr)
        if phase == current:
            _restore_optimizer(optimizer, moments)
        steps = range(max(done_steps, offset) + 1, offset + n_steps + 1)
        for step, batch in zip(steps, _batches(heads, config, steps), strict=True):
            if should_stop is not None and should_stop():
                return
            local = step - offset
            for group in optimizer.param_groups:  # cosine decay to 1% of the initial rate
                group["lr"] = config.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (local - 1) / n_steps)))
            x, y = (torch.from_numpy(a).to(device) for a in batch)
            if current == "unet":
                unet.train()
                loss = segmentation_loss(unet(x), y)
            else:
                unet.eval()
                head.train()
                with torch.no_grad():
                    deepest = unet.encode(x)[-1]
                loss = segmentation_loss(head(deepest, x.shape[-2:]), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            rate = elapsed / (step - first_step)
            yield TrainStep(current, step, total, loss.item(), elapsed, rate * (total - step))
            if checkpoint is not None and (step % config.checkpoint_every == 0 or step == offset + n_steps):
                _save_checkpoint(checkpoint, model, optimizer, current, step, settings)
        done_steps = offset + n_steps
        phase = "head"
        moments = {}
    model.eval()
    model.metadata[PRIOR_KEY] = learn_shape_prior([h.masks for h in heads]).as_metadata()
    model.metadata[LANDMARKS_KEY] = learn_reference(
        [h.landmarks for h in heads], [h.brain_landmarks for h in heads]
    ).as_metadata()
    yield TrainDone(model.copy().eval(), time.perf_counter() - start)
