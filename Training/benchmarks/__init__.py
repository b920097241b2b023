"""The measurement programs, each named for what it measures; each prints its figures and writes JSON.

- ``label_efficiency`` (``diffusionseg-train benchmark``) and ``label_efficiency_report``: the method's
  label-efficiency tables (FT-dec, LP, FS at 4 slices to 100 %), within and across patients.
- ``model_figures``: held-out figures of the bundled models as a user meets them (leave one patient out,
  four painted slices), run through the real commands; ``Training.model_cards`` writes them into the cards.
- ``speed_memory``: time and peak memory of segment, fine-tune and pretrain against the targets.
- ``peer_speed``: ``diffusionseg segment`` beside a 3D nnU-Net of TotalSegmentator's fast shape.
- ``memory_guard``: the memory guard's prediction against the measured peak (``DiffusionSegLib.memory``).
- ``cleanup_effect``: DSC with and without per-organ cleanup.
- ``phantom``: synthetic CTs with known organs and geometry, for these programs and the test suite.

Run them as modules from the repository root, e.g. ``python -m Training.benchmarks.speed_memory --quick``.
They use the engine and Training; nothing in the engine imports them.
"""
