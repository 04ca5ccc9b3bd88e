"""Train the small digits DiT (see :mod:`kvcache.eval.dit.digits`) and write its float16 safetensors + config.

    python -m kvcache.eval.dit.train_digits --minutes 8

Clean-image prediction on a 1000-step cosine DDPM schedule (see ``kvcache.eval.dit.digits.SCHEDULE``), AdamW, 10% label dropout (the DiT's own class
dropout) for classifier-free guidance, EMA of the weights (the EMA is what ships).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from kvcache.eval.dit.digits import CONFIG, MODEL_CONFIG, SCHEDULE, WEIGHTS, build_model, load_images


def train(minutes: float, batch: int, lr: float, seed: int, ema_decay: float, max_steps: int) -> dict:
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    images, labels = load_images()
    model = build_model().train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, step, losses = time.time(), 0, []
    while time.time() - start < minutes * 60 and step < max_steps:
        idx = torch.randint(0, images.shape[0], (batch,))
        x0 = images[idx]
        x0 = torch.roll(x0, shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        xt = noise_sched.add_noise(x0, noise, t)
        target = x0 if SCHEDULE["prediction_type"] == "sample" else noise
        loss = torch.nn.functional.mse_loss(model(xt, timestep=t, class_labels=labels[idx]).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step}  loss {sum(losses[-50:]) / 50:.4f}  {time.time() - start:.0f}s", flush=True)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, str(WEIGHTS))
    info = {"model": MODEL_CONFIG, "schedule": SCHEDULE, "steps": step, "batch": batch, "lr": lr, "seed": seed, "ema_decay": ema_decay,
            "final_loss_avg50": sum(losses[-50:]) / max(len(losses[-50:]), 1), "seconds": round(time.time() - start, 1)}
    CONFIG.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(train(args.minutes, args.batch, args.lr, args.seed, args.ema, args.max_steps), indent=2))


if __name__ == "__main__":
    main()
