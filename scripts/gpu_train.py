"""Train a photo model (hyperprior or channelwise family) on a GPU with PyTorch, where TensorFlow
is not installed.

The device machines this project is sometimes lent carry PyTorch but not TensorFlow (and
TensorFlow's wheels are far larger than what may travel there). This script is the same
models and losses as `families/hyperprior/train.py` (`HyperpriorTrainer.losses`) and
`families/channelwise/train.py` (`ChannelwiseTrainer.losses`; the family comes from the weights:
context networks make it channelwise), written with PyTorch ops in the Keras weights' own
layouts and names, so a run goes

    python -m training.weights photo:4 init-q4.npz            # here: a shipped model's weights
    python scripts/gpu_train.py --init init-q4.npz --lmbda 0.013 --data photos/ \
        --seconds 480 --out gpu-q4.npz                         # there: train on the GPU
    latentpack train --arch hyperprior --input 'photos/*.jpg' --input-format images \
        --quality 4 --crop 256 --batch-size 16 --init-from gpu-q4.npz \
        --model-dir photo-q4                                  # here: export (integer tables, SavedModel)

The number of stages comes from the weights: the stride-8 photo:6 (three stages) trains the same
way and exports with `--stride 8 --lambda 0.0175` instead of `--quality 4`. A channelwise model
(the newest family; the shipped models are still scale hyperpriors) exports with `--arch
channelwise`; `python -m training.weights photo:4 start.npz --family channelwise` gives a start
point that computes exactly what photo:4 does (`families.channelwise.train.from_hyperprior`).

Same as the TensorFlow trainer: "same"-padded stride-2 convolutions with TensorFlow's
padding (one pixel before, two after), GDN with reparameterized beta and gamma, rounded
latents straight through to the decoder and the hyper-analysis, uniform noise for the rates,
the per-channel density of the side information, Adam (epsilon 1e-7), gradients clipped to
global norm 1, loss = lambda * 255^2 * MSE + bits per pixel, the held-out split by CRC32 of
the file name. Different: the schedule is in seconds (a warm-up of --warmup-steps, constant,
then the last 20% annealed to a tenth), since a lent machine's time is what is fixed; crops,
batch and learning rate are arguments (defaults: CompressAI's 256-pixel crops, batch 16; 2e-4).
`tests/test_gpu_train.py` checks it against the TensorFlow trainer on the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F

PEDESTAL = 2.0 ** -36
BETA_MIN = 1e-6
SCALE_MIN, SCALE_MAX = 0.11, 64.0  # families.hyperprior.train
HOLDOUT_EVERY, VAL_IMAGES = 10, 24  # training.loop.PhotoConfig, training.data


def _same(size: int, kernel: int, stride: int):
    """TensorFlow's "same" padding of one dimension: (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Model:
    """The hyperprior model's weights (Keras names and layouts) and its forward pass (NCHW)."""

    def __init__(self, arrays: dict, device):
        self.params = {name: torch.tensor(np.asarray(a, np.float32), device=device, requires_grad=True)
                       for name, a in arrays.items()}
        # Stride-2 stages: four for stride 16 (photo:1-4), three for stride 8 (photo:6), as the weights say.
        self.stages = sum(1 for n in arrays if n.startswith("analysis/conv") and n.endswith("/kernel"))
        self.stride = 2 ** self.stages
        self.latent_channels = self.params[f"analysis/conv{self.stages - 1}/bias"].shape[0]
        self.matrices = sorted(n for n in self.params if n.startswith("prior/matrix"))
        # Channelwise: each slice's size from its context network's last layer (mean and log-scale).
        self.slices = []
        while f"context{len(self.slices)}/cc{len(self.slices)}conv2/bias" in self.params:
            self.slices.append(self.params[f"context{len(self.slices)}/cc{len(self.slices)}conv2/bias"].shape[0] // 2)
        self.family = "channelwise" if self.slices else "hyperprior"

    def conv(self, x, name, stride, relu=False):
        k = self.params[name + "/kernel"]  # [kh, kw, in, out]
        (t, b), (l, r) = _same(x.shape[2], k.shape[0], stride), _same(x.shape[3], k.shape[1], stride)
        x = F.conv2d(F.pad(x, (l, r, t, b)), k.permute(3, 2, 0, 1), self.params[name + "/bias"], stride=stride)
        return F.relu(x) if relu else x

    def deconv(self, x, name, stride, relu=False):
        k = self.params[name + "/kernel"]  # [kh, kw, out, in]
        before_h = max(k.shape[0] - stride, 0) // 2
        before_w = max(k.shape[1] - stride, 0) // 2
        full = F.conv_transpose2d(x, k.permute(3, 2, 0, 1), self.params[name + "/bias"], stride=stride)
        x = full[:, :, before_h:before_h + stride * x.shape[2], before_w:before_w + stride * x.shape[3]]
        return F.relu(x) if relu else x

    def gdn(self, x, name, inverse):
        beta = torch.clamp(self.params[name + "/beta"], min=(BETA_MIN + PEDESTAL) ** 0.5) ** 2 - PEDESTAL
        gamma = torch.clamp(self.params[name + "/gamma"], min=PEDESTAL ** 0.5) ** 2 - PEDESTAL
        norm = torch.sqrt(F.conv2d(x * x, gamma[:, :, None, None], beta))
        return x * norm if inverse else x / norm

    def analysis(self, x):
        for i in range(self.stages - 1):
            x = self.gdn(self.conv(x, f"analysis/conv{i}", 2), f"analysis/gdn{i}", False)
        return self.conv(x, f"analysis/conv{self.stages - 1}", 2)

    def synthesis(self, y):
        for i in range(self.stages - 1):
            y = self.gdn(self.deconv(y, f"synthesis/deconv{i}", 2), f"synthesis/igdn{i}", True)
        return self.deconv(y, f"synthesis/deconv{self.stages - 1}", 2)

    def hyper_analysis(self, y):
        y = self.conv(y, "hyper_analysis/hconv0", 1, relu=True)
        y = self.conv(y, "hyper_analysis/hconv1", 2, relu=True)
        return self.conv(y, "hyper_analysis/hconv2", 2)

    def hyper_synthesis(self, z):
        z = self.deconv(z, "hyper_synthesis/hdeconv0", 2, relu=True)
        z = self.deconv(z, "hyper_synthesis/hdeconv1", 2, relu=True)
        return self.deconv(z, "hyper_synthesis/hdeconv2", 1)

    def logits_cdf(self, x):
        """x [C, 1, n] -> logits of each channel's cumulative distribution at x."""
        for i in range(len(self.matrices)):
            x = torch.matmul(F.softplus(self.params[f"prior/matrix{i}"]), x) + self.params[f"prior/bias{i}"]
            if f"prior/factor{i}" in self.params:
                x = x + torch.tanh(self.params[f"prior/factor{i}"]) * torch.tanh(x)
        return x

    def prior_bits(self, z):
        """Bits of each image's side information z [N, C, h, w]: shape [N]."""
        n, c = z.shape[:2]
        flat = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower, upper = self.logits_cdf(flat - 0.5), self.logits_cdf(flat + 0.5)
        sign = -torch.sign(lower + upper)
        p = torch.clamp(torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)), min=1e-9)
        return (-torch.log2(p)).reshape(c, n, -1).sum(dim=(0, 2))

    def hyper_input(self, y):
        """What the hyper-analysis reads: |y| (hyperprior), [y, |y|] (channelwise)."""
        return torch.cat([y, torch.abs(y)], dim=1) if self.slices else torch.abs(y)

    def entropy_parameters(self, features, y_hat):
        """(mean, log_scale) [N, M, h, w]: hyperprior, zero and the features; channelwise, slice by
        slice, the features plus each context network's corrections (ChannelwiseTrainer)."""
        if not self.slices:
            return torch.zeros_like(features), features
        m = self.latent_channels
        means, scales, start = [], [], 0
        for i, size in enumerate(self.slices):
            x = torch.cat([features, y_hat[:, :start]], dim=1) if start else features
            x = self.conv(x, f"context{i}/cc{i}conv0", 1, relu=True)
            x = self.conv(x, f"context{i}/cc{i}conv1", 1, relu=True)
            out = self.conv(x, f"context{i}/cc{i}conv2", 1)
            means.append(features[:, start:start + size] + out[:, :size])
            scales.append(features[:, m + start:m + start + size] + out[:, size:])
            start += size
        return torch.cat(means, dim=1), torch.cat(scales, dim=1)

    @staticmethod
    def gaussian_bits(y, log_scale, mean=None):
        scale = torch.exp(torch.clamp(log_scale, math.log(SCALE_MIN), math.log(SCALE_MAX)))
        v = torch.abs(y if mean is None else y - mean)
        c = 1.0 / (scale * math.sqrt(2.0))
        p = 0.5 * (torch.special.erfc((v - 0.5) * c) - torch.special.erfc((v + 0.5) * c))
        return -torch.log2(torch.clamp(p, min=1e-9))

    @staticmethod
    def pad_grid(y, multiple=4):
        return F.pad(y, (0, (-y.shape[3]) % multiple, 0, (-y.shape[2]) % multiple), mode="replicate")

    def losses(self, x, noise_y=None, noise_z=None):
        """(MSE, bits per pixel) of a batch x [N, 3, H, W] in [0, 1]: the family's trainer's `losses`."""
        y = self.analysis(x)
        y_hat = y + (torch.round(y) - y).detach()
        z = self.hyper_analysis(self.hyper_input(self.pad_grid(y_hat)))
        z_hat = z + (torch.rand_like(z) - 0.5 if noise_z is None else noise_z)
        features = self.hyper_synthesis(z_hat)[:, :, :y.shape[2], :y.shape[3]]
        mean, log_scale = self.entropy_parameters(features, y_hat)
        noisy_y = y + (torch.rand_like(y) - 0.5 if noise_y is None else noise_y)
        x_hat = self.synthesis(y_hat)
        mse = torch.mean((x - x_hat) ** 2)
        bits = self.gaussian_bits(noisy_y, log_scale, mean).sum(dim=(1, 2, 3)) + self.prior_bits(z_hat)
        return mse, bits.mean() / (x.shape[2] * x.shape[3])

    @torch.no_grad()
    def evaluate(self, images) -> dict:
        """Held-out PSNR and estimated bits per pixel on whole images (uint8 [3, H, W] tensors),
        edge-padded to multiples of the stride as the pipeline pads them: PhotoTrainer.evaluate."""
        psnrs, bpps = [], []
        for image in images:
            h, w = image.shape[1:]
            x = image[None].float() / 255.0
            x = F.pad(x, (0, (-w) % self.stride, 0, (-h) % self.stride), mode="replicate")
            y = torch.round(self.analysis(x))
            z = torch.round(self.hyper_analysis(self.hyper_input(self.pad_grid(y))))
            features = self.hyper_synthesis(z)[:, :, :y.shape[2], :y.shape[3]]
            mean, log_scale = self.entropy_parameters(features, y)
            bits = self.gaussian_bits(y, log_scale, mean).sum() + self.prior_bits(z).sum()
            x_hat = torch.round(torch.clamp(self.synthesis(y), 0, 1) * 255.0)[0, :, :h, :w]
            mse = torch.mean((x_hat - image.float()) ** 2).item()
            psnrs.append(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))
            bpps.append(bits.item() / (h * w))
        return {"val_psnr": float(np.mean(psnrs)), "val_bpp": float(np.mean(bpps)), "val_images": len(images)}

    def arrays(self) -> dict:
        return {name: p.detach().cpu().numpy() for name, p in self.params.items()}


def fresh_prior(channels: int, rng, init_scale: float = 10.0, filters=(3, 3, 3)) -> dict:
    """A new side-information density, initialized as training.prior.DeepFactorizedPrior is."""
    dims = (1,) + tuple(filters) + (1,)
    scale = init_scale ** (1.0 / (len(filters) + 1))
    out = {}
    for i in range(len(filters) + 1):
        out[f"prior/matrix{i}"] = np.full((channels, dims[i + 1], dims[i]), np.log(np.expm1(1.0 / scale / dims[i + 1])),
                                          np.float32)
        out[f"prior/bias{i}"] = rng.uniform(-0.5, 0.5, (channels, dims[i + 1], 1)).astype(np.float32)
        if i < len(filters):
            out[f"prior/factor{i}"] = np.zeros((channels, dims[i + 1], 1), np.float32)
    return out


def load_photos(folder: str, device):
    """(training images, held-out validation images) as uint8 [3, H, W] tensors on the device;
    held out: CRC32 of the file name without extension divisible by 10 (training.data.is_holdout)."""
    from PIL import Image

    train, holdout = [], []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        with Image.open(os.path.join(folder, name)) as im:
            pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous().to(device)
        (holdout if zlib.crc32(stem.encode()) % HOLDOUT_EVERY == 0 else train).append(pixels)
    return train, holdout


def crops(images, batch: int, size: int, gen, device):
    """A batch of random crops [batch, 3, size, size] in [0, 1], each flipped left-right half the time."""
    out = []
    for i in torch.randint(len(images), (batch,), generator=gen).tolist():
        image = images[i]
        if image.shape[1] < size or image.shape[2] < size:
            image = F.pad(image[None].float(), (0, max(0, size - image.shape[2]), 0, max(0, size - image.shape[1])),
                          mode="reflect")[0]
        y = int(torch.randint(image.shape[1] - size + 1, (1,), generator=gen))
        x = int(torch.randint(image.shape[2] - size + 1, (1,), generator=gen))
        crop = image[:, y:y + size, x:x + size]
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(2)
        out.append(crop)
    return torch.stack(out).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def continued(before: dict, trainer: dict) -> dict:
    """This run's history: a run continuing an earlier run of this script (its --init is that run's
    --out) extends its curves and seconds and adds itself to its `runs`; any other start is kept
    under `before` (a shipped model's lineage, say)."""
    if "runs" in before:
        return dict(before, trainer=trainer, runs=before["runs"] + [trainer])
    return {"train": [], "val": [], "seconds": 0.0, "before": before, "trainer": trainer, "runs": [trainer]}


def save(path: str, model: Model, step: int, history: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **model.arrays(), step=np.int64(step), history=np.array(json.dumps(history)))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="weights to start from (.npz, training.weights)")
    p.add_argument("--lmbda", type=float, required=True, help="rate-distortion trade-off (CompressAI's convention)")
    p.add_argument("--data", required=True, help="folder of training photos (the held-out split is left out)")
    p.add_argument("--out", required=True, help="weights file to write (.npz), also every --save-every seconds")
    p.add_argument("--seconds", type=float, required=True, help="training time; the last 20%% anneals the rate")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=500,
                   help="steps of linear learning-rate warm-up: Adam's first steps move every weight by about "
                        "the learning rate, which costs a trained model a dB before it recovers")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--validate-every", type=float, default=120.0, help="seconds between validations")
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between writes of --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with np.load(args.init, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k not in ("step", "history")}
        step = int(f["step"]) if "step" in f.files else 0
        before = json.loads(str(f["history"])) if "history" in f.files else {}
    filters = arrays["analysis/conv0/bias"].shape[0]
    if not any(k.startswith("prior/") for k in arrays):
        arrays.update(fresh_prior(filters, np.random.default_rng(args.seed)))
    model = Model(arrays, device)
    train, holdout = load_photos(args.data, device)
    holdout = holdout[:VAL_IMAGES]
    if not train:
        sys.exit(f"gpu_train: no training photos in {args.data}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    history = continued(before, {"script": "scripts/gpu_train.py", "family": model.family, "device": name,
                                 "torch": torch.__version__,
                                 "lmbda": args.lmbda, "crop": args.crop, "batch": args.batch,
                                 "learning_rate": args.learning_rate, "seconds": args.seconds, "start_step": step,
                                 "train_images": len(train), "val_images": len(holdout)})
    print(f"{name}: {model.family} model, {len(train)} training photos, {len(holdout)} held out; lambda {args.lmbda}, "
          f"crops {args.crop}, batch {args.batch}, {args.seconds:.0f} s", flush=True)

    def validate():
        torch.backends.cudnn.allow_tf32 = False
        metrics = dict(model.evaluate(holdout), step=step)
        torch.backends.cudnn.allow_tf32 = True
        history["val"].append(metrics)
        print(f"  validation at step {step}: {metrics['val_psnr']:.2f} dB at {metrics['val_bpp']:.3f} bpp "
              f"(estimated) on {len(holdout)} held-out photos", flush=True)

    validate()
    seconds_before = history["seconds"]
    params = list(model.params.values())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-7)
    lmbda = args.lmbda * 255.0 ** 2
    good = [p.detach().clone() for p in params]
    retries = 0
    started = last_val = last_save = window = time.time()
    sums, samples, count = np.zeros(3), 0, 0  # losses sampled every 50th step; steps in the window
    while True:
        elapsed = time.time() - started
        if elapsed >= args.seconds:
            break
        frac = elapsed / args.seconds
        lr = args.learning_rate * (1.0 if frac < 0.8 else 1.0 - 0.9 * (frac - 0.8) / 0.2) * 0.5 ** retries
        lr *= min(1.0, (step - history["trainer"]["start_step"] + 1) / max(args.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = crops(train, args.batch, args.crop, gen, device)
        mse, bpp = model.losses(x)
        loss = lmbda * mse + bpp
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip_norm)
        optimizer.step()
        step += 1
        count += 1
        if step % 50 == 0:  # reading a loss waits for the GPU: only now and then
            sums += [loss.item(), mse.item(), bpp.item()]
            samples += 1
        if step % 50 == 0 and not np.isfinite(sums[0]):
            retries += 1
            print(f"loss is not finite at step {step}: back to the last good weights, learning rate halved", flush=True)
            if retries > 3:
                break
            with torch.no_grad():
                for p_, g in zip(params, good):
                    p_.copy_(g)
            optimizer = torch.optim.Adam(params, lr=lr / 2, eps=1e-7)
            sums, samples, count = np.zeros(3), 0, 0
            continue
        if step % 1000 == 0:
            with torch.no_grad():
                for g, p_ in zip(good, params):
                    g.copy_(p_)
        now = time.time()
        if step % 200 == 0 and samples:
            loss_, mse_, bpp_ = sums / samples
            rate = count / (now - window)
            history["train"].append({"step": step, "loss": loss_, "psnr": 10 * math.log10(1 / max(mse_, 1e-10)),
                                     "bpp": bpp_, "lr": lr})
            print(f"step {step}: loss {loss_:.4f}, train PSNR {10 * math.log10(1 / max(mse_, 1e-10)):.2f} dB at "
                  f"{bpp_:.3f} bpp; {rate:.1f} steps/s, {args.seconds - (now - started):.0f} s left", flush=True)
            sums, samples, count, window = np.zeros(3), 0, 0, now
        if now - last_val >= args.validate_every:
            validate()
            last_val = time.time()
        if now - last_save >= args.save_every:
            history["seconds"] = seconds_before + time.time() - started
            save(args.out, model, step, history)
            last_save = time.time()
    history["seconds"] = seconds_before + time.time() - started
    validate()
    save(args.out, model, step, history)
    print(f"trained {step - history['trainer']['start_step']} steps in {history['seconds'] - seconds_before:.0f} s; "
          f"weights in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
