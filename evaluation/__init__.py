"""Metrics that see only images, prompts and the attributes of prompts; ``evaluate.py`` and the
in-training callbacks call the same functions. A metric that depends on a learned feature network
carries that network's name (``fid_inception``, ``fid_clip``)."""
