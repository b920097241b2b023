"""What 3D Slicer's own Python loads: the engine's Slicer side, importable with only the standard library and numpy.

The module must load, list models and count painted slices before torch, SimpleITK extras or slicerio are
installed, and a broken torch must not stop the panel from appearing. So everything the module needs on
its GUI path lives here and imports nothing beyond the standard library, numpy and the engine's torch-free
modules, each the one home of its concept: `organs` (the label sets), `strategies` (the strategy
table), `errors` (exit statuses), `orientation` (the slice axis), `organ_trust` (held-out quality and volume
ranges), `atomic` (a test imports this package with torch, SimpleITK and slicerio blocked and lists these):

- `commands`: engine command lines, child environment, exit messages;
- `runner`: the background engine process, cancelled as a whole process tree;
- `job`: one engine job (a sequence of runs) and the device probe, driven by one poll;
- `progress_parser`: the engine's ``--progress json`` lines as events;
- `dependencies`: which Python packages are missing, pip constraints, restart after upgrades;
- `painting`: painted slices and the organs they label, write-back merging, the labels last written back;
- `slice_ranking`: reading the uncertainty report and ranking the slices to annotate next;
- `model_cards`: bundled and user models found by reading ``model.json``;
- `organ_volumes`: per-organ volumes from Slicer's Segment Statistics results;
- `sample_data`: the bundled sample CT for Slicer's Sample Data module.

The heavy work (reading images, networks, writing results) runs in a child process; see `DiffusionSegLib.cli`.
"""
