"""Engine timings on this machine: parameters per preset, segmentation seconds per slice, fine-tuning
seconds per iteration per strategy. Prints a table and writes JSON.

    python Testing/benchmarks/engine_timings.py [--preset small] [--slices 32] [--iterations 5] [--json OUT]

Weights are random: speed does not depend on them. A phantom CT supplies the slices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phantom import make_phantom  # noqa: E402

from DiffusionSegLib.annotations import training_slices  # noqa: E402
from DiffusionSegLib.devices import configure_cpu_threads, resolve_device  # noqa: E402
from DiffusionSegLib.finetune import FinetuneConfig, finetune  # noqa: E402
from DiffusionSegLib.inference import predict_probabilities  # noqa: E402
from DiffusionSegLib.preprocessing import PreprocessingSpec, to_model_space  # noqa: E402
from DiffusionSegLib.segmentor import DEFAULT_HEAD_WIDTH, STRATEGIES, Segmentor  # noqa: E402
from DiffusionSegLib.unet import PRESETS, UNetModel, count_parameters, preset_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--slices", type=int, default=32, help="slices to segment")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5, help="timed fine-tuning iterations per strategy (after 1 warm-up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    configure_cpu_threads()
    device = resolve_device(args.device)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "device": str(device)}

    with torch.device("meta"):
        results["parameters"] = {name: count_parameters(UNetModel(preset_config(name))) for name in PRESETS}

    config = preset_config(args.preset)
    spec = PreprocessingSpec.for_size(config.image_size)
    ct, labels = make_phantom(size=(256, 256, args.slices), spacing=(1.6, 1.6, 5.0), seed=0)
    segmentor = Segmentor(config, DEFAULT_HEAD_WIDTH[args.preset])

    start = time.perf_counter()
    volume = to_model_space(ct, spec)
    preprocess = time.perf_counter() - start
    predict_probabilities(segmentor, volume.slices[: args.batch_size], device, args.batch_size)  # warm-up
    start = time.perf_counter()
    predict_probabilities(segmentor, volume.slices, device, args.batch_size)
    network = time.perf_counter() - start
    results["segment"] = {
        "preset": args.preset, "size": config.image_size, "slices": args.slices, "preprocess_s": preprocess,
        "network_s": network, "seconds_per_slice": network / args.slices,
    }

    slices = training_slices([(ct, labels)], spec)
    four = torch.linspace(0, len(slices.sources) - 1, 4).round().long()
    results["finetune"] = {}
    for strategy in STRATEGIES:
        model = Segmentor(config, DEFAULT_HEAD_WIDTH[args.preset])
        finetune(model, slices.images[four], slices.labels[four], FinetuneConfig(strategy=strategy, iterations=1), device)
        run = finetune(model, slices.images[four], slices.labels[four], FinetuneConfig(strategy=strategy, iterations=args.iterations), device)
        results["finetune"][strategy] = {"batch": 4, "seconds_per_iteration": run.seconds / run.iterations}

    print(f"device {device}, {results['threads']} threads")
    for name, n in results["parameters"].items():
        print(f"  parameters {name:6s} {n / 1e6:8.2f} M")
    s = results["segment"]
    print(f"  segment ({args.preset}, {s['size']}px): {s['seconds_per_slice']:.3f} s/slice network, "
          f"preprocess {s['preprocess_s']:.2f} s for {args.slices} slices")
    for strategy, f in results["finetune"].items():
        print(f"  finetune {strategy:6s} ({args.preset}, 4 slices): {f['seconds_per_iteration']:.2f} s/iteration")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
